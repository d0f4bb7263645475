"""The `stage` mesh axis around the pipeline: mesh sizes and messages, the --mesh syntax, the
refused `layers=stage` rule, which rows each process feeds, and checkpoints that resume on
another number of stages."""

import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from errors import UserError
from model.sampler import parse_mesh
from sharding import MESH_AXES, logical_rules, make_mesh, resolve_mesh_shape
from tests.helpers import train_until_killed
from tests.test_train_loop import read_metrics, small_config
from training import loop
from training.config import describe, validate_config
from training.distributed import feed_position, feed_positions


def sizes(**axes):
    return ml_collections.ConfigDict(axes)


def test_stage_is_the_outermost_axis_and_old_meshes_resolve_as_before():
    assert MESH_AXES[0] == "stage"
    assert resolve_mesh_shape(sizes(data=-1, fsdp=2, tensor=1), 8) == (1, 4, 2, 1, 1)
    assert resolve_mesh_shape(sizes(data=2, fsdp=-1, tensor=1, stage=2), 8) == (2, 2, 2, 1, 1)
    mesh = make_mesh(sizes(data=-1, fsdp=1, tensor=1, stage=4))
    assert dict(mesh.shape) == {"stage": 4, "data": 2, "fsdp": 1, "expert": 1, "tensor": 1}
    # Messages name stage only when it is used, as they did before it existed.
    with pytest.raises(UserError) as old:
        resolve_mesh_shape(sizes(data=3, fsdp=1, tensor=1), 8)
    assert str(old.value).startswith("mesh.data=3 x mesh.fsdp=1 x mesh.tensor=1 needs 3 devices")
    with pytest.raises(UserError, match=r"^mesh.stage=2 x mesh.data=3 x .* needs 6 devices"):
        resolve_mesh_shape(sizes(data=3, fsdp=1, tensor=1, stage=2), 8)


def test_mesh_flag_takes_an_optional_stage_size_last():
    assert dict(parse_mesh("-1,1,1")) == {"data": -1, "fsdp": 1, "tensor": 1}
    assert dict(parse_mesh("1,4,1,1,2")) == {
        "data": 1, "fsdp": 4, "tensor": 1, "expert": 1, "stage": 2,
    }
    with pytest.raises(UserError, match=r"data,fsdp,tensor\[,expert\[,stage\]\]"):
        parse_mesh("1,1,1,1,1,1")


def test_a_layers_to_stage_rule_is_refused_with_what_to_set_instead():
    for overrides in ("layers=stage", "vocab=,layers=fsdp+stage"):
        with pytest.raises(UserError, match="does not pipeline.*set mesh.stage plus the pipeline"):
            logical_rules(overrides)
    assert dict(logical_rules("layers=fsdp"))["layers"] == "fsdp"


def test_processes_along_stage_feed_the_same_rows():
    # 2 processes x 4 devices, 8 rows; each set holds the (start, stop) rows of a device.
    across_stage = {0: {(0, 2), (2, 4), (4, 6), (6, 8)}, 1: {(0, 2), (2, 4), (4, 6), (6, 8)}}
    assert feed_positions(across_stage, 8) == {0: (0, 1), 1: (0, 1)}
    across_data = {0: {(0, 2), (2, 4)}, 1: {(4, 6), (6, 8)}}  # stage inside each process
    assert feed_positions(across_data, 8) == {0: (0, 2), 1: (1, 2)}
    four = {0: {(0, 4)}, 1: {(4, 8)}, 2: {(0, 4)}, 3: {(4, 8)}}  # stage=2 x data=2 processes
    assert feed_positions(four, 8) == {0: (0, 2), 1: (1, 2), 2: (0, 2), 3: (1, 2)}
    interleaved = {0: {(2, 4), (6, 8)}, 1: {(0, 2), (4, 6)}}  # a permuted device order
    assert feed_positions(interleaved, 8) == {0: (0, 2), 1: (1, 2)}
    overlapping = {0: {(0, 2), (2, 4)}, 1: {(2, 4), (4, 6)}, 2: {(6, 8)}}
    for broken in (overlapping, {0: {(0, 2)}, 1: {(2, 4), (4, 6), (6, 8)}}):
        with pytest.raises(UserError, match="overlapping or unequal parts of the batch's rows"):
            feed_positions(broken, 8)
    # One process feeds every row, whatever the mesh.
    mesh = make_mesh(sizes(data=2, fsdp=1, tensor=1, stage=4))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data",)))
    assert feed_position(sharding, 8) == (0, 1)


def test_start_up_checks_count_the_processes_along_stage_and_log_the_stage_axis():
    config = small_config(**{"model.num_layers": 4, "mesh.stage": 4, "mesh.data": 2})
    validate_config(config, 8, process_count=4)  # the stages across 4 hosts
    config = small_config(**{"mesh.data": 2, "mesh.tensor": 4})
    with pytest.raises(UserError, match=r"mesh.stage x mesh.data\*mesh.fsdp=2 does not split"):
        validate_config(config, 8, process_count=4)
    config = small_config(**{"mesh.stage": 2})
    line = describe(config, validate_config(config, 8), 0, 8)
    assert "mesh(stage,data,fsdp,expert,tensor)=(2,4,1,1,1)" in line


def losses(workdir) -> dict[int, float]:
    return {step: record["loss"] for step, record in read_metrics(workdir).items()}


def copy_until(source, step, workdir):
    """`source`'s workdir copied to `workdir` with checkpoint `step` its last, no metrics."""
    shutil.copytree(source, workdir)
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    for later in os.listdir(os.path.join(workdir, "checkpoints")):
        if later.isdigit() and int(later) > step:
            shutil.rmtree(os.path.join(workdir, "checkpoints", later))


RUN = {
    "model.num_layers": 4,
    "train.num_steps": 6,
    "train.eval_every": 0,
    "checkpoint.every_steps": 2,
    "pipeline.microbatches": 4,
}


def test_a_checkpoint_resumes_on_another_number_of_stages_and_back(tmp_path, monkeypatch):
    """Checkpoints keep the [layers, ...] layout and a stage-free data position: saved at
    stage=1, resumed at stage=4 (pipelined) for two steps and saved, resumed at stage=1."""
    reference, four, back = (str(tmp_path / name) for name in ("reference", "four", "back"))
    loop.train(small_config(**RUN), reference)
    copy_until(reference, 2, four)
    train_until_killed(small_config(**RUN, **{"mesh.stage": 4}), four, 3, monkeypatch)
    copy_until(four, 4, back)
    loop.train(small_config(**RUN), back)
    expected = losses(reference)
    assert sorted(losses(four)) == [3, 4] and sorted(losses(back)) == [5, 6]
    got = {**losses(four), **losses(back)}
    np.testing.assert_allclose(
        [got[s] for s in range(3, 7)], [expected[s] for s in range(3, 7)], rtol=1e-5
    )

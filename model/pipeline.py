"""Pipeline parallelism: the decoder layers split into stages over the `stage` mesh axis.

SPMD, as MaxText/praxis: the scanned layers' params [layers, ...] are viewed as
[repeats, stages, layers / (stages x repeats), ...], the stage axis sharded over the
`stage` mesh axis, and each iteration of one `lax.scan` runs every stage at once (a
`vmap` over stages with `spmd_axis_name="stage"`) on its own microbatch, then rolls
the outputs one stage on (`jnp.roll` over the stage-sharded axis: a collective-permute).
Microbatch m's k-th pass (k = repeat x M + m) runs on stage s at iteration k + s, so
M x R + S - 1 iterations run M microbatches through S stages R times:

    gpipe     repeats = 1: layer block s on stage s; bubble (S-1) / (M+S-1)
    circular  repeats = R: block r x S + s on stage s at repeat r; the last stage's output
              waits in a buffer until stage 0 takes it for the next repeat; bubble
              (S-1) / (R x M + S-1), at R times the activation traffic

Iterations where a stage has no microbatch (the bubble; `Schedule.mask`) compute on zeros
and their outputs are never stored, so nothing they compute reaches outputs or gradients.
Embeddings and the output head stay outside, replicated over stages. Checkpoints keep
the canonical [layers, ...] layout (the params are stored with their layer axis split in
contiguous blocks over `stage`), so any stage count resumes any other; circular runs
regroup the blocks once per step (an all-to-all of the layers' weights). The stage
weights are gathered over the data-parallel axes once per step, before the loop, not
per microbatch; their gradients are still summed over those axes inside the loop, once
per iteration (as train.num_microbatches accumulation does per microbatch). Each stage
remats its layers by model.remat_policy; the loop keeps every iteration's stage inputs
(no second, outer remat). 1F1B and zero-bubble schedules need MPMD execution; not here.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from config_schema import check_fields, field
from errors import UserError
from sharding.mesh import MESH_AXES, resolve_mesh_shape
from sharding.rules import rule_axes

SCHEDULES = ("gpipe", "circular")
ACTIVATIONS = ("stage", "batch", "length", "embed")  # one microbatch per stage


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """`config.pipeline`: how the layers run when mesh.stage > 1 (ignored at mesh.stage=1)."""

    microbatches: int = field(
        0,
        "[0, inf)",
        "pipeline microbatches each (gradient-accumulation) batch is split into, >= mesh.stage; "
        "0 = mesh.stage; more shrink the bubble",
    )
    schedule: str = field(
        "gpipe",
        SCHEDULES,
        "gpipe (each stage holds one block of consecutive layers) or circular (pipeline.repeats "
        "smaller blocks per stage, each microbatch passing the stages that many times)",
    )
    repeats: int = field(
        1, "[1, inf)", "circular: passes through the stages; model.num_layers % (stage x repeats)"
    )

    def __post_init__(self):
        check_fields(self, "pipeline")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """S stages, M microbatches, R repeats: what the model needs to run a pipeline."""

    stages: int
    microbatches: int
    repeats: int = 1

    @property
    def iterations(self) -> int:
        return self.microbatches * self.repeats + self.stages - 1

    def mask(self) -> np.ndarray:
        """[iterations, stages] True where a stage has a microbatch (False: the bubble)."""
        work = np.arange(self.iterations)[:, None] - np.arange(self.stages)[None, :]
        return (work >= 0) & (work < self.microbatches * self.repeats)

    @property
    def bubble_fraction(self) -> float:
        """Idle stage-iterations over all: (S-1) / (M x R + S-1), from the mask."""
        return float(1.0 - self.mask().mean())


def schedule(config, num_stages: int) -> Schedule | None:
    """The run's Schedule for mesh.stage = `num_stages`; None when not pipelined (1 stage)."""
    if num_stages == 1:
        return None
    p = config.pipeline
    repeats = p.repeats if p.schedule == "circular" else 1
    return Schedule(num_stages, p.microbatches or num_stages, repeats)


def bubble_fraction(config, num_devices: int) -> float:
    """The run's bubble fraction (0 without pipelining), for the log line and --dry_run."""
    sizes = dict(zip(MESH_AXES, resolve_mesh_shape(config.mesh, num_devices)))
    found = schedule(config, sizes.get("stage", 1))
    return 0.0 if found is None else found.bubble_fraction


def check(config, model_config, mesh_shape: dict) -> None:
    """Refusals before compiling, each naming the fields and the nearest valid values."""
    stages = mesh_shape.get("stage", 1)
    p = config.pipeline
    if stages == 1:
        return
    if p.schedule == "gpipe" and p.repeats != 1:
        raise UserError(
            f"pipeline.repeats={p.repeats} needs pipeline.schedule=circular (gpipe passes the "
            "stages once); set pipeline.schedule=circular or pipeline.repeats=1."
        )
    found = schedule(config, stages)
    layers, blocks = model_config.num_layers, stages * found.repeats
    if layers % blocks:
        repeats = [r for r in range(1, layers // stages + 1) if layers % (stages * r) == 0]
        raise UserError(
            f"model.num_layers={layers} is not divisible by mesh.stage={stages} x "
            f"pipeline.repeats={found.repeats}; nearest valid: model.num_layers="
            f"{_nearest_multiples(layers, blocks)}"
            + (f" or pipeline.repeats in {repeats}." if repeats else ".")
        )
    if model_config.num_experts:
        raise UserError(
            f"model.num_experts={model_config.num_experts} with mesh.stage={stages}: MoE layers "
            "are not pipelined yet; use mesh.stage=1 (experts shard over mesh.expert)."
        )
    _check_layer_kinds(model_config, layers // blocks, stages)
    _check_microbatches(config, found.microbatches, mesh_shape)


def _check_layer_kinds(model_config, per_stage: int, stages: int) -> None:
    """Each stage numbers its layers from 0, so layers that differ by index must repeat
    within a stage's block of layers."""
    if model_config.encoder_layers:
        raise UserError(
            f"model.encoder_layers={model_config.encoder_layers} with mesh.stage={stages}: "
            "encoder-decoders are not pipelined; use mesh.stage=1."
        )
    if not model_config.first_attn_norm:
        raise UserError(
            f"model.first_attn_norm=False with mesh.stage={stages}: layer 0's missing norm is "
            "not pipelined; use mesh.stage=1."
        )
    pattern = model_config.attention_pattern
    if model_config.sliding_window and per_stage % len(pattern):
        raise UserError(
            f"model.attention_pattern={pattern!r} must repeat whole within each stage's "
            f"{per_stage} layers (mesh.stage={stages}); change mesh.stage or pipeline.repeats."
        )


def _check_microbatches(config, micro: int, mesh_shape: dict) -> None:
    """M >= S, and each microbatch's rows a multiple of the data-parallel size."""
    stages = mesh_shape["stage"]
    rows = config.train.global_batch_size // config.train.num_microbatches
    data_parallel = math.prod(mesh_shape.get(a, 1) for a in ("data", "fsdp", "expert"))
    valid = [m for m in range(stages, rows + 1) if rows % (m * data_parallel) == 0]
    if micro >= stages and micro in valid:
        return
    nearest = sorted(sorted(valid, key=lambda m: abs(m - micro))[:4])
    why = (
        f"< mesh.stage={stages}"
        if micro < stages
        else f"does not fit: train.global_batch_size / train.num_microbatches = {rows} rows "
        f"split into pipeline.microbatches, each a multiple of mesh.data x fsdp x expert = "
        f"{data_parallel}"
    )
    raise UserError(
        f"pipeline.microbatches={micro} {why}; valid: "
        + (f"{nearest}." if valid else f"none (make {rows} rows a multiple of mesh.stage x "
           f"data-parallel size = {stages * data_parallel}).")
    )


def _nearest_multiples(value: int, base: int) -> str:
    below, above = value // base * base, (value // base + 1) * base
    return f"{below} or {above}" if below else str(above)


def split_microbatches(tree, num_microbatches: int):
    """[B, ...] -> [M, B/M, ...], microbatch m taking rows m, m+M, m+2M, ...

    Interleaving (rather than contiguous blocks) keeps every microbatch spread
    evenly over the data-parallel shards, so the split moves no data.
    """

    def split(x):
        rows = x.shape[0] // num_microbatches
        return x.reshape(rows, num_microbatches, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, tree)


def merge_microbatches(x):
    """The inverse of split_microbatches: [M, B/M, ...] -> [B, ...]."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def _data_parallel_axes(rules) -> set:
    """The mesh axes the batch is split over: stage weights are gathered over them."""
    return set(rule_axes(dict(rules).get("batch")))


def _gather_rules(rules) -> tuple:
    """`rules` without the data-parallel mesh axes (tensor and stage sharding kept)."""
    dropped = _data_parallel_axes(rules)
    out = []
    for name, axes in rules:
        kept = tuple(a for a in rule_axes(axes) if a not in dropped)
        out.append((name, kept[0] if len(kept) == 1 else (kept or None)))
    return tuple(out)


def stage_weights(weights, names, schedule: Schedule):
    """Leaves [layers, ...] -> [repeats, stages, layers per stage, ...], the stage axis on the
    `stage` mesh axis and the rest as the leaf's logical `names` say minus the data-parallel
    axes: gathered here, once, instead of once per microbatch inside the loop."""
    rules = _gather_rules(nn.get_logical_axis_rules())
    r, s = schedule.repeats, schedule.stages

    def view(w, leaf_names):
        w = w.reshape(r, s, w.shape[0] // (r * s), *w.shape[1:])
        return nn.with_logical_constraint(w, (None, "stage", None, *leaf_names), rules=rules)

    return jax.tree.map(view, weights, names)


def _empty_stages(shape, dtype):
    """The stages' inputs before the first iteration: all bubble (tests fill it with NaN)."""
    return jnp.zeros(shape, dtype)


def run(schedule: Schedule, stage_fn, weights, x, extras, rng=None):
    """x [B, T, E] through the pipelined layers -> [B, T, E].

    `stage_fn(weights, x, extras, rng) -> x` runs one stage's layers on one microbatch
    (weights: one block's leaves [layers per stage, ...]; extras: a pytree of that
    microbatch's [mb, ...] rows, e.g. positions and segment ids; rng: a key or None).
    `weights` are from `stage_weights`; `extras` rows [B, ...] go with their microbatch.
    """
    S, M, R = schedule.stages, schedule.microbatches, schedule.repeats
    constrain = nn.with_logical_constraint
    inputs = constrain(split_microbatches(x, M), (None, *ACTIVATIONS[1:]))
    extras = split_microbatches(extras, M)
    # buffer[:, m]: microbatch m's input, later the last stage's output for it (row 0 is
    # read by stage 0; every row is written, so writing stays local to each stage).
    buffer = jnp.broadcast_to(inputs, (S, *inputs.shape))
    buffer = constrain(buffer, ("stage", None, *ACTIVATIONS[1:]))
    state = _empty_stages((S, *inputs.shape[1:]), x.dtype)
    stage_ids = jnp.arange(S)

    def one_stage(w, repeat, x, extras, key):
        block = jax.tree.map(lambda a: a[repeat], w)  # this stage's block for this repeat
        return stage_fn(block, x, extras, key)

    # Rematerialized, so the backward pass keeps each iteration's stage inputs only; without it
    # every iteration kept its own copy of the stage's weights (as the layers' saved inputs).
    stages = jax.checkpoint(
        jax.vmap(one_stage, in_axes=(1, 0, 0, 0, 0), spmd_axis_name="stage"),
        policy=jax.checkpoint_policies.nothing_saveable,
    )

    def iteration(carry, t):
        state, buffer = carry
        work = t - stage_ids
        valid = (work >= 0) & (work < M * R)  # a row of Schedule.mask
        work = jnp.clip(work, 0, M * R - 1)
        micro, repeat = work % M, work // M
        first = lax.dynamic_index_in_dim(buffer, t % M, axis=1, keepdims=False)
        stage_in = jnp.where(_rows(stage_ids == 0), first, state)
        stage_in = jnp.where(_rows(valid), stage_in, 0)  # a bubble computes on zeros
        stage_in = constrain(stage_in, ACTIVATIONS)
        stage_extras = jax.tree.map(lambda e: e[micro], extras)
        keys = None if rng is None else jax.random.split(jax.random.fold_in(rng, t), S)
        out = stages(weights, repeat, stage_in, stage_extras, keys)
        shifted = constrain(jnp.roll(out, 1, axis=0), ACTIVATIONS)  # row 0: the last stage's
        done = (t - S + 1) % M  # the microbatch the last stage just finished
        kept = lax.dynamic_index_in_dim(buffer, done, axis=1, keepdims=False)
        written = jnp.where(t >= S - 1, shifted, kept)  # the last stage's first is at S-1
        buffer = lax.dynamic_update_index_in_dim(buffer, written, done, axis=1)
        return (shifted, buffer), None

    (_, buffer), _ = lax.scan(iteration, (state, buffer), jnp.arange(schedule.iterations))
    return merge_microbatches(buffer[0])


def _rows(flags):
    """[S] flags broadcastable against [S, mb, T, E]."""
    return flags[:, None, None, None]

"""Where a compiled train step's per-device memory goes (`train.py --dry_run`), and
whether it fits the devices, checked before a run's first step.

XLA reports totals (`compiled.memory_analysis()`: arguments, outputs, temporaries).
Here the arguments are split into parameters, optimizer state and batch from their
shardings; the activations saved for the backward pass are the residuals of
`jax.vjp` of the loss on one device's share of a microbatch; and the temporaries
are illustrated by the largest arrays of the compiled program (partitioned
already, so per device), each with the JAX operation that made it and, where it
is recognisable, the knob that shrinks it.
"""

import contextlib
import math
import re

import jax
import numpy as np

from errors import UserError
from model.moe import routed_expert_kernels
from model.moe_dispatch import expert_rows
from training.step import forward_sums

# `%name = f32[8,128,256]{2,1,0} opcode(...)`, with op_name metadata when JAX gave one.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?\S+ = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLED = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_NOT_ALLOCATED = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}

SHRINK = (
    "lower it with train.num_microbatches (more), data.seq_len, model.remat_policy=full, "
    "model.loss_chunk_size or mesh.fsdp (train.py --dry_run shows where it goes; docs/MEMORY.md)."
)

KNOBS = {
    "attention": "model.attention_implementation, model.attention_block_size",
    "logits": "model.loss_chunk_size",
    "saved per layer": "model.remat_policy, train.num_microbatches",
    "mlp": "train.num_microbatches, model.remat_policy",
    "moe": "model.moe_dispatch, model.capacity_factor, train.num_microbatches, mesh.expert",
}


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def largest_arrays(hlo_text: str, count: int = 8) -> list[dict]:
    """The `count` largest distinct arrays a compiled program computes.

    Each: bytes, dtype, shape, op (JAX's op_name, else the HLO opcode) and count
    (arrays of that shape made by that op). Values inside fusions and reducers
    never reach memory and are skipped, as are parameters, tuples and views.
    """
    called = set(_CALLED.findall(hlo_text))
    found, skip = {}, False
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            skip = header.group(1) in called
            continue
        match = _INSTRUCTION.match(line)
        if skip or not match or match.group(3) in _NOT_ALLOCATED:
            continue
        dtype, shape = match.group(1), tuple(int(d) for d in match.group(2).split(",") if d)
        op = _OP_NAME.search(line)
        key = (dtype, shape, _short(op.group(1)) if op else match.group(3))
        found[key] = found.get(key, 0) + 1
    rows = [
        dict(bytes=math.prod(shape) * _itemsize(dtype), dtype=dtype, shape=shape, op=op, count=n)
        for (dtype, shape, op), n in found.items()
    ]
    return sorted(rows, key=lambda r: -r["bytes"])[:count]


def _short(op_name: str) -> str:
    """'jit(step)/transpose(jvp(Transformer))/while/body/closed_call/layers/mlp/...' ->
    'backward/layers/mlp/...'."""
    op_name = re.sub(r"^jit\(step\)/", "", op_name)
    op_name = re.sub(r"transpose\(jvp\([^/]*\)\)/", "backward/", op_name)
    op_name = re.sub(r"jvp\([^/]*\)/", "forward/", op_name)
    return re.sub(r"(while/body|closed_call|checkpoint|rematted_computation)/", "", op_name)


def _itemsize(dtype: str) -> int:
    """HLO element types: pred, s8, bf16, f32, ...: the bits are in the name."""
    bits = re.search(r"\d+", dtype)
    return max(1, int(bits.group()) // 8) if bits else 1


def kind(row: dict, num_layers: int, embed_dim: int, vocab_dims: set[int]) -> str:
    """What an array most likely is (a key of KNOBS), or "" when the op does not say."""
    op, shape = row["op"], row["shape"]
    if "/attn/" in op:
        return "attention"
    if "/mlp/" in op:
        return "mlp"
    if "/moe/" in op:  # the routed tokens, dispatch buffers and expert activations
        return "moe"
    if vocab_dims & set(shape) and embed_dim not in shape:  # not the embedding or its gradient
        return "logits"
    if len(shape) >= 3 and shape[0] == num_layers:
        return "saved per layer"
    return ""


def device_rows(trainer) -> int:
    """One device's rows of a microbatch."""
    config, mesh = trainer.config, trainer.mesh
    rows = config.train.global_batch_size // config.train.num_microbatches
    return rows // (mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"])  # not stage:
    # every pipeline stage sees all the rows (of its own layers)


def saved_activation_bytes(trainer) -> int:
    """Bytes of the loss's residuals for one device's rows of a microbatch (shapes only).

    Parameters kept for the backward pass are counted under parameters, not here;
    tensor parallelism (which also splits some activations) is not applied.
    """
    config = trainer.config
    rows = device_rows(trainer)
    batch = {
        k: jax.ShapeDtypeStruct((rows, v.shape[1]), v.dtype)
        for k, v in trainer.abstract_batch().items()
    }
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), trainer.abstract_model_params
    )
    z_loss = config.train.z_loss_weight
    loss = lambda p, b: forward_sums(trainer.model, p, b, None, z_loss)[0]
    residuals = jax.eval_shape(lambda p, b: jax.vjp(lambda p: loss(p, b), p)[1], params, batch)
    param_like = {(a.shape, a.dtype) for a in jax.tree.leaves(params)}
    return sum(
        math.prod(r.shape) * r.dtype.itemsize
        for r in jax.tree.leaves(residuals)
        if (r.shape, r.dtype) not in param_like
    )


def moe_rows(trainer) -> int:
    """Rows [rows, embed] of each dispatch buffer of one MoE layer on one device (0: dense)."""
    cfg = trainer.model_config
    if not cfg.num_experts:
        return 0
    return expert_rows(cfg, device_rows(trainer) * trainer.seq_len, trainer.mesh.shape["expert"])


def breakdown(trainer, compiled) -> dict:
    """Per-device bytes of parameters, optimizer state, batch and saved activations, and the
    largest arrays."""
    cfg = trainer.model_config
    tensor = trainer.mesh.shape["tensor"]
    vocab_dims = {cfg.vocab_size, -(-cfg.vocab_size // tensor)}
    rows = largest_arrays(compiled.as_text())
    for row in rows:
        row["kind"] = kind(row, cfg.num_layers, cfg.embed_dim, vocab_dims)
    return {
        "params_bytes": shard_bytes(trainer.abstract_state.params),
        "expert_params_bytes": shard_bytes(routed_expert_kernels(trainer.abstract_state.params)),
        "teacher_params_bytes": shard_bytes(trainer.teacher.abstract_params)
        if trainer.teacher
        else 0,
        "opt_state_bytes": shard_bytes(trainer.abstract_state.opt_state),
        "batch_bytes": shard_bytes(trainer.abstract_batch()),
        "saved_activation_bytes": saved_activation_bytes(trainer),
        "moe_rows": moe_rows(trainer),
        "largest_arrays": rows,
    }


def describe(report: dict) -> list[str]:
    """The dry run's memory lines: totals by kind, then the largest arrays with their knobs."""
    gib = lambda n: f"{n / 2**30:8.2f} GiB"
    lines = [
        "Per device:",
        f"  parameters       {gib(report['params_bytes'])}",
        *(
            [f"    of which MoE experts {gib(report['expert_params_bytes'])}  (mesh.expert)"]
            if report.get("expert_params_bytes")
            else []
        ),
        f"  optimizer state  {gib(report['opt_state_bytes'])}",
        f"  batch            {gib(report['batch_bytes'])}",
        f"  temporaries      {gib(report.get('temp_bytes', 0))}  (all the step computes)",
        f"    of which saved for the backward pass {gib(report['saved_activation_bytes'])}  "
        "(activations; model.remat_policy, train.num_microbatches)",
        "Largest arrays (per device, not all live at once; XLA:CPU computes bfloat16 matmuls "
        "in float32 and keeps float32 copies, so a CPU dry run overstates a GPU's or TPU's):",
    ]
    if report.get("moe_rows"):  # before "Largest arrays"
        rows = f"{report['moe_rows']:,} rows x embed per buffer and MoE layer"
        knobs = "model.moe_dispatch, model.capacity_factor, mesh.expert; docs/MOE.md"
        lines.insert(-1, f"  MoE dispatch     {rows}  ({knobs})")
    if report["teacher_params_bytes"]:
        teacher = gib(report["teacher_params_bytes"])
        lines.insert(2, f"  teacher params   {teacher}  (distill.teacher, frozen)")
    for row in report["largest_arrays"]:
        shape = ",".join(map(str, row["shape"]))
        what = f"  [{row['kind']}: {KNOBS[row['kind']]}]" if row["kind"] else ""
        times = f" x{row['count']}" if row["count"] > 1 else ""
        lines.append(f"  {gib(row['bytes'])}  {row['dtype']}[{shape}]{times}  {row['op']}{what}")
    lines.append("What each knob costs and saves: docs/MEMORY.md.")
    return lines


def device_memory_bytes(device) -> int | None:
    """Bytes one device can hold: an accelerator's allocator limit; on CPU, the host's
    available memory shared by its devices (simulated ones share one host); None if unknown."""
    stats = device.memory_stats()  # None on CPU
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024  # in kB
    except (OSError, KeyError, ValueError):  # not Linux
        return None
    return available // len(jax.local_devices(backend="cpu"))


def check_fits(needed_bytes: int, device) -> None:
    """Refuses a step whose compiled memory (`memory_report`'s per-device upper bound) exceeds
    what a device has, before anything is allocated."""
    available = device_memory_bytes(device)
    if needed_bytes and available and needed_bytes > available:
        where = (
            f"the host's available memory shared by {len(jax.local_devices(backend='cpu'))} "
            "CPU devices"
            if device.platform == "cpu"
            else f"{device.device_kind}'s memory for JAX"
        )
        raise UserError(
            f"the train step needs {needed_bytes / 2**30:.2f} GiB per device, more than the "
            f"{available / 2**30:.2f} GiB a device has ({where}); {SHRINK}"
        )


@contextlib.contextmanager
def out_of_memory_as_user_error():
    """A device that runs out of memory anyway (in a compile, a step, an evaluation; the
    device may be shared) ends with XLA's first line and the same advice, no traceback."""
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        xla_line = str(error).splitlines()[0]
        raise UserError(f"a device ran out of memory ({xla_line}); {SHRINK}") from None

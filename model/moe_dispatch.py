"""Routed experts' token dispatch, per batch shard, with explicit expert parallelism.

Under a mesh the dispatch runs in `jax.shard_map` (manual over the mesh axes it uses, the
others left to XLA): each device dispatches only its own tokens. With the experts split
over mesh axes that also split the batch (the default rules: `expert`), a device sends each
expert shard its assignments with `jax.lax.all_to_all`, runs its local experts on what it
receives, and the results come back by the same all-to-all. Tensor parallelism splits each
expert's hidden width (`moe_mlp`); the partial outputs are summed with a psum. Where the
expert axes do not split the batch (rules overridden, or a decoding batch too small to
split), the expert weights are gathered and every device runs every expert on its tokens.
Without a mesh (or with every used axis of size 1) it is a plain call of the same code.

The exchange has a fixed size in both modes: `jax.lax.ragged_all_to_all` would send only
the rows used, but XLA:CPU in the pinned JAX does not implement it, so dropless mode sends
each expert shard a worst-case block (every local token's assignments to that shard's
experts: tokens x min(k, experts per shard) rows). Capacity mode sends [experts, slots]
buffers, slots computed from the shard's own tokens.
"""

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from sharding.rules import rule_axes


def capacity(num_tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Slots per expert in capacity mode: ceil(factor * N * k / E), between 1 and N."""
    return max(1, min(num_tokens, math.ceil(factor * num_tokens * k / num_experts)))


def queue_positions(experts: jax.Array, num_experts: int) -> jax.Array:
    """[N, k] -> each assignment's place in its expert's queue, in flattened order n*k + j."""
    one_hot = jax.nn.one_hot(experts.reshape(-1), num_experts, dtype=jnp.int32)
    positions = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
    return positions.reshape(experts.shape)


def swiglu(x, gate, up, down, matmul):
    """The experts' MLP: down(silu(gate(x)) * up(x)), with `matmul(x, w)` per expert."""
    return matmul(nn.silu(matmul(x, gate)) * matmul(x, up), down)


class Layout(NamedTuple):
    """Mesh axes (of size > 1) that split the batch rows, exchange tokens between expert
    shards (a subset of `tokens`; () = no exchange) and split the experts' hidden width."""

    tokens: tuple = ()
    experts: tuple = ()
    hidden: tuple = ()


def _axes(mesh, logical: str, size: int) -> tuple:
    """The mesh axes the rules give `logical`, in order, while their product divides `size`."""
    kept, product = [], 1
    for axis in rule_axes(nn.logical_to_mesh_axes((logical,))[0]):
        if axis in mesh.axis_names and mesh.shape[axis] > 1:
            if size % (product * mesh.shape[axis]) == 0:
                kept.append(axis)
                product *= mesh.shape[axis]
    return tuple(kept)


def layout(mesh, batch: int, num_experts: int, width: int) -> Layout:
    """The current mesh's Layout for `batch` rows and [num_experts, ., width] kernels."""
    if mesh.empty:
        return Layout()
    tokens = _axes(mesh, "batch", batch)
    experts = _axes(mesh, "experts", num_experts)
    exchange = experts if set(experts) <= set(tokens) else ()  # else: gather the experts
    return Layout(tokens, exchange, _axes(mesh, "moe_mlp", width))


def dispatch(x, experts, weights, gate, up, down, mode: str, factor: float):
    """Tokens x [batch, length, D], their experts and weights [batch, length, k], the expert
    kernels [E, D, F], [E, D, F], [E, F, D] -> (output [batch, length, D], kept [.., k])."""
    mesh = jax.sharding.get_abstract_mesh()
    split = layout(mesh, x.shape[0], gate.shape[0], gate.shape[-1])
    shards = math.prod(mesh.shape[a] for a in split.experts)
    local = functools.partial(_local, split=split, shards=shards, mode=mode, factor=factor)
    if not (split.tokens or split.hidden):
        return local(x, experts, weights, gate, up, down)
    rows = PartitionSpec(split.tokens or None)
    kernel_in = PartitionSpec(split.experts or None, None, split.hidden or None)
    kernel_out = PartitionSpec(split.experts or None, split.hidden or None, None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, rows, rows, kernel_in, kernel_in, kernel_out),
        out_specs=(rows, rows),
        axis_names=_manual_axes(mesh, split),
    )(x, experts, weights, gate, up, down)


def _manual_axes(mesh, split) -> set:
    """The axes the dispatch splits over, and those of size 1: XLA:CPU fails to compile a
    bfloat16 backward pass whose shard_map leaves size-1 axes automatic (reducers carry
    sharding annotations). Other axes (e.g. stage) stay automatic."""
    manual = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual}
    size_one = {a for a in mesh.axis_names if mesh.shape[a] == 1}
    return (set(split.tokens + split.hidden) | size_one) - manual


def _local(x, experts, weights, gate, up, down, split, shards, mode, factor):
    """One device's tokens through the experts (exchanged over `split.experts`)."""
    batch, length, embed = x.shape
    k = experts.shape[-1]
    rows, chosen = x.reshape(-1, embed), experts.reshape(-1, k)
    kernels = (gate, up, down)
    if mode == "dropless":
        out, kept = _dropless(rows, chosen, kernels, split.experts, shards)
    else:
        out, kept = _capacity(rows, chosen, kernels, split.experts, shards, factor)
    y = jnp.einsum("nkd,nk->nd", out, weights.reshape(-1, k))
    if split.hidden:  # each device holds a slice of moe_mlp: partial sums
        y = jax.lax.psum(y, split.hidden)
    return y.reshape(batch, length, embed), kept.reshape(batch, length, k)


def _exchange(blocks, axes):
    """[shards, ...]: block j goes to expert shard j, which receives [sources, ...]."""
    return jax.lax.all_to_all(blocks, axes, 0, 0, tiled=True) if axes else blocks


def _capacity(x, experts, kernels, axes, shards, factor):
    """Through [E, slots, D] buffers, slots from this shard's tokens: assignments past an
    expert's slots, in order of position here, are dropped. -> ([N, k, D], kept [N, k])."""
    n, k = experts.shape
    per_shard, embed = kernels[0].shape[0], x.shape[-1]
    num_experts = per_shard * shards
    slots = capacity(n, k, num_experts, factor)
    position = queue_positions(experts, num_experts)
    kept = position < slots
    tokens = jnp.broadcast_to(x[:, None], (n, k, embed))
    buffer = jnp.zeros((num_experts, slots, embed), x.dtype)
    # Past `slots`: out of range, dropped; (expert, position) pairs are unique.
    buffer = buffer.at[experts, position].set(tokens, mode="drop", unique_indices=True)
    received = _exchange(buffer.reshape(shards, per_shard, slots, embed), axes)
    batched = received.swapaxes(0, 1).reshape(per_shard, shards * slots, embed)
    out = swiglu(batched, *kernels, lambda a, w: jnp.einsum("ecd,edf->ecf", a, w))
    out = out.reshape(per_shard, shards, slots, embed).swapaxes(0, 1)
    back = _exchange(out, axes).reshape(num_experts, slots, embed)
    gathered = back[experts, jnp.minimum(position, slots - 1)]
    return jnp.where(kept[..., None], gathered, 0), kept


def _dropless(x, experts, kernels, axes, shards):
    """Every assignment through its expert, grouped by expert for one `ragged_dot` per
    kernel. -> ([N, k, D], kept: all True)."""
    n, k = experts.shape
    per_shard, embed = kernels[0].shape[0], x.shape[-1]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    counts = jnp.bincount(flat, length=per_shard * shards).astype(jnp.int32)
    # To each expert shard, its contiguous run of the sorted assignments, in a block of the
    # most it can be (every token sends at most min(k, per_shard) there).
    block = n * min(k, per_shard)
    sizes = counts.reshape(shards, per_shard).sum(axis=1)
    starts = jnp.cumsum(sizes) - sizes
    slot = jnp.arange(block)
    used = slot < sizes[:, None]
    assignment = order[jnp.minimum(starts[:, None] + slot, n * k - 1)]  # [shards, block]
    send = jnp.where(used[..., None], x[assignment // k], 0)
    received = _exchange(send, axes)  # [sources, block, D], each grouped by local expert
    counts_in = _exchange(counts.reshape(shards, per_shard), axes)  # [sources, per_shard]
    out = _grouped(received.reshape(-1, embed), counts_in, kernels)
    back = _exchange(out.reshape(shards, block, embed), axes)  # [shard, block, D], as sent
    to = jnp.where(used, assignment, n * k).reshape(-1)  # padding: out of range, dropped
    out = jnp.zeros((n * k, embed), back.dtype)
    out = out.at[to].set(back.reshape(-1, embed), mode="drop", unique_indices=True)
    return out.reshape(n, k, embed), jnp.ones((n, k), bool)


def _grouped(rows, counts, kernels):
    """The experts on [sources x block, D] rows, each source's block grouped by local expert
    (`counts` [sources, per_shard] rows, then padding): regrouped into one run per expert
    across the sources (padding last) for `ragged_dot`, and put back in place."""
    ragged = lambda a, w: jax.lax.ragged_dot(a, w, counts.sum(axis=0))
    if counts.shape[0] == 1:  # one source: grouped already
        return swiglu(rows, *kernels, ragged)
    sources, block = counts.shape[0], rows.shape[0] // counts.shape[0]
    ends = jnp.cumsum(counts, axis=1)  # a row's expert = how many groups end at or before it
    marks = jnp.zeros((sources, block + 1), jnp.int32).at[jnp.arange(sources)[:, None], ends]
    regroup = jnp.argsort(jnp.cumsum(marks.add(1), axis=1)[:, :block].reshape(-1), stable=True)
    out = swiglu(jnp.take(rows, regroup, axis=0), *kernels, ragged)
    return jnp.zeros_like(out).at[regroup].set(out, unique_indices=True)  # a permutation


def expert_rows(config, tokens: int, shards: int) -> int:
    """Rows one device's experts run per MoE layer, `tokens` its batch shard's, `shards` the
    expert shards: capacity mode E x slots; dropless, the fixed-size exchange's worst case
    (shards x tokens x min(k, experts per shard); tokens x k without expert parallelism)."""
    k, experts = config.experts_per_token, config.num_experts
    if config.moe_dispatch == "capacity":
        return experts * capacity(tokens, k, experts, config.capacity_factor)
    return shards * tokens * min(k, experts // shards)

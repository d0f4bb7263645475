"""Splash attention (TPU Pallas kernel) behind attention_ops.attend's contract.

Written against `jax.experimental.pallas.ops.tpu.splash_attention`: a
`MultiHeadMask` of `CausalMask`s (model.attention_mask=causal) or `FullMask`s
(bidirectional; a per-row prefix is no static mask, attend() runs "prefix"
blockwise), `SegmentIds` for packed documents (the same rule as attend:
equal ids attend, padding 0 attends to padding), grouped-query heads handled by
the kernel itself. A Pallas call cannot be partitioned by GSPMD, so the kernel
runs under `jax.shard_map` over the current mesh, each device on its own batch
rows and heads (the logical-axis rules say which mesh axes those are).

Training shapes only (q_len == k_len, offset 0, length a multiple of the block);
attend() sends decoding shapes to the reference. `interpret=True` runs the
kernel in Pallas' interpreter on any backend: the tests check it on CPU that way.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from errors import UserError
from sharding.rules import rule_axes

ACTIVATION_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")


def splash_attention(
    query,
    key,
    value,
    query_segment_ids,
    key_segment_ids,
    block_size,
    mask_kind="causal",
    interpret=False,
    scale=None,
):
    """[batch, length, heads, head_dim] output of causal or bidirectional (`mask_kind`),
    segment-masked attention; q.k scaled by `scale` (None: head_dim ** -0.5)."""
    batch, length = query.shape[:2]
    block = min(block_size, length)
    if length % block:
        raise UserError(
            f"model.attention_implementation=splash: the sequence length {length} must be a "
            f"multiple of model.attention_block_size={block_size} (or use blockwise)."
        )
    ones = jnp.ones((batch, length), jnp.int32)
    query_segment_ids = ones if query_segment_ids is None else query_segment_ids
    key_segment_ids = ones if key_segment_ids is None else key_segment_ids
    scale = 1.0 / jnp.sqrt(jnp.float32(query.shape[-1])) if scale is None else scale
    query = query * jnp.asarray(scale, jnp.float32).astype(query.dtype)  # the kernel does not

    def local(q, k, v, q_seg, k_seg):  # one device's rows and heads
        kernel = _kernel(q.shape[2], q.shape[1], block, mask_kind, interpret)
        segments = splash.SegmentIds(q=q_seg, kv=k_seg)
        out = jax.vmap(kernel)(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), segments)
        return out.swapaxes(1, 2)

    args = (query, key, value, query_segment_ids, key_segment_ids)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(*args)
    spec, kv_spec = (_mesh_spec(mesh, a) for a in (ACTIVATION_AXES, KV_AXES))
    rows = PartitionSpec(spec[0], None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, kv_spec, kv_spec, rows, rows),
        out_specs=spec,
        check_vma=False,
    )(*args)


def _mesh_spec(mesh, logical_axes) -> PartitionSpec:
    """The rules' PartitionSpec of `logical_axes`, keeping only axes this mesh has (shard_map
    must name mesh axes; a mesh built by hand may lack e.g. `expert` or `stage`)."""

    def present(axes):
        kept = tuple(a for a in rule_axes(axes) if a in mesh.axis_names)
        return kept if len(kept) > 1 else (kept[0] if kept else None)

    return PartitionSpec(*(present(a) for a in nn.logical_to_mesh_axes(logical_axes)))


def _kernel(heads, length, block, mask_kind, interpret):
    head_mask = {"causal": splash.CausalMask, "bidirectional": splash.FullMask}[mask_kind]
    mask = splash.MultiHeadMask([head_mask((length, length)) for _ in range(heads)])
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )

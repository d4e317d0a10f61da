"""Splash attention for packed rows on TPU: jax's Pallas kernel, fed segment ids.

`model.attention=splash` runs jax's splash attention kernel (`jax.experimental.pallas.ops.tpu
.splash_attention`, the kernel MaxText uses on TPU). It reads the rows' segment ids instead of
a dense [B,1,T,T] mask and keeps O(T) memory per head (no [T,T] scores in HBM). It skips the
blocks above the diagonal; blocks that only the segment ids hide are computed and masked. Its
mask is "same segment and key row <= query row", which is `layers.decoder_mask` when each
segment id labels one contiguous document whose positions increase with the row: every batch
the data pipeline packs, padding (segment 0, at the end of a row) included.

Rows are padded at the end to a multiple of the block (keys after a query are never visible,
so the padding changes nothing); the kernel works per batch row on [N,T,H] (vmapped), with
grouped kv heads. Under a mesh it runs in `jax.shard_map`: batch rows split as the batch is,
query heads over `tensor` when it divides them (kv heads too, or each query head gets a copy
of its kv head when `tensor` does not divide the kv heads). On other backends the same kernel
runs in Pallas' interpret mode: exact and slow, for tests; `ease_jax.init_from` refuses the
setting off TPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from ease_jax import sharding

BLOCK = 512  # the largest query and key block (MaxText's default sa_block_*)


def block_size(T: int) -> int:
  """The kernel's block for rows of T tokens: the largest of 512, 256, 128 that divides T
  rounded up to a multiple of 128 (so at most 127 rows of padding)."""
  padded = 128 * math.ceil(T / 128)
  return next(b for b in (BLOCK, 256, 128) if padded % b == 0)


@functools.lru_cache(maxsize=16)
def _kernel(num_heads: int, T: int, block: int, interpret: bool):
  """A causal splash kernel for [num_heads, T, H] queries, built once per shape: building one
  takes 0.1-0.3 s (T = 4096-8192), once per layer and trace otherwise. Its mask tables are
  made eagerly and kept as NumPy arrays: constants of any trace, on no particular device."""
  with jax.ensure_compile_time_eval():
    mask = sa.MultiHeadMask([sa.CausalMask((T, T)) for _ in range(num_heads)])
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    kernel = sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                interpret=interpret)
  return jax.tree.map(np.asarray, kernel)


def _attend(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT):
  """The kernel on this device's rows and heads."""
  _, N, T, _ = q_BxNxTxH.shape
  kernel = _kernel(N, T, block_size(T), jax.default_backend() != "tpu")
  ids = sa.SegmentIds(q=segment_ids_BxT, kv=segment_ids_BxT)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(
      q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, ids)


def _heads_split(num_heads: int, mesh) -> bool:
  t = mesh.shape["tensor"]
  return t > 1 and num_heads % t == 0


def splash_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                     segment_ids_BxT: jax.Array) -> jax.Array:
  """Causal attention inside each segment (see the module docstring): [B,T,N,H]."""
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxTxKxH.shape[2]
  block = block_size(T)
  pad = block * math.ceil(T / block) - T
  q = (q_BxTxNxH * jnp.asarray(H ** -0.5, q_BxTxNxH.dtype)).transpose(0, 2, 1, 3)
  k, v = k_BxTxKxH.transpose(0, 2, 1, 3), v_BxTxKxH.transpose(0, 2, 1, 3)
  ids = segment_ids_BxT.astype(jnp.int32)
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
    ids = jnp.pad(ids, ((0, 0), (0, pad)))
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or set(mesh.axis_names) != set(sharding.MESH_AXES):
    out = _attend(q, k, v, ids)
  else:
    heads = None
    if _heads_split(N, mesh):
      heads = "tensor"
      if not _heads_split(K, mesh):  # one kv head per query head: split as q is
        k, v = (jnp.repeat(x, N // K, axis=1) for x in (k, v))
    batch = sharding.logical_to_spec(("batch",), (B,), mesh)[0]
    x_spec, ids_spec = P(batch, heads, None, None), P(batch, None)
    out = jax.shard_map(_attend, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, ids_spec),
                        out_specs=x_spec, check_vma=False)(q, k, v, ids)
  return out[:, :, :T].transpose(0, 2, 1, 3)

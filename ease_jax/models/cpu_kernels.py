"""Hand-written XLA:CPU paths of the decoder's layers, selected in one place: `active()`.

Left to itself XLA:CPU lowers some products and elementwise chains far slower than their
FLOPs allow (measured in tools/bench/train_vs_reference.py; reasons at each function). These
paths compute the same values and gradients as the plain ones in `layers` (tests/test_model.py
checks each against its plain form); accelerators never take them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def active() -> bool:
  """Whether the CPU paths run: on XLA:CPU, the backend the program is traced for."""
  return jax.default_backend() == "cpu"


def swiglu_math(gate_up_BxTx2xF: jax.Array) -> jax.Array:
  """silu(gate) * up of a stacked [B, T, 2, F] pair, in float32, returned in the input's dtype
  (XLA:CPU rounds every bf16 elementwise op; one cast is cheaper)."""
  gate, up = (gate_up_BxTx2xF[:, :, i].astype(jnp.float32) for i in (0, 1))
  return (jax.nn.silu(gate) * up).astype(gate_up_BxTx2xF.dtype)


def linear(x_BxTxD: jax.Array, w_DxN: jax.Array, out_dtype: jnp.dtype,
           narrow_transpose: bool) -> jax.Array:
  """`layers.linear` on XLA:CPU: x @ w in `out_dtype`, through a custom_vjp when it pays.

  As elsewhere, the output gradient is cast to x's dtype before the backward products. Also:
  - Low-precision products accumulate in float32 and are cast after. XLA:CPU runs
    bf16 x bf16 -> f32 natively (AMX where present) but turns bf16 x bf16 -> bf16 into
    converts and a float32 product.
  - With `narrow_transpose`, the float32 weight gradient multiplies an explicitly
    transposed x. Left to itself XLA:CPU transposed the (wider) output gradient instead:
    12% slower on the MLP's gate/up, 15% on the q/k/v projections and 2x slower on the
    tied LM head with its cross-entropy (fwd+bwd microbenchmarks of the benchmark's
    shapes); slower on the down projection, whose float32 products therefore stay plain.
  """
  if narrow_transpose or jnp.dtype(x_BxTxD.dtype).itemsize < 4:
    return _linear(x_BxTxD, w_DxN, out_dtype, narrow_transpose)
  return jnp.einsum("btd,dn->btn", x_BxTxD, w_DxN, preferred_element_type=out_dtype)


def _accumulate_dtype(dtype) -> jnp.dtype:
  """The product dtype asked of XLA:CPU: f32 for low precision (then cast)."""
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _linear(x_BxTxD, w_DxN, out_dtype, narrow_transpose):
  del narrow_transpose
  acc = _accumulate_dtype(out_dtype)
  return jnp.einsum("btd,dn->btn", x_BxTxD, w_DxN, preferred_element_type=acc).astype(out_dtype)


def _linear_fwd(x_BxTxD, w_DxN, out_dtype, narrow_transpose):
  return _linear(x_BxTxD, w_DxN, out_dtype, narrow_transpose), (x_BxTxD, w_DxN)


def _linear_bwd(out_dtype, narrow_transpose, res, d_BxTxN):
  x_BxTxD, w_DxN = res
  d_BxTxN = d_BxTxN.astype(x_BxTxD.dtype)
  acc = _accumulate_dtype(x_BxTxD.dtype)
  if narrow_transpose and x_BxTxD.dtype == jnp.float32:
    # (Not for bfloat16: XLA:CPU ran the product of a bf16 x^T behind the barrier in f32.)
    x_DxM = jax.lax.optimization_barrier(x_BxTxD.reshape(-1, x_BxTxD.shape[-1]).T)
    d_w = jnp.dot(x_DxM, d_BxTxN.reshape(-1, d_BxTxN.shape[-1]), preferred_element_type=acc)
  else:
    d_w = jnp.einsum("btd,btn->dn", x_BxTxD, d_BxTxN, preferred_element_type=acc)
  d_x = jnp.einsum("btn,dn->btd", d_BxTxN, w_DxN, preferred_element_type=acc)
  return d_x.astype(x_BxTxD.dtype), d_w.astype(w_DxN.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


_NEG = float(jnp.finfo(jnp.float32).min)


def _keys(k_BxTxKxH, start: int, hi: int):
  """Keys (or values) [start, hi) as [B,K,S,H], transposed inside the tile: transposed once
  outside, XLA:CPU made the transpose a layout change and copied all T keys in every
  `lax.switch` branch (8% of the attention's forward and backward at T=904)."""
  return k_BxTxKxH.transpose(0, 2, 1, 3)[:, :, start:hi]


def _tile_fwd(q, k, v, mask, *, lo: int, hi: int, start: int):
  """Queries [lo, hi) ([B,K,t,G,H]) against keys [start, hi) of k/v [B,T,K,H] under the
  [B,1,T,T] mask: (out [B,K,t,G,H], logsumexp [B,K,t,G]). The G query heads of a kv head
  are one [t*G, H] matrix, so every product is a plain batched matmul (no repeated keys)."""
  B, K, t, G, H = q.shape
  ks, vs = _keys(k, start, hi), _keys(v, start, hi)
  s = jnp.einsum("bkqh,bksh->bkqs", q.reshape(B, K, t * G, H), ks,
                 preferred_element_type=jnp.float32).reshape(B, K, t, G, -1)
  s = jnp.where(mask[:, :, lo:hi, None, start:hi], s, _NEG)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bkqs,bksh->bkqh", p.reshape(B, K, t * G, -1).astype(v.dtype), vs,
                   preferred_element_type=jnp.float32).reshape(B, K, t, G, H)
  return (out / l).astype(q.dtype), (m + jnp.log(l))[..., 0]


def _tile_bwd(q, k, v, mask, delta, lse, d_out, *, lo: int, hi: int, start: int):
  """Gradients of `_tile_fwd` from the saved logsumexp (`delta` = rowsum(d_out * out));
  dk, dv in float32 (summed over blocks), padded back to [B,K,hi,H]."""
  B, K, t, G, H = q.shape
  ks, vs = _keys(k, start, hi), _keys(v, start, hi)
  q_f, do_f = q.reshape(B, K, t * G, H), d_out.reshape(B, K, t * G, H)
  # Keys-major [S, t*G] tiles, so dv and dk are plain matmuls: XLA:CPU ran the
  # transposed-left form ("bkqs,bkqh->bksh") through a slow generic dot.
  s_t = jnp.einsum("bksh,bkqh->bksq", ks, q_f, preferred_element_type=jnp.float32)
  mask_t = jnp.swapaxes(mask[:, :, lo:hi, start:hi], 2, 3)[..., None]  # [B,1,S,t,1]
  s_t = jnp.where(mask_t, s_t.reshape(B, K, -1, t, G), _NEG).reshape(s_t.shape)
  p_t = jnp.exp(s_t - lse.reshape(B, K, 1, t * G))
  dv = jnp.einsum("bksq,bkqh->bksh", p_t.astype(v.dtype), do_f,
                  preferred_element_type=jnp.float32)
  dp_t = jnp.einsum("bksh,bkqh->bksq", vs, do_f, preferred_element_type=jnp.float32)
  ds_t = p_t * (dp_t - delta.reshape(B, K, 1, t * G))
  dk = jnp.einsum("bksq,bkqh->bksh", ds_t.astype(q.dtype), q_f,
                  preferred_element_type=jnp.float32)
  # Cast before the transpose: a bf16 cast after the barrier became an f32 product.
  ds = jax.lax.optimization_barrier(jnp.swapaxes(ds_t.astype(q.dtype), 2, 3))
  dq = jnp.einsum("bkqs,bksh->bkqh", ds, ks, preferred_element_type=jnp.float32)
  pad = ((0, 0), (0, 0), (start, 0), (0, 0))
  return dq.reshape(q.shape).astype(q.dtype), jnp.pad(dk, pad), jnp.pad(dv, pad)


def _blocks(T: int, block: int):
  """(lo, hi, the key-tile starts it may begin at) of each query block."""
  ends = [min(T, lo + block) for lo in range(0, T, block)]
  return [(lo, hi, range(0, hi, block)) for lo, hi in zip(range(0, T, block), ends)]


def _first_tile(mask_Bx1xTxS, block: int) -> jax.Array:
  """The first key tile any query of the block sees; every earlier tile is fully masked."""
  return (jnp.min(jnp.argmax(mask_Bx1xTxS[:, 0], axis=-1)) // block).astype(jnp.int32)


def _tiles(fn, mask, lo: int, hi: int, starts, block: int):
  """`fn` for query block [lo, hi), switched on its first visible key tile."""
  index = _first_tile(mask[:, :, lo:hi, :hi], block)
  branches = [functools.partial(fn, lo=lo, hi=hi, start=s) for s in starts]
  return lambda *operands: jax.lax.switch(index, branches, *operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block_attention(q_BxKxTxGxH, k_BxTxKxH, v_BxTxKxH, mask_Bx1xTxT, block):
  return _block_attention_fwd(q_BxKxTxGxH, k_BxTxKxH, v_BxTxKxH, mask_Bx1xTxT, block)[0]


def _block_attention_fwd(q, k, v, mask, block):
  outs, lses = [], []
  for lo, hi, starts in _blocks(q.shape[2], block):
    out, lse = _tiles(_tile_fwd, mask, lo, hi, starts, block)(q[:, :, lo:hi], k, v, mask)
    outs.append(out)
    lses.append(lse)
  out, lse = jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)
  return out, (q, k, v, mask, out, lse)


def _block_attention_bwd(block, res, d_out):
  q, k, v, mask, out, lse = res
  B, T, K, H = k.shape
  dqs, dk, dv = [], jnp.zeros((B, K, T, H), jnp.float32), jnp.zeros((B, K, T, H), jnp.float32)
  # Once for all blocks, behind a barrier: XLA:CPU otherwise fused this reduction into each
  # tile's [t*G, S] elementwise math and recomputed it per score.
  delta = jax.lax.optimization_barrier(
      jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1))
  for lo, hi, starts in _blocks(q.shape[2], block):
    dq, dk_i, dv_i = _tiles(_tile_bwd, mask, lo, hi, starts, block)(
        q[:, :, lo:hi], k, v, mask, delta[:, :, lo:hi], lse[:, :, lo:hi], d_out[:, :, lo:hi])
    dqs.append(dq)
    dk, dv = dk.at[:, :, :hi].add(dk_i), dv.at[:, :, :hi].add(dv_i)
  dk, dv = (d.transpose(0, 2, 1, 3).astype(k.dtype) for d in (dk, dv))
  return jnp.concatenate(dqs, axis=2), dk, dv, None


_block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)


MAX_QUERY_BLOCKS = 8


def query_block(T: int) -> int:
  """The query block for length T: 128, or a larger multiple of 128 so that T has at most
  `MAX_QUERY_BLOCKS` blocks. Block i compiles one branch per possible first key tile, so
  compile time grows with the square of the block count: one layer's attention fwd+bwd at
  T=4096 compiled in 176 s with blocks of 128 and 5.4 s with 512 (and ran 1.20 vs 0.64 s)."""
  return 128 * max(1, math.ceil(T / (128 * MAX_QUERY_BLOCKS)))


def block_causal_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                           mask_Bx1xTxT: jax.Array, block: int | None = None) -> jax.Array:
  """Softmax attention in query blocks over only the key tiles they can see: [B,T,N,H].

  Block i reads keys up to its own end (needs a lower-triangular mask, `decoder_mask`),
  starting at the first tile any of its queries sees (a `lax.switch` over static starts),
  so causal and cross-document tiles are skipped. Exact: skipped tiles are fully masked.
  The backward recomputes probabilities from the saved log-sum-exp, like flash attention.
  Queries are laid out [B,K,T,G,H] so a query block is one contiguous slice per kv head.
  `block` defaults to `query_block(T)`.
  """
  B, T, N, H = q_BxTxNxH.shape
  block = block or query_block(T)
  K = k_BxTxKxH.shape[2]
  q_BxTxKxGxH = (q_BxTxNxH * jnp.asarray(H ** -0.5, q_BxTxNxH.dtype)).reshape(B, T, K, N // K, H)
  out = _block_attention(q_BxTxKxGxH.transpose(0, 2, 1, 3, 4), k_BxTxKxH, v_BxTxKxH,
                         mask_Bx1xTxT, block)
  return out.transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)  # query head n = k * G + g


@jax.custom_vjp
def swiglu(gate_up_BxTx2xF: jax.Array) -> jax.Array:
  """`layers.swiglu` with a hand-written backward (see `_swiglu_bwd`)."""
  return swiglu_math(gate_up_BxTx2xF)


def _swiglu_fwd(gate_up_BxTx2xF):
  return swiglu(gate_up_BxTx2xF), gate_up_BxTx2xF


def _swiglu_bwd(gate_up_BxTx2xF, d_BxTxF):
  gate, up = (gate_up_BxTx2xF[:, :, i].astype(jnp.float32) for i in (0, 1))
  d_BxTxF, sig = d_BxTxF.astype(jnp.float32), jax.nn.sigmoid(gate)
  d_gate_up = jnp.stack([d_BxTxF * up * sig * (1 + gate * (1 - sig)), d_BxTxF * gate * sig], axis=2)
  # The weight gradient needs this transposed; without the barrier XLA:CPU fuses the
  # elementwise math into that transpose, which ran ~10x slower than computing then copying.
  return (jax.lax.optimization_barrier(d_gate_up.astype(gate_up_BxTx2xF.dtype)),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)

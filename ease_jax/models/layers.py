"""Decoder building blocks: RMSNorm, rotary embeddings, attention, gated MLP.

Shapes use the letters defined in `DecoderConfig`'s docstring (B, T, S, D, N, K,
H, F, V). Every parameter is an `nnx.Param` whose `logical_axes` metadata names
its dimensions; `ease_jax.sharding` maps those names to mesh axes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
  """Maps a config dtype name to a jnp dtype."""
  return _DTYPES[name]


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype: jnp.dtype) -> nnx.Param:
  """A parameter initialised by `init` that carries its logical axis names."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
  """Root-mean-square norm, computed in float32 like transformers."""

  def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype, *, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> jnp.ndarray:
  """Inverse frequencies as transformers computes them, with optional scaling."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  kind = (scaling or {}).get("rope_type", "default")
  if kind == "default":
    return inv_freq
  if kind == "linear":
    return inv_freq / scaling["factor"]
  if kind == "llama3":
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)
  raise ValueError(f"unsupported rope scaling type {kind!r}")


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array,
               inv_freq: jnp.ndarray) -> jax.Array:
  """Rotates q or k in the rotate-half layout transformers uses (no weight permutation)."""
  freqs_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  emb_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
  cos = jnp.cos(emb_BxTxH)[:, :, None, :].astype(x_BxTxNxH.dtype)
  sin = jnp.sin(emb_BxTxH)[:, :, None, :].astype(x_BxTxNxH.dtype)
  half = x_BxTxNxH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
  return x_BxTxNxH * cos + rotated * sin


def attention_mask(q_segment_BxT: jax.Array, kv_segment_BxS: jax.Array,
                   q_pos_BxT: jax.Array, kv_pos_BxS: jax.Array) -> jax.Array:
  """Causal inside a document, never across documents: bool[B, 1, T, S]."""
  same_doc = q_segment_BxT[:, :, None] == kv_segment_BxS[:, None, :]
  causal = kv_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]
  return (same_doc & causal)[:, None, :, :]


def decoder_mask(segment_ids_BxT: jax.Array, positions_BxT: jax.Array) -> jax.Array:
  """`attention_mask` of a packed row that also never lets a row see a later row: bool[B,1,T,T].

  For documents packed whole and in order this changes nothing (position order is row
  order); it only stops padding (segment 0, positions 0) from seeing later padding, which
  makes the mask lower-triangular so `block_causal_attention` is exact.
  """
  rows_T = jnp.arange(segment_ids_BxT.shape[1])
  in_order_TxT = rows_T[None, :] <= rows_T[:, None]
  mask = attention_mask(segment_ids_BxT, segment_ids_BxT, positions_BxT, positions_BxT)
  return mask & in_order_TxT


def _scores(q_BxKxGxTxH, k_BxKxSxH, mask_Bx1xTxS):
  """Masked float32 scores [B,K,G,T,S]; the G query heads of a kv head as one [G*T, H] matrix
  (a plain batched matmul, no repeated keys)."""
  B, K, G, T, H = q_BxKxGxTxH.shape
  s = jnp.einsum("bkqh,bksh->bkqs", q_BxKxGxTxH.reshape(B, K, G * T, H), k_BxKxSxH,
                 preferred_element_type=jnp.float32).reshape(B, K, G, T, -1)
  return jnp.where(mask_Bx1xTxS[:, :, None], s, jnp.finfo(jnp.float32).min)


def _grouped(a_BxKxGxTxS, b_BxKxSxH, spec: str):
  """einsum over [B,K,G*T,S] and [B,K,S,H] views, float32 accumulation."""
  B, K, G, T, S = a_BxKxGxTxS.shape
  return jnp.einsum(spec, a_BxKxGxTxS.reshape(B, K, G * T, S), b_BxKxSxH,
                    preferred_element_type=jnp.float32)


def _tile_fwd(q, k, v, mask, start: int):
  """Attention of one query block to keys [start, S): (out [B,K,G,T,H], logsumexp [B,K,G,T])."""
  s = _scores(q, k[:, :, start:], mask[..., start:])
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  B, K, G, T, H = q.shape
  out = _grouped(p.astype(v.dtype), v[:, :, start:], "bkqs,bksh->bkqh").reshape(B, K, G, T, H)
  return (out / l).astype(q.dtype), (m + jnp.log(l))[..., 0]


def _tile_bwd(q, k, v, mask, out, lse, d_out, start: int):
  """Gradients of `_tile_fwd` (probabilities recomputed); dk, dv padded back to [B,K,S,H]."""
  B, K, G, T, H = q.shape
  ks, vs = k[:, :, start:], v[:, :, start:]
  p = jnp.exp(_scores(q, ks, mask[..., start:]) - lse[..., None])
  do_q = d_out.reshape(B, K, G * T, H)
  dv = jnp.einsum("bkqs,bkqh->bksh", p.reshape(B, K, G * T, -1).astype(v.dtype), do_q,
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum("bkqh,bksh->bkqs", do_q, vs, preferred_element_type=jnp.float32)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  ds = p * (dp.reshape(p.shape) - delta)
  dq = _grouped(ds.astype(q.dtype), ks, "bkqs,bksh->bkqh").reshape(q.shape)
  dk = jnp.einsum("bkqs,bkqh->bksh", ds.reshape(B, K, G * T, -1).astype(q.dtype),
                  q.reshape(B, K, G * T, H), preferred_element_type=jnp.float32)
  pad = ((0, 0), (0, 0), (start, 0), (0, 0))
  return dq.astype(q.dtype), jnp.pad(dk, pad).astype(k.dtype), jnp.pad(dv, pad).astype(v.dtype)


def _blocks(T: int, block: int):
  """(lo, hi, the key-tile starts it may begin at) of each query block."""
  ends = [min(T, lo + block) for lo in range(0, T, block)]
  return [(lo, hi, range(0, hi, block)) for lo, hi in zip(range(0, T, block), ends)]


def _first_tile(mask_Bx1xTxS, block: int) -> jax.Array:
  """The first key tile any query of the block sees; every earlier tile is fully masked."""
  return (jnp.min(jnp.argmax(mask_Bx1xTxS[:, 0], axis=-1)) // block).astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block_attention(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, mask_Bx1xTxT, block):
  return _block_attention_fwd(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, mask_Bx1xTxT, block)[0]


def _block_attention_fwd(q, k, v, mask, block):
  outs, lses = [], []
  for lo, hi, starts in _blocks(q.shape[3], block):
    m = mask[:, :, lo:hi, :hi]
    out, lse = jax.lax.switch(_first_tile(m, block),
                              [functools.partial(_tile_fwd, start=s) for s in starts],
                              q[:, :, :, lo:hi], k[:, :, :hi], v[:, :, :hi], m)
    outs.append(out)
    lses.append(lse)
  out, lse = jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)
  return out, (q, k, v, mask, out, lse)


def _block_attention_bwd(block, res, d_out):
  q, k, v, mask, out, lse = res
  dqs, dk, dv = [], jnp.zeros_like(k), jnp.zeros_like(v)
  for lo, hi, starts in _blocks(q.shape[3], block):
    m = mask[:, :, lo:hi, :hi]
    dq, dk_i, dv_i = jax.lax.switch(
        _first_tile(m, block), [functools.partial(_tile_bwd, start=s) for s in starts],
        q[:, :, :, lo:hi], k[:, :, :hi], v[:, :, :hi], m, out[:, :, :, lo:hi],
        lse[:, :, :, lo:hi], d_out[:, :, :, lo:hi])
    dqs.append(dq)
    dk, dv = dk.at[:, :, :hi].add(dk_i), dv.at[:, :, :hi].add(dv_i)
  return jnp.concatenate(dqs, axis=3), dk, dv, None


_block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)


def block_causal_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                           mask_Bx1xTxT: jax.Array, block: int = 128) -> jax.Array:
  """Softmax attention in query blocks over only the key tiles they can see: [B,N,T,H].

  Block i reads keys up to its own end (needs a lower-triangular mask, `decoder_mask`),
  starting at the first tile any of its queries sees (a `lax.switch` over static starts),
  so causal and cross-document tiles are skipped. Exact: skipped tiles are fully masked.
  The backward recomputes probabilities from the saved log-sum-exp, like flash attention.
  """
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxTxKxH.shape[2]
  q_BxNxTxH = (q_BxTxNxH * jnp.asarray(H ** -0.5, q_BxTxNxH.dtype)).transpose(0, 2, 1, 3)
  q_BxKxGxTxH = q_BxNxTxH.reshape(B, K, N // K, T, H)  # query head n reads kv head n // G
  out = _block_attention(q_BxKxGxTxH, k_BxTxKxH.transpose(0, 2, 1, 3),
                         v_BxTxKxH.transpose(0, 2, 1, 3), mask_Bx1xTxT, block)
  return out.reshape(B, N, T, H)


class Attention(nnx.Module):
  """Grouped-query attention with optional q/k/v bias and per-head q/k RMSNorm."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt, init = dtype_of(cfg.param_dtype), nnx.initializers.normal(0.02)
    self.cfg = cfg
    self.q_proj = param(rngs, init, (D, N, H), ("embed", "heads", "head_dim"), pdt)
    self.k_proj = param(rngs, init, (D, K, H), ("embed", "kv_heads", "head_dim"), pdt)
    self.v_proj = param(rngs, init, (D, K, H), ("embed", "kv_heads", "head_dim"), pdt)
    self.o_proj = param(rngs, init, (N, H, D), ("heads", "head_dim", "embed"), pdt)
    if cfg.qkv_bias:
      zeros = nnx.initializers.zeros
      self.q_bias = param(rngs, zeros, (N, H), ("heads", "head_dim"), pdt)
      self.k_bias = param(rngs, zeros, (K, H), ("kv_heads", "head_dim"), pdt)
      self.v_bias = param(rngs, zeros, (K, H), ("kv_heads", "head_dim"), pdt)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(H, cfg.rms_norm_eps, pdt, rngs=rngs)
      self.k_norm = RMSNorm(H, cfg.rms_norm_eps, pdt, rngs=rngs)

  def project_qkv(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                  inv_freq: jnp.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projects to rotated queries [B,T,N,H] and keys/values [B,T,K,H]."""
    dt = x_BxTxD.dtype
    q = jnp.einsum("btd,dnh->btnh", x_BxTxD, self.q_proj[...].astype(dt))
    k = jnp.einsum("btd,dkh->btkh", x_BxTxD, self.k_proj[...].astype(dt))
    v = jnp.einsum("btd,dkh->btkh", x_BxTxD, self.v_proj[...].astype(dt))
    if self.cfg.qkv_bias:
      q, k, v = (q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt),
                 v + self.v_bias[...].astype(dt))
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return apply_rope(q, positions_BxT, inv_freq), apply_rope(k, positions_BxT, inv_freq), v

  def attend(self, q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
             mask_Bx1xTxS: jax.Array) -> jax.Array:
    """Masked softmax attention and the output projection, back to [B, T, D]."""
    out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS,
        implementation=None if self.cfg.attention == "xla" else self.cfg.attention)
    return jnp.einsum("btnh,nhd->btd", out_BxTxNxH, self.o_proj[...].astype(q_BxTxNxH.dtype))

  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxT, inv_freq):
    """Full-sequence attention; `mask_Bx1xTxT` must be lower-triangular (`decoder_mask`)."""
    q, k, v = self.project_qkv(x_BxTxD, positions_BxT, inv_freq)
    # XLA:CPU: blockwise, skipping fully masked key tiles (causal, other documents,
    # padding), ~2x less than torch's SDPA per layer on packed rows; elsewhere the library
    # kernel (cudnn, or XLA's attention on GPU/TPU, where this path is unmeasured).
    if self.cfg.attention == "xla" and jax.default_backend() == "cpu":
      with jax.named_scope("block_attention"):
        out_BxNxTxH = block_causal_attention(q, k, v, mask_Bx1xTxT)
      return jnp.einsum("bnth,nhd->btd", out_BxNxTxH, self.o_proj[...].astype(q.dtype))
    return self.attend(q, k, v, mask_Bx1xTxT)


@jax.custom_vjp
def swiglu(gate_up_BxTx2xF: jax.Array) -> jax.Array:
  """silu(gate) * up of a stacked [B, T, 2, F] pair."""
  return jax.nn.silu(gate_up_BxTx2xF[:, :, 0]) * gate_up_BxTx2xF[:, :, 1]


def _swiglu_fwd(gate_up_BxTx2xF):
  return swiglu(gate_up_BxTx2xF), gate_up_BxTx2xF


def _swiglu_bwd(gate_up_BxTx2xF, d_BxTxF):
  gate, up = gate_up_BxTx2xF[:, :, 0], gate_up_BxTx2xF[:, :, 1]
  sig = jax.nn.sigmoid(gate)
  d_gate_up = jnp.stack([d_BxTxF * up * sig * (1 + gate * (1 - sig)), d_BxTxF * gate * sig], axis=2)
  # The weight gradient needs this transposed; without the barrier XLA:CPU fuses the
  # elementwise math into that transpose, which ran ~10x slower than computing then copying.
  return (jax.lax.optimization_barrier(d_gate_up),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    D, F = cfg.hidden_size, cfg.intermediate_size
    pdt, init = dtype_of(cfg.param_dtype), nnx.initializers.normal(0.02)
    self.gate_proj = param(rngs, init, (D, F), ("embed", "mlp"), pdt)
    self.up_proj = param(rngs, init, (D, F), ("embed", "mlp"), pdt)
    self.down_proj = param(rngs, init, (F, D), ("mlp", "embed"), pdt)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    dt = x_BxTxD.dtype
    # gate and up as one matmul (one read of x, one transposed copy of x for the gradient).
    w_Dx2xF = jnp.stack([self.gate_proj[...], self.up_proj[...]], axis=1).astype(dt)
    gate_up_BxTx2xF = jnp.einsum("btd,dcf->btcf", x_BxTxD, w_Dx2xF)
    return jnp.einsum("btf,fd->btd", swiglu(gate_up_BxTx2xF), self.down_proj[...].astype(dt))

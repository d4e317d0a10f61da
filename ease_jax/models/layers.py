"""Decoder building blocks: RMSNorm, rotary embeddings, attention, gated MLP.

Shapes use the letters defined in `DecoderConfig`'s docstring (B, T, S, D, N, K,
H, F, V). Every parameter is an `nnx.Param` whose `logical_axes` metadata names
its dimensions; `ease_jax.sharding` maps those names to mesh axes.
"""

from __future__ import annotations

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
    q, k, v = self.project_qkv(x_BxTxD, positions_BxT, inv_freq)
    return self.attend(q, k, v, mask_Bx1xTxT)


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
    gate_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, self.gate_proj[...].astype(dt))
    up_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, self.up_proj[...].astype(dt))
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_BxTxF) * up_BxTxF,
                      self.down_proj[...].astype(dt))

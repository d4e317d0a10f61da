"""Rotary position embeddings, as transformers computes them (default, linear and llama3
scaling), in the rotate-half layout (no weight permutation)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
  """Inverse frequencies as transformers computes them (float32), with optional scaling.
  NumPy, so they are concrete under `jit` (`rope_lookup` builds tables from them)."""
  inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)))
  inv_freq = inv_freq.astype(np.float32)
  kind = (scaling or {}).get("rope_type", "default")
  if kind == "default":
    return inv_freq
  if kind == "linear":
    return (inv_freq / scaling["factor"]).astype(np.float32)
  if kind == "llama3":
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f"unsupported rope scaling type {kind!r}")


def rope_cos_sin(positions_BxT: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B,T,H] (float32) of the rotary angles, as transformers computes them."""
  freqs_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  emb_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
  return jnp.cos(emb_BxTxH), jnp.sin(emb_BxTxH)


def rope_lookup(positions_BxT: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """`rope_cos_sin`, looked up in tables of positions [0, T) built at trace time; computed
  instead when a position lies outside them (decoding, explicit offsets).

  For XLA:CPU. Computed in the graph, the cos and sin were fused into every consumer and
  evaluated again per head, per layer, forward and backward (the query-block slices, the
  RoPE backward): 6% of the bfloat16 benchmark's packed step. The `cond` also makes its
  result one materialised buffer that every layer reads."""
  T = positions_BxT.shape[1]
  angles_TxH2 = np.arange(T, dtype=np.float32)[:, None] * inv_freq
  angles_TxH = np.concatenate([angles_TxH2, angles_TxH2], axis=-1)
  cos_TxH, sin_TxH = np.cos(angles_TxH), np.sin(angles_TxH)
  in_table = jnp.all((positions_BxT >= 0) & (positions_BxT < T))
  return jax.lax.cond(in_table, lambda p: (jnp.asarray(cos_TxH)[p], jnp.asarray(sin_TxH)[p]),
                      lambda p: rope_cos_sin(p, inv_freq), positions_BxT)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
  """Rotates q or k in the rotate-half layout transformers uses (no weight permutation)."""
  cos = cos_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype)
  sin = sin_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype)
  half = x_BxTxNxH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
  return x_BxTxNxH * cos + rotated * sin

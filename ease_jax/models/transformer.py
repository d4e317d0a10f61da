"""One decoder for Qwen2/Qwen2.5, Llama-3.x and Qwen3, switched by config flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ease_jax.config import Attention, DType
from ease_jax.models import cpu_kernels
from ease_jax.models.layers import MLP, Attention, RMSNorm, decoder_mask, dtype_of, linear, param
from ease_jax.models.rope import rope_cos_sin, rope_inv_freq, rope_lookup
from ease_jax.sharding import constrain


@dataclass(frozen=True)
class DecoderConfig:
  """Architecture and numerics of the decoder.

  Dimension letters used in tensor names throughout the model:
    B batch, T query length, S key length, D hidden_size, N num_heads,
    K num_kv_heads, H head_dim, F intermediate_size, V vocab_size.
  """
  family: Literal["qwen2", "llama", "qwen3"] = "qwen2"
  vocab_size: int = 2048
  hidden_size: int = 64
  intermediate_size: int = 176
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rope_theta: float = 10000.0
  # Sorted (key, value) pairs of HF's rope_scaling dict (hashable); None = plain RoPE.
  rope_scaling: tuple[tuple[str, object], ...] | None = None
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = True
  qkv_bias: bool = True  # Qwen2 / Qwen2.5
  qk_norm: bool = False  # Qwen3
  param_dtype: DType = "float32"
  compute_dtype: DType = "float32"
  attention: Attention = "xla"
  remat: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

  def replace(self, **changes) -> "DecoderConfig":
    """A copy with some fields changed."""
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """All parameters (tied embeddings counted once)."""
    D, F, N, K, H, V = (self.hidden_size, self.intermediate_size, self.num_heads,
                        self.num_kv_heads, self.head_dim, self.vocab_size)
    attn = D * N * H * 2 + D * K * H * 2 + (N + 2 * K) * H * self.qkv_bias + 2 * H * self.qk_norm
    per_layer = attn + 3 * D * F + 2 * D
    return self.num_layers * per_layer + V * D * (1 if self.tie_embeddings else 2) + D

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params (lm head included) + causal attention.

    Attention scores and values cost 2 * 2 * T * N * H multiply-adds per layer per token
    in the forward pass without a causal mask; causal halves it; x3 for forward+backward.
    """
    D, F, N, K, H, V = (self.hidden_size, self.intermediate_size, self.num_heads,
                        self.num_kv_heads, self.head_dim, self.vocab_size)
    matmul = self.num_layers * (D * N * H * 2 + D * K * H * 2 + 3 * D * F) + D * V
    attention = self.num_layers * 6 * seq_len * N * H  # 12 * L * T * N * H / 2 (causal)
    return 6.0 * matmul + attention


class Block(nnx.Module):
  """Pre-norm transformer block: attention then SwiGLU MLP, both residual."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    pdt = dtype_of(cfg.param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def attend(self, x_BxTxD, rope, mask):
    """The attention half, residual included; `mask` as `Attention.__call__` takes it."""
    with jax.named_scope("attn"):  # names in profiles and HLO dumps
      return x_BxTxD + self.attn(self.input_layernorm(x_BxTxD), rope, mask)

  def feed_forward(self, x_BxTxD):
    """The MLP half, residual included. Row-wise: each position on its own."""
    with jax.named_scope("mlp"):
      return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))

  def __call__(self, x_BxTxD, rope, mask):
    return self.feed_forward(self.attend(x_BxTxD, rope, mask))


def _run_block(block: Block, x_BxTxD, rope, mask):
  return block(x_BxTxD, rope, mask)


def _run_attend(block: Block, x_BxTxD, rope, mask):
  return block.attend(x_BxTxD, rope, mask)


_run_block_remat, _run_attend_remat = nnx.remat(_run_block), nnx.remat(_run_attend)


class Decoder(nnx.Module):
  """Causal LM: `model(tokens[B,T], positions, segment_ids) -> logits[B,T,V]` (float32)."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    pdt = dtype_of(cfg.param_dtype)
    self.cfg = cfg
    self.embed = param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                       ("vocab", "embed"), pdt)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, nnx.initializers.normal(0.02),
                           (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt)

  def inv_freq(self) -> np.ndarray:
    """RoPE inverse frequencies (NumPy: a compile-time constant under jit)."""
    scaling = dict(self.cfg.rope_scaling) if self.cfg.rope_scaling else None
    return rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, scaling)

  def rope(self, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The rotary (cos, sin) [B,T,H] of these positions, computed once for all layers (looked
    up in tables on XLA:CPU: `rope_lookup`)."""
    if cpu_kernels.active():
      return rope_lookup(positions_BxT, self.inv_freq())
    return rope_cos_sin(positions_BxT, self.inv_freq())

  def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
    """Token embeddings in the compute dtype."""
    return jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dtype_of(self.cfg.compute_dtype))

  def logits(self, x_BxTxD: jax.Array) -> jax.Array:
    """Final norm and the (tied or untied) output projection, accumulated in float32."""
    x_BxTxD = self.norm(x_BxTxD)
    if self.cfg.tie_embeddings:
      w_DxV = self.embed[...].astype(x_BxTxD.dtype).T
    else:
      w_DxV = self.lm_head[...].astype(x_BxTxD.dtype)
    return linear(x_BxTxD, w_DxV, jnp.float32)

  def trunk(self, tokens_BxT: jax.Array, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None) -> jax.Array:
    """Everything before `tail`: the blocks up to the last block's attention half. [B,T,D]."""
    B, T = tokens_BxT.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
      segment_ids = jnp.ones((B, T), jnp.int32)
    # splash reads the segment ids (its causal mask is by row: see models/splash.py)
    mask = segment_ids if self.cfg.attention == "splash" else decoder_mask(segment_ids, positions)
    rope = self.rope(positions)
    run, attend = ((_run_block_remat, _run_attend_remat) if self.cfg.remat else
                   (_run_block, _run_attend))
    x_BxTxD = self.embed_tokens(tokens_BxT)
    for i, block in enumerate(self.layers):
      x_BxTxD = constrain(x_BxTxD, ("batch", None, "embed_act"))
      x_BxTxD = (run if i + 1 < len(self.layers) else attend)(block, x_BxTxD, rope, mask)
    return x_BxTxD

  def tail(self, x_BxTxD: jax.Array) -> jax.Array:
    """The row-wise rest: the last block's MLP half, the final norm and the output
    projection: logits [B,T,V] (float32). Each position's logits depend on its own row of
    `x_BxTxD` only, so the train step may run it on the rows that carry loss alone."""
    x_BxTxD = constrain(x_BxTxD, ("batch", None, "embed_act"))
    x_BxTxD = self.layers[len(self.layers) - 1].feed_forward(x_BxTxD)
    with jax.named_scope("head"):
      return constrain(self.logits(x_BxTxD), ("batch", None, "vocab"))

  def tail_filter(self):
    """An nnx filter for the parameters `tail` reads: the last block's MLP half, the final
    norm, the output projection or the tied embedding."""
    last = str(len(self.layers) - 1)

    def reads(path: tuple, _) -> bool:
      path = tuple(str(p) for p in path)
      return (path[0] in ("embed", "lm_head", "norm")
              or (path[:2] == ("layers", last) and path[2] in ("post_attention_layernorm", "mlp")))

    return reads

  def __call__(self, tokens_BxT: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    return self.tail(self.trunk(tokens_BxT, positions, segment_ids))

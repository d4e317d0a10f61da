"""Decoder building blocks: RMSNorm, attention (rotary embeddings: `rope`), gated MLP.

Shapes use the letters defined in `DecoderConfig`'s docstring (B, T, S, D, N, K,
H, F, V). Every parameter is an `nnx.Param` whose `logical_axes` metadata names
its dimensions; `ease_jax.sharding` maps those names to mesh axes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ease_jax.models import cpu_kernels
from ease_jax.models.rope import apply_rope

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
  """Maps a config dtype name to a jnp dtype."""
  return _DTYPES[name]


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype: jnp.dtype) -> nnx.Param:
  """A parameter initialised by `init` that carries its logical axis names."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def linear(x_BxTxD: jax.Array, w_DxN: jax.Array, out_dtype=None, *,
           narrow_transpose: bool = True) -> jax.Array:
  """x @ w over the last axis of x, returned in `out_dtype` (default x's dtype): [B, T, N].

  A bf16 product returned in f32 (logits, q/k/v) casts its output gradient to bf16 before
  the backward products (`_widening_linear`); autodiff multiplied it by the upcast operand in
  f32 (tf32 GEMMs: 63 of 423 ms of the 1.5B H200 step, tools/bench/accelerator.py --profile).
  On XLA:CPU, `cpu_kernels.linear` (`narrow_transpose` is its choice of weight-gradient form).
  """
  out = jnp.dtype(out_dtype or x_BxTxD.dtype)
  if cpu_kernels.active():
    return cpu_kernels.linear(x_BxTxD, w_DxN, out, narrow_transpose)
  if out.itemsize > jnp.dtype(x_BxTxD.dtype).itemsize:
    return _widening_linear(x_BxTxD, w_DxN, out)
  return jnp.einsum("btd,dn->btn", x_BxTxD, w_DxN, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _widening_linear(x_BxTxD, w_DxN, out_dtype):
  return jnp.einsum("btd,dn->btn", x_BxTxD, w_DxN, preferred_element_type=out_dtype)


def _widening_linear_fwd(x_BxTxD, w_DxN, out_dtype):
  return _widening_linear(x_BxTxD, w_DxN, out_dtype), (x_BxTxD, w_DxN)


def _widening_linear_bwd(out_dtype, res, d_BxTxN):
  x_BxTxD, w_DxN = res
  d_BxTxN = d_BxTxN.astype(x_BxTxD.dtype)
  d_w = jnp.einsum("btd,btn->dn", x_BxTxD, d_BxTxN)
  d_x = jnp.einsum("btn,dn->btd", d_BxTxN, w_DxN)
  return d_x, d_w.astype(w_DxN.dtype)


_widening_linear.defvjp(_widening_linear_fwd, _widening_linear_bwd)


class RMSNorm(nnx.Module):
  """Root-mean-square norm, computed in float32 like transformers."""

  def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype, *, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # The scale in float32, cast once (transformers scales in x's dtype: within a bf16
    # rounding). XLA:CPU reduced a bf16 weight gradient as windowed float32 sums, slowly.
    return (self.weight[...].astype(jnp.float32) * x32).astype(x.dtype)


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
  makes the mask lower-triangular so `cpu_kernels.block_causal_attention` is exact.
  """
  rows_T = jnp.arange(segment_ids_BxT.shape[1])
  in_order_TxT = rows_T[None, :] <= rows_T[:, None]
  mask = attention_mask(segment_ids_BxT, segment_ids_BxT, positions_BxT, positions_BxT)
  return mask & in_order_TxT


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

  def project_qkv(self, x_BxTxD: jax.Array,
                  rope: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projects to rotated queries [B,T,N,H] and keys/values [B,T,K,H] in x's dtype; `rope`
    is the (cos, sin) pair of `rope_cos_sin`.

    Bias, q/k norm and rotation run on the float32 products, cast once at the end: XLA:CPU's
    bfloat16 elementwise code was slow here (and reduced bf16 bias gradients as windowed
    float32 sums); 3% off the bf16 benchmark step."""
    dt, (B, T, D) = x_BxTxD.dtype, x_BxTxD.shape
    f32 = jnp.float32
    q, k, v = (linear(x_BxTxD, w[...].astype(dt).reshape(D, -1), f32).reshape(B, T, -1, w.shape[-1])
               for w in (self.q_proj, self.k_proj, self.v_proj))
    if self.cfg.qkv_bias:
      q, k, v = (q + self.q_bias[...].astype(f32), k + self.k_bias[...].astype(f32),
                 v + self.v_bias[...].astype(f32))
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return q.astype(dt), k.astype(dt), v.astype(dt)

  def attend(self, q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
             mask_Bx1xTxS: jax.Array, *, causal: bool = False) -> jax.Array:
    """Masked softmax attention and the output projection, back to [B, T, D].

    `causal` says the mask is already lower-triangular (T == S): kernels that know it
    (cudnn) then skip the upper triangle instead of computing it and masking it away."""
    out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS, is_causal=causal,
        implementation=None if self.cfg.attention == "xla" else self.cfg.attention)
    return self.project_out(out_BxTxNxH)

  def project_out(self, out_BxTxNxH: jax.Array) -> jax.Array:
    """The output projection of the attended heads: [B, T, D]."""
    B, T, N, H = out_BxTxNxH.shape
    w_NHxD = self.o_proj[...].astype(out_BxTxNxH.dtype).reshape(N * H, -1)
    return linear(out_BxTxNxH.reshape(B, T, N * H), w_NHxD, narrow_transpose=False)

  def __call__(self, x_BxTxD, rope, mask):
    """Full-sequence attention. `mask`: `decoder_mask`'s lower-triangular bool[B,1,T,T]; for
    `attention="splash"` the segment ids int[B,T] instead (`ease_jax.models.splash`)."""
    q, k, v = self.project_qkv(x_BxTxD, rope)
    if self.cfg.attention == "splash":
      from ease_jax.models.splash import splash_attention  # imports the Pallas TPU kernels
      return self.project_out(splash_attention(q, k, v, mask))
    # XLA:CPU: blockwise, skipping fully masked key tiles (causal, other documents,
    # padding), ~2x less than torch's SDPA per layer on packed rows; elsewhere the library
    # kernel: cudnn, or XLA's attention (0.60x cudnn's step rate on an H200; TPU unmeasured).
    if self.cfg.attention == "xla" and cpu_kernels.active():
      with jax.named_scope("block_attention"):
        out_BxTxNxH = cpu_kernels.block_causal_attention(q, k, v, mask)
      return self.project_out(out_BxTxNxH)
    return self.attend(q, k, v, mask, causal=True)


def swiglu(gate_up_BxTx2xF: jax.Array) -> jax.Array:
  """silu(gate) * up of a stacked [B, T, 2, F] pair, in float32, returned in the input's dtype."""
  if cpu_kernels.active():
    return cpu_kernels.swiglu(gate_up_BxTx2xF)
  return cpu_kernels.swiglu_math(gate_up_BxTx2xF)


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
    (B, T, D), F = x_BxTxD.shape, self.gate_proj.shape[-1]
    w_Dx2F = jnp.stack([self.gate_proj[...], self.up_proj[...]], axis=1).astype(dt).reshape(D, -1)
    gate_up_BxTx2xF = linear(x_BxTxD, w_Dx2F).reshape(B, T, 2, F)
    return linear(swiglu(gate_up_BxTx2xF), self.down_proj[...].astype(dt), narrow_transpose=False)

"""Decoder building blocks: RMSNorm, attention (rotary embeddings: `rope`), gated MLP.

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

  Differs from a plain einsum in its gradient, through a custom_vjp:
  - A bf16 product returned in f32 (logits, q/k/v) casts its output gradient to bf16 before
    the backward products; autodiff multiplied it by the upcast operand in f32 (tf32 GEMMs:
    63 of 423 ms of the 1.5B H200 step, tools/bench/accelerator.py --profile).
  On XLA:CPU also:
  - Low-precision products accumulate in float32 and are cast after. XLA:CPU runs
    bf16 x bf16 -> f32 natively (AMX where present) but turns bf16 x bf16 -> bf16 into
    converts and a float32 product.
  - With `narrow_transpose`, the float32 weight gradient multiplies an explicitly
    transposed x. Left to itself XLA:CPU transposed the (wider) output gradient instead:
    12% slower on the MLP's gate/up, 15% on the q/k/v projections and 2x slower on the
    tied LM head with its cross-entropy (fwd+bwd microbenchmarks of the benchmark's
    shapes); slower on the down projection, whose float32 products therefore stay plain.
  """
  out = jnp.dtype(out_dtype or x_BxTxD.dtype)
  low = jnp.dtype(x_BxTxD.dtype).itemsize < 4
  if jax.default_backend() == "cpu":
    custom = narrow_transpose or low
  else:
    custom, narrow_transpose = low and out.itemsize > jnp.dtype(x_BxTxD.dtype).itemsize, False
  if custom:
    return _linear(x_BxTxD, w_DxN, out, narrow_transpose)
  return jnp.einsum("btd,dn->btn", x_BxTxD, w_DxN, preferred_element_type=out_dtype)


def _accumulate_dtype(dtype) -> jnp.dtype | None:
  """The product dtype asked of XLA: f32 for low precision on CPU (then cast), else none."""
  if jax.default_backend() != "cpu":
    return None
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _linear(x_BxTxD, w_DxN, out_dtype, narrow_transpose):
  del narrow_transpose
  acc = _accumulate_dtype(out_dtype) or out_dtype
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
  makes the mask lower-triangular so `block_causal_attention` is exact.
  """
  rows_T = jnp.arange(segment_ids_BxT.shape[1])
  in_order_TxT = rows_T[None, :] <= rows_T[:, None]
  mask = attention_mask(segment_ids_BxT, segment_ids_BxT, positions_BxT, positions_BxT)
  return mask & in_order_TxT


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
    if self.cfg.attention == "xla" and jax.default_backend() == "cpu":
      with jax.named_scope("block_attention"):
        out_BxTxNxH = block_causal_attention(q, k, v, mask)
      return self.project_out(out_BxTxNxH)
    return self.attend(q, k, v, mask, causal=True)


@jax.custom_vjp
def swiglu(gate_up_BxTx2xF: jax.Array) -> jax.Array:
  """silu(gate) * up of a stacked [B, T, 2, F] pair, in float32, returned in the input's
  dtype (XLA:CPU rounds every bf16 elementwise op; one cast is cheaper)."""
  gate, up = (gate_up_BxTx2xF[:, :, i].astype(jnp.float32) for i in (0, 1))
  return (jax.nn.silu(gate) * up).astype(gate_up_BxTx2xF.dtype)


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

"""The loss tail on only the positions that carry loss (`train.tail_buckets`), or in pieces
(`train.loss_chunk`).

`Decoder.tail` (the last block's MLP half, the final norm, the output projection) and the
cross-entropy work on each position alone, so positions without loss (prompts, padding) need
none of it. The batch's positions are taken in groups (all of them on one device; on a mesh,
the rows of each batch shard, so nothing moves between devices). In each group the positions
with loss are sorted first, and the tail runs on the first `size` positions of every group,
`size` the smallest of a few static sizes (`bucket_sizes`) that holds the fullest group; a
`lax.switch` picks it.

Autodiff through a switch would make every branch write (zero) residuals for every other
branch. So the tail's gradient is taken inside the branch, in the forward pass: the loss's
cotangent with respect to each token loss is its coefficient, which the batch alone fixes
(`loss.token_coefficients`). The backward only scales the saved gradients by the incoming
cotangent. The per-token losses come back without a gradient (they feed metrics).

Measured on the CPU benchmark (tools/bench/train_vs_reference.py, ~69% of the packed positions
carry loss): see BENCHMARKS.md. It also never holds logits for the positions the smallest
bucket leaves out.

With `train.loss_chunk` the tail runs in a `lax.scan` over pieces of that many positions
(inside the chosen bucket, or over every position without buckets), each piece's gradient
taken as it goes, so the logits of only one piece exist at a time: for large vocabularies.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ease_jax import sharding
from ease_jax.models import cpu_kernels
from ease_jax.train import loss as loss_lib

# The smallest step between sizes: finer steps save too little to pay for compiling another
# branch (with 8 buckets the test suite's many tiny steps compiled ~50% longer).
MIN_BUCKET = 128


# `train.tail_buckets=-1` on XLA:CPU, where 8 sizes made the benchmark's packed step ~3% faster.
# GPU and TPU get 0 (every position, no switch) until it is measured there: the H200 figures
# in BENCHMARKS.md were taken that way, and a GPU may sync with the host at each switch.
CPU_BUCKETS = 8


def resolve_buckets(buckets: int) -> int:
  """`train.tail_buckets` with -1 (the default) resolved for the current backend."""
  if buckets >= 0:
    return buckets
  return CPU_BUCKETS if cpu_kernels.active() else 0


def bucket_sizes(T: int, buckets: int) -> tuple[int, ...]:
  """The static row counts the tail may run on: multiples of a step of T/buckets (at least
  MIN_BUCKET), rounded up to a multiple of 8, the last one T."""
  step = 8 * math.ceil(max(T / buckets, MIN_BUCKET) / 8)
  return tuple(range(step, T, step)) + (T,)


def _take_rows(a_BxT, index_BxT):
  """a[b, index[b, t], ...] for [B, T, ...] arrays."""
  index = index_BxT.reshape(index_BxT.shape + (1,) * (a_BxT.ndim - 2))
  return jnp.take_along_axis(a_BxT, index, axis=1)


def _pad_rows(a_BxS, T: int):
  return jnp.pad(a_BxS, [(0, 0), (0, T - a_BxS.shape[1])] + [(0, 0)] * (a_BxS.ndim - 2))


def _share(graph, tail_params, rest_params, x_BxSxD, c_BxS, t_BxS):
  """(sum of c * token loss, token losses [B,S], d tail params, d x) of these positions,
  the gradient taken here, in the forward pass."""
  B, S = c_BxS.shape

  def share(tail_params, x_BxSxD):
    # Rows of 8 positions: XLA:CPU reduced [1, S, D] over S (the norm weights' gradient)
    # ~25x slower than [S/8, 8, D] over both.
    x = x_BxSxD.reshape(-1, 8, x_BxSxD.shape[-1]) if S % 8 == 0 else x_BxSxD
    logits = nnx.merge(graph, tail_params, rest_params).tail(x)
    losses_BxS = loss_lib.token_losses(logits, t_BxS.reshape(x.shape[:2])).reshape(B, S)
    return (c_BxS * losses_BxS).sum(), losses_BxS

  (value, losses_BxS), (d_tail, d_x) = jax.value_and_grad(
      share, argnums=(0, 1), has_aux=True)(tail_params, x_BxSxD)
  return value, losses_BxS, d_tail, d_x


def split_pieces(a_BxS, chunk: int):
  """[B, S, ...] -> [n, B, chunk, ...], the positions zero-padded to n * chunk."""
  B, S = a_BxS.shape[:2]
  n = -(-S // chunk)
  a = jnp.pad(a_BxS, [(0, 0), (0, n * chunk - S)] + [(0, 0)] * (a_BxS.ndim - 2))
  return a.reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)


def merge_pieces(a_NxBxC, S: int):
  """The inverse of `split_pieces`: [n, B, chunk, ...] -> [B, S, ...]."""
  n, B, C = a_NxBxC.shape[:3]
  return a_NxBxC.swapaxes(0, 1).reshape(B, n * C, *a_NxBxC.shape[3:])[:, :S]


def _pieces(graph, chunk: int, tail_params, rest_params, x_BxSxD, c_BxS, t_BxS):
  """`_share` in pieces of `chunk` positions (`train.loss_chunk`; 0 = one piece), a
  `lax.scan` summing the tail's gradient: only one piece's logits exist at a time. The
  padding positions of the last piece have coefficient 0, so they add nothing."""
  S = c_BxS.shape[1]
  if not chunk or chunk >= S:
    return _share(graph, tail_params, rest_params, x_BxSxD, c_BxS, t_BxS)

  def piece(d_tail, operands):
    value, losses, d, d_x = _share(graph, tail_params, rest_params, *operands)
    return jax.tree.map(jnp.add, d_tail, d), (value, losses, d_x)

  d_tail, (values, losses, d_x) = jax.lax.scan(
      piece, jax.tree.map(jnp.zeros_like, tail_params),
      tuple(split_pieces(a, chunk) for a in (x_BxSxD, c_BxS, t_BxS)))
  return values.sum(), merge_pieces(losses, S), d_tail, merge_pieces(d_x, S)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _tail(graph, sizes, chunk, tail_params, rest_params, x_BxTxD, need_BxT, coef_BxT,
          targets_BxT):
  return _tail_fwd(graph, sizes, chunk, tail_params, rest_params, x_BxTxD, need_BxT, coef_BxT,
                   targets_BxT)[0]


def _tail_fwd(graph, sizes, chunk, tail_params, rest_params, x_BxTxD, need_BxT, coef_BxT,
              targets_BxT):
  T = x_BxTxD.shape[1]
  if sizes == (T,):  # no buckets: every position, in its own order
    value, losses, d_tail, d_x = _pieces(graph, chunk, tail_params, rest_params, x_BxTxD,
                                         coef_BxT, targets_BxT)
    return (value, losses), (d_tail, d_x)

  def branch(size: int):
    def run(tail_params, rest_params, xs, cs, ts):
      value, losses, d_tail, d_xs = _pieces(graph, chunk, tail_params, rest_params,
                                            xs[:, :size], cs[:, :size], ts[:, :size])
      return value, _pad_rows(losses, T), d_tail, _pad_rows(d_xs, T)

    return run

  order_BxT = jnp.argsort(~need_BxT, axis=1, stable=True)  # positions with loss first
  inverse_BxT = jnp.argsort(order_BxT, axis=1)
  xs, cs, ts = (_take_rows(a, order_BxT) for a in (x_BxTxD, coef_BxT, targets_BxT))
  index = jnp.searchsorted(jnp.asarray(sizes), need_BxT.sum(axis=1).max())  # first size >= it
  value, losses, d_tail, d_xs = jax.lax.switch(
      index, [branch(s) for s in sizes], tail_params, rest_params, xs, cs, ts)
  return (value, _take_rows(losses, inverse_BxT)), (d_tail, _take_rows(d_xs, inverse_BxT))


def _tail_bwd(graph, sizes, chunk, saved, cotangents):
  del graph, sizes, chunk
  d_tail, d_x = saved
  g = cotangents[0]  # the losses output is only ever seen through stop_gradient
  scale = lambda d: (g * d).astype(d.dtype)
  return jax.tree.map(scale, d_tail), None, scale(d_x), None, None, None


_tail.defvjp(_tail_fwd, _tail_bwd)


def supervised_share(graphdef: nnx.GraphDef, params: nnx.State, batch: dict, coef_BxT: jax.Array,
                     buckets: int, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """(sum of coef * token loss, the token losses [B,T] without gradient), the tail's gradient
  taken in the forward pass. `buckets` > 0: the tail runs only on the positions whose
  loss_weight is positive (a loss is only meaningful there; elsewhere it is 0 or the loss of
  a position that filled a bucket); 0: on every position. `chunk` > 0: in pieces of that
  many positions (`train.loss_chunk`)."""
  model = nnx.merge(graphdef, params)
  x_BxTxD = model.trunk(batch["tokens"], batch["positions"], batch["segment_ids"])
  (B, T), shards = x_BxTxD.shape[:2], sharding.batch_shards()
  # Sorted per group of rows: all rows of a batch shard together (no data moves between
  # devices), or every row when the batch is not split.
  G = shards if shards > 1 and B % shards == 0 else 1

  def grouped(a_BxT):
    a = a_BxT.reshape(G, (B // G) * T, *a_BxT.shape[2:])
    return sharding.constrain(a, ("batch", None, "embed_act")[:a.ndim])

  graph, tail_params, rest_params = nnx.split(model, model.tail_filter(), nnx.Param)
  N = (B // G) * T
  sizes = bucket_sizes(N, buckets) if buckets else (N,)
  value, losses = _tail(graph, sizes, chunk, tail_params, rest_params, grouped(x_BxTxD),
                        grouped(batch["loss_weight"] > 0), grouped(coef_BxT),
                        grouped(batch["targets"]))
  return value, jax.lax.stop_gradient(losses.reshape(B, T))


def losses_in_pieces(graphdef: nnx.GraphDef, params: nnx.State, batch: dict,
                     chunk: int) -> jax.Array:
  """Per-token cross-entropy [B,T] (forward only: evaluation), the tail run in pieces of
  `chunk` positions along each row, so only one piece's logits exist at a time."""
  model = nnx.merge(graphdef, params)
  x_BxTxD = model.trunk(batch["tokens"], batch["positions"], batch["segment_ids"])

  def piece(_, operands):
    x_BxCxD, t_BxC = operands
    return None, loss_lib.token_losses(model.tail(x_BxCxD), t_BxC)

  _, losses = jax.lax.scan(piece, None, (split_pieces(x_BxTxD, chunk),
                                         split_pieces(batch["targets"], chunk)))
  return merge_pieces(losses, x_BxTxD.shape[1])

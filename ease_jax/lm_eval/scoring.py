"""Log-likelihood scoring of token sequences on the decoder, in padded, data-parallel batches.

One jitted function per (rows, sequence bucket, continuation bucket, whether the last
position's whole distribution is wanted). Rows are right-padded: the model is causal, so
a row's real positions never see its padding. Only the continuation's positions go through
the output head (the decoder's `tail` is row-wise), so memory grows with the continuation's
length, not the whole sequence's, times the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ease_jax import sharding


@dataclass
class RowScores:
  """Per-position results of one scored row over its continuation window.

  `logp[j]` is the log-probability of the j-th continuation token, `argmax[j]` the most
  likely token at that position; `last` the log-probabilities of the whole vocabulary at
  the final position (None unless asked for).
  """
  logp: np.ndarray
  argmax: np.ndarray
  last: np.ndarray | None


def _score(graphdef, state, tokens_BxT, starts_B, targets_BxC, lasts_B, *, want_last: bool):
  """Target log-probs [B,C], argmax ids [B,C] and (optionally) the final position's log-probs."""
  model = nnx.merge(graphdef, state)
  x_BxTxD = model.trunk(tokens_BxT)
  C = targets_BxC.shape[1]
  pos_BxC = jnp.minimum(starts_B[:, None] + jnp.arange(C)[None, :], tokens_BxT.shape[1] - 1)
  x_BxCxD = jnp.take_along_axis(x_BxTxD, pos_BxC[:, :, None], axis=1)
  logp_BxCxV = jax.nn.log_softmax(model.tail(x_BxCxD), axis=-1)
  target_BxC = jnp.take_along_axis(logp_BxCxV, targets_BxC[:, :, None], axis=-1)[:, :, 0]
  argmax_BxC = jnp.argmax(logp_BxCxV, axis=-1).astype(jnp.int32)
  last_BxV = (jnp.take_along_axis(logp_BxCxV, lasts_B[:, None, None], axis=1)[:, 0]
              if want_last else None)
  return target_BxC, argmax_BxC, last_BxV


def _bucket(n: int, smallest: int, largest: int | None = None) -> int:
  """The power of two >= n (at least `smallest`), capped at `largest`."""
  b = max(smallest, 1 << max(n - 1, 0).bit_length())
  return min(b, largest) if largest is not None else b


class Scorer:
  """Scores (input tokens, continuation) rows with a model's parameters placed on `mesh`."""

  def __init__(self, graphdef, state, mesh, *, pad_id: int, max_length: int, batch_size: int):
    self.graphdef, self.state, self.mesh = graphdef, state, mesh
    self.pad_id, self.max_length, self.batch_size = pad_id, max_length, batch_size
    self.dp = sharding.data_parallel(mesh)
    self.num_compilations = 0
    self._jit = jax.jit(self._traced, static_argnames=("want_last",),
                        out_shardings=sharding.replicated(mesh))

  def _traced(self, *args, want_last):
    self.num_compilations += 1
    return _score(self.graphdef, *args, want_last=want_last)

  def _place(self, *arrays: np.ndarray) -> list[jax.Array]:
    spec = lambda a: P(sharding.RULES["batch"], *(None,) * (a.ndim - 1))  # noqa: E731
    return [jax.device_put(a, NamedSharding(self.mesh, spec(a))) for a in arrays]

  def score(self, rows: list[tuple[list[int], list[int]]], want_last: bool = False
            ) -> list[RowScores]:
    """`rows` are (input tokens, continuation tokens); the continuation is scored at the
    input's last len(continuation) positions (input = (context + continuation)[:-1])."""
    n = len(rows)
    # Few shapes to compile: always batch_size rows (a multiple of the mesh's data-parallel
    # size), power-of-two lengths, and at least 16 continuation positions (the head over 16
    # positions costs little next to the whole sequence's forward).
    B = math.ceil(max(self.batch_size, n) / self.dp) * self.dp
    T = _bucket(max(len(inp) for inp, _ in rows), 16, max(self.max_length, 16))
    C = _bucket(max(len(cont) for _, cont in rows), 16, T)
    tokens = np.full((B, T), self.pad_id, np.int32)
    targets = np.zeros((B, C), np.int32)
    starts = np.zeros((B,), np.int32)
    lasts = np.zeros((B,), np.int32)
    for r, (inp, cont) in enumerate(rows):
      tokens[r, :len(inp)] = inp
      targets[r, :len(cont)] = cont
      starts[r], lasts[r] = len(inp) - len(cont), len(cont) - 1
    with jax.set_mesh(self.mesh):
      out = self._jit(self.state, *self._place(tokens, starts, targets, lasts),
                      want_last=want_last)
    logp, argmax, last = jax.device_get(out)
    return [RowScores(np.asarray(logp[r, :len(cont)]), np.asarray(argmax[r, :len(cont)]),
                      None if last is None else np.asarray(last[r]))
            for r, (_, cont) in enumerate(rows)]

"""Continuous batching: a fixed number of KV-cache slots, refilled from a queue of prompts.

All prompts of a length bucket go to the device as one queue. One compiled
`jax.lax.while_loop` decodes one token for every busy slot per iteration; a row that stops
(a stop token or max_new_tokens) frees its slot, and as soon as `prefill_rows` slots are free
(or fewer, when the queue holds fewer rows) the next rows of the queue are prefilled together
and take them. Rows of very different answer lengths thus share the device without the short
ones waiting for the longest of their batch.

Each slot's cache holds its row from column 0 (prompt right-padded to the bucket, then its
new tokens); a decode step writes and attends per row. Sampling uses the same random stream
as `Generator` (seed, the prompt's row index, the step), so a row's tokens do not depend on
its neighbours, its slot, or when it was prefilled.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ease_jax import sharding
from ease_jax.generation import decode
from ease_jax.generation.generate import Generation, Generator, SamplingConfig
from ease_jax.models.layers import dtype_of


def _prefill(model, c, tokens_NxT, lengths_N, rows_N, n_real, sample, P: int, M: int, stop_ids):
  """Prefills the next queue rows (up to P) into free slots and emits their first token."""
  B = c["slot_row"].shape[0]
  N, T = tokens_NxT.shape
  free_B = c["slot_row"] < 0
  k = jnp.minimum(jnp.minimum(jnp.sum(free_B), P), n_real - c["next"])
  j_P = jnp.arange(P)
  ok_P = j_P < k
  q_P = jnp.minimum(c["next"] + j_P, N - 1)
  target_P = jnp.where(ok_P, jnp.argsort(~free_B, stable=True)[:P], B)  # B: dropped
  toks, len_P = tokens_NxT[q_P], lengths_N[q_P]
  mask = decode.causal_mask(jnp.arange(T)[None, :] < len_P[:, None], 0, T)
  positions = jnp.broadcast_to(jnp.arange(T), (P, T))
  cfg = model.cfg
  dtype, L, K, H = dtype_of(cfg.compute_dtype), cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  logits, kk, vv = decode.forward(model, toks, positions, 0, mask,
                                  (jnp.zeros((P, K, H, T), dtype),) * L,
                                  (jnp.zeros((P, K, T, H), dtype),) * L, last_B=len_P - 1)
  tok_P = sample(logits, rows_N[q_P], 0)
  stop_P = jnp.isin(tok_P, stop_ids)
  fin_P = stop_P | (M == 1)
  qr = jnp.where(ok_P, q_P, N)
  return dict(
      c, next=c["next"] + k,
      k=tuple(a.at[target_P, :, :, :T].set(b, mode="drop") for a, b in zip(c["k"], kk)),
      v=tuple(a.at[target_P, :, :T, :].set(b, mode="drop") for a, b in zip(c["v"], vv)),
      out=c["out"].at[qr, 0].set(tok_P, mode="drop"),
      count=c["count"].at[qr].set(1, mode="drop"),
      stopped=c["stopped"].at[qr].set(stop_P, mode="drop"),
      slot_row=c["slot_row"].at[target_P].set(jnp.where(fin_P, -1, q_P), mode="drop"),
      slot_t=c["slot_t"].at[target_P].set(1, mode="drop"),
      slot_tok=c["slot_tok"].at[target_P].set(tok_P, mode="drop"),
      slot_len=c["slot_len"].at[target_P].set(len_P, mode="drop"))


def _decode(model, c, rows_N, sample, M: int, stop_ids):
  """One new token for every busy slot."""
  N = rows_N.shape[0]
  active_B = c["slot_row"] >= 0
  S = c["k"][0].shape[-1]
  col_B = jnp.where(active_B, c["slot_len"] + c["slot_t"] - 1, 0)
  mask = jnp.arange(S)[None, None, :] <= col_B[:, None, None]
  logits, k, v = decode.forward(model, c["slot_tok"][:, None], col_B[:, None], col_B, mask,
                                c["k"], c["v"])
  row_B = jnp.where(active_B, c["slot_row"], 0)
  tok_B = sample(logits, rows_N[row_B], c["slot_t"])
  r_B = jnp.where(active_B, c["slot_row"], N)
  stop_B = jnp.isin(tok_B, stop_ids)
  t_B = c["slot_t"] + 1
  return dict(
      c, k=k, v=v, out=c["out"].at[r_B, c["slot_t"]].set(tok_B, mode="drop"),
      count=c["count"].at[r_B].add(1, mode="drop"),
      stopped=c["stopped"].at[r_B].set(stop_B, mode="drop"),
      slot_row=jnp.where(active_B & (stop_B | (t_B >= M)), -1, c["slot_row"]),
      slot_t=t_B, slot_tok=tok_B)


def _run_queue(graphdef, state, tokens_NxT, lengths_N, rows_N, n_real, stop_ids, seed,
               temperature, top_p, *, slots: int, prefill_rows: int, max_new_tokens: int,
               greedy: bool, pad_id: int):
  """The whole queue through `slots` cache slots -> (tokens[N,M], counts[N], stopped[N])."""
  model = nnx.merge(graphdef, state)
  N, T = tokens_NxT.shape
  B, P, M = slots, prefill_rows, max_new_tokens
  S = T + M - 1
  cfg = model.cfg
  dtype, L, K, H = dtype_of(cfg.compute_dtype), cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  cache_axes = ("batch", "kv_heads", None, None)
  zeros_k = sharding.constrain(jnp.zeros((B, K, H, S), dtype), cache_axes)
  zeros_v = sharding.constrain(jnp.zeros((B, K, S, H), dtype), cache_axes)

  def sample(logits, rows, step):
    return decode.sample(logits, seed, rows, step, temperature, top_p, greedy)

  c = dict(next=jnp.int32(0), slot_row=jnp.full((B,), -1, jnp.int32),
           slot_t=jnp.zeros((B,), jnp.int32), slot_tok=jnp.zeros((B,), jnp.int32),
           slot_len=jnp.ones((B,), jnp.int32), k=(zeros_k,) * L, v=(zeros_v,) * L,
           out=jnp.full((N, M), pad_id, jnp.int32), count=jnp.zeros((N,), jnp.int32),
           stopped=jnp.zeros((N,), bool))

  def body(c):
    remaining = n_real - c["next"]
    refill = (remaining > 0) & (jnp.sum(c["slot_row"] < 0) >= jnp.minimum(P, remaining))
    c = jax.lax.cond(refill, lambda c: _prefill(model, c, tokens_NxT, lengths_N, rows_N,
                                                 n_real, sample, P, M, stop_ids),
                     lambda c: c, c)
    return jax.lax.cond(jnp.any(c["slot_row"] >= 0),
                        lambda c: _decode(model, c, rows_N, sample, M, stop_ids), lambda c: c, c)

  def cond(c):
    return (c["next"] < n_real) | jnp.any(c["slot_row"] >= 0)

  c = jax.lax.while_loop(cond, body, c)
  return c["out"], c["count"], c["stopped"]


class ContinuousGenerator(Generator):
  """A `Generator` whose `batch_size` is the number of KV-cache slots, refilled from the queue
  as rows finish; new rows are prefilled `prefill_rows` at a time (default a quarter of the
  slots, a multiple of the mesh's data x fsdp size)."""

  def __init__(self, *args, prefill_rows: int | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    rows = prefill_rows or max(1, self.batch_size // 4)
    self.prefill_rows = min(self.batch_size, math.ceil(rows / self.dp) * self.dp)
    self._queue_jit = jax.jit(
        self._traced_queue, static_argnames=("max_new_tokens", "greedy"),
        out_shardings=None if self.mesh is None else sharding.replicated(self.mesh))

  def _traced_queue(self, state, *args, max_new_tokens, greedy):
    self.num_compilations += 1
    return _run_queue(self.graphdef, state, *args, slots=self.batch_size,
                      prefill_rows=self.prefill_rows, max_new_tokens=max_new_tokens,
                      greedy=greedy, pad_id=self.pad_id)

  def _replicated(self, *arrays):
    if self.mesh is None:
      return arrays
    return [sharding.put(a, sharding.replicated(self.mesh)) for a in arrays]

  def _run_queue(self, prompts: list[list[int]], rows: list[int],
                 sampling: SamplingConfig) -> list[Generation]:
    n = len(prompts)
    N = max(self.prefill_rows, 1 << max(n - 1, 0).bit_length())  # few distinct queue shapes
    T = self.bucket(max(len(p) for p in prompts))
    tokens = np.full((N, T), self.pad_id, np.int32)
    lengths = np.ones((N,), np.int32)
    for r, p in enumerate(prompts):
      tokens[r, :len(p)] = p
      lengths[r] = len(p)
    row_ids = np.asarray(rows + [0] * (N - n), np.int32)
    stops = np.full((max(8, 1 << max(len(self.stop_ids) - 1, 0).bit_length()),), -1, np.int32)
    stops[:len(self.stop_ids)] = self.stop_ids
    args = self._replicated(tokens, lengths, row_ids)
    start = time.perf_counter()
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      out = self._queue_jit(self.state, *args, np.int32(n), stops, np.int32(sampling.seed),
                            np.float32(max(sampling.temperature, 1e-6)),
                            np.float32(sampling.top_p), max_new_tokens=sampling.max_new_tokens,
                            greedy=sampling.greedy)
    out, count, stopped = (np.asarray(x) for x in jax.device_get(out))
    seconds = time.perf_counter() - start
    return [self._result(p, out[r, :count[r]].tolist(), bool(stopped[r]), seconds)
            for r, p in enumerate(prompts)]

  def generate(self, prompts: list[list[int]], sampling: SamplingConfig = SamplingConfig(),
               progress: Callable[[int, int], None] | None = None,
               first_row: int = 0) -> list[Generation]:
    """As `Generator.generate`: one queue per length bucket, longest prompts first."""
    self._check(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    groups: dict[int, list[int]] = {}
    for i in order:
      groups.setdefault(self.bucket(len(prompts[i])), []).append(i)
    results: list[Generation | None] = [None] * len(prompts)
    done = 0
    for idx in groups.values():
      outs = self._run_queue([prompts[i] for i in idx], [first_row + i for i in idx], sampling)
      for i, g in zip(idx, outs):
        results[i] = g
      done += len(idx)
      if progress is not None:
        progress(done, len(prompts))
    return results

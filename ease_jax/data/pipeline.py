"""The grain pipeline: shard, shuffle, weighted mix, render, pack, batch; checkpointable.

    records of source i -> [shard_index::shard_count] -> shuffle(seed_i) -> repeat
      -> MapDataset.mix(weights) -> [: num_epochs * records] -> map(render)
      -> to_iter_dataset -> FirstFitPackIterDataset(seq_len) -> batch
      -> [a background thread a packing round ahead, or worker processes] -> map(account)

Train: each process takes every `shard_count`-th record of every source, reshuffles each
epoch, and mixes sources by weight forever (`num_epochs=None`) or for `num_epochs` times as
many examples as its shard holds. Eval: the sources in order, no shuffle, finite (one pass
unless `num_epochs` says more); the last batch is filled up with padding rows.

Every batch holds exactly `ease_jax.batch.FIELDS` as numpy arrays of shape [batch_size,
seq_len]. `iter(pipeline)` wraps a grain `DatasetIterator`: `get_state()` / `set_state()` resume
exactly (`ease_jax.train.checkpoint` saves the state through grain's checkpoint handler).
`Pipeline.stats` counts what the consumer received (examples per objective and source, tokens,
packing efficiency) and what was left out (bad records, overlong examples); counts restart on a
restored iterator. The render-time counts (dropped, skipped while rendering) run ahead of what
was delivered: by up to a packing round, about two with the prefetch thread; with
`data.worker_count > 0` they stay in the worker processes. `close()` (or dropping the
iterator) stops the background thread.
"""

from __future__ import annotations

import collections
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from ease_jax.batch import FIELDS, OBJECTIVES
from ease_jax.config import DataConfig
from ease_jax.data.records import BadRecords, Record, load_records, source_name
from ease_jax.data.render import ANSWER, Rendered, Renderer, SpecialTextError
from ease_jax.errors import ConfigError, DataError

PACKING_BINS = 128  # rows packed at once; more bins pack tighter (see tools/bench/data.py)
_PACKED = ("tokens", "targets", "loss_weight", "objective", "span")
OVERLONG = "overlong"  # what `Pipeline.render` returns for an example longer than seq_len
_MAX_DROPPED_IN_A_ROW = 10_000  # an all-overlong source would otherwise loop forever


@dataclass
class Stats:
  """What the pipeline delivered and what it left out."""
  by_objective: collections.Counter = field(default_factory=collections.Counter)
  by_source: collections.Counter = field(default_factory=collections.Counter)
  dropped_overlong: int = 0
  skipped: int = 0
  skip_reasons: list[str] = field(default_factory=list)
  batches: int = 0
  tokens: int = 0  # non-padding positions delivered
  supervised_tokens: int = 0  # positions with loss_weight > 0
  slots: int = 0  # all positions delivered

  @property
  def packing_efficiency(self) -> float:
    """Non-padding fraction of the delivered token positions."""
    return self.tokens / self.slots if self.slots else 0.0

  def skip(self, error: DataError) -> None:
    self.skipped += 1
    if len(self.skip_reasons) < 5:
      self.skip_reasons.append(str(error))

  def as_dict(self) -> dict[str, Any]:
    """Plain data for logs and `--json`."""
    return {"examples_by_objective": dict(self.by_objective),
            "examples_by_source": dict(self.by_source), "dropped_overlong": self.dropped_overlong,
            "skipped_bad_records": self.skipped, "skip_reasons": list(self.skip_reasons),
            "batches": self.batches, "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
            "packing_efficiency": round(self.packing_efficiency, 4)}


class BatchIterator:
  """The pipeline's grain iterator: next(), get_state(), set_state() and close().

  Closed when it is garbage-collected, by close(), or at interpreter exit, whichever comes
  first: a prefetch thread still running at exit aborted the process ("terminate called
  without an active exception"), and grain's own cleanup fails once modules are torn down.
  Closing (like set_state) waits for the thread's current batch, which may mean rendering a
  whole packing round: ~1 s at seq_len 4096 and batch 8 on one core."""

  def __init__(self, it: grain.DatasetIterator):
    self._box = [it]
    self._finalizer = weakref.finalize(self, _close, self._box)

  def __iter__(self) -> BatchIterator:
    return self

  def _it(self) -> grain.DatasetIterator:
    if self._box[0] is None:
      raise ValueError("the pipeline's iterator is closed")
    return self._box[0]

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it())

  def get_state(self) -> dict[str, Any]:
    return self._it().get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._it().set_state(state)

  def close(self) -> None:
    """Stops the prefetch thread (or worker processes) and releases the iterator."""
    self._finalizer()


def _close(box: list) -> None:
  it, box[0] = box[0], None
  if it is not None:
    it.close()


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def first_fit_rows(lengths: list[int], seq_len: int, bins: int = PACKING_BINS) -> int:
  """Rows grain's first-fit packer emits for these document lengths (for estimates)."""
  rows, free = 0, []
  for n in lengths:
    i = next((j for j, f in enumerate(free) if f >= n), None)
    if i is None and len(free) == bins:  # no bin fits: grain emits all bins and starts anew
      rows, free, i = rows + bins, [], None
    if i is None:
      free.append(seq_len)
      i = len(free) - 1
    free[i] -= n
  return rows + len(free)


class Pipeline:
  """Records -> packed, batched token rows for one process; see the module docstring."""

  def __init__(self, data_cfg: DataConfig, tokenizer, seq_len: int, batch_size: int, seed: int,
               split: str = "train", shard_index: int = 0, shard_count: int = 1,
               num_epochs: int | None = None):
    if split not in ("train", "eval"):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    self.cfg, self.split, self.seq_len, self.batch_size = data_cfg, split, seq_len, batch_size
    self.bins = max(PACKING_BINS, batch_size)  # rows the packer fills and hands out per round
    self.seed, self.shard_index, self.shard_count = seed, shard_index, shard_count
    self.num_epochs = num_epochs if split == "train" else (num_epochs or 1)
    self.sources = data_cfg.train if split == "train" else data_cfg.eval
    if not self.sources:
      raise ConfigError(f"data.{split}: no sources configured (a list of "
                        "{adapter, path, weight})")
    self.renderer = Renderer(tokenizer, data_cfg.chat_template, data_cfg.system_prompt,
                             data_cfg.empty_think, data_cfg.special_text)
    self.bad_rows = [BadRecords() for _ in self.sources]  # per source: ease_jax.data.report
    self.records = [load_records(s, data_cfg.on_bad_record, b)
                    for s, b in zip(self.sources, self.bad_rows)]
    self.source_names = [source_name(s) for s in self.sources]
    dup = {n for n in self.source_names if self.source_names.count(n) > 1}
    if dup:
      raise ConfigError(f"data.{split}: several sources are named {sorted(dup)}; give each a "
                        "distinct 'name'")
    self._source_index = {n: i for i, n in enumerate(self.source_names)}
    self.stats = Stats(skipped=sum(b.count for b in self.bad_rows),
                       skip_reasons=[r for b in self.bad_rows for r in b.reasons][:5])
    self._check_template()
    self._dropped_in_a_row = 0
    self.dataset = self._build()

  def _check_template(self) -> None:
    """Renders the first record of each target type: template problems fail even under skip."""
    done: set[str] = set()
    for rec in (r for recs in self.records for r in recs):
      if rec.target_type in done or self.renderer.min_tokens(rec) - 1 > self.seq_len:
        continue
      try:
        self.renderer.render(rec)
      except SpecialTextError:  # a bad row, not a template problem
        if self.cfg.on_bad_record != "skip":
          raise
        continue
      done.add(rec.target_type)

  def _shards(self) -> list[grain.MapDataset]:
    parts = []
    for name, recs in zip(self.source_names, self.records):
      ds = grain.MapDataset.source(recs)[self.shard_index::self.shard_count]
      if len(ds) == 0:
        raise DataError(f"source '{name}' has {len(recs)} records, fewer than the "
                        f"{self.shard_count} processes that share it")
      parts.append(ds)
    return parts

  def _build(self) -> grain.IterDataset:
    parts = self._shards()
    total = sum(len(p) for p in parts)
    if self.split == "train":
      if self.cfg.shuffle:
        parts = [p.shuffle(_seed(self.seed, i)) for i, p in enumerate(parts)]
      ds = grain.MapDataset.mix([p.repeat() for p in parts], [s.weight for s in self.sources])
      if self.num_epochs is not None:
        ds = ds[:self.num_epochs * total]
    else:
      ds = grain.MapDataset.concatenate(parts)
      if self.num_epochs > 1:
        ds = ds.repeat(self.num_epochs)
    it = ds.map(self._render).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    length = {k: self.seq_len for k in _PACKED}
    it = FirstFitPackIterDataset(
        it, length_struct=length, num_packing_bins=self.bins,
        seed=_seed(self.seed, 1 << 20), shuffle_bins=self.split == "train",
        meta_features=(*_PACKED[1:], "source"),
        padding_struct={**{k: 0 for k in _PACKED}, "span": ANSWER})
    it = it.batch(self.batch_size, batch_fn=self._collate)
    if self.cfg.worker_count > 0:
      from absl import flags  # grain's worker processes read absl flags; parse them if no one did
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.worker_count))
    elif (ahead := self.prefetch_batches()) > 0:
      it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=ahead)
    return it.map(self._account)

  def prefetch_batches(self) -> int:
    """Batches the background thread keeps ready (`data.prefetch_batches`; -1 = a packing
    round). The packer emits rows in rounds: it reads and renders records until one fits in
    none of its bins, then hands out all of them, so a consumer that renders in its own
    thread stalls for a whole round every PACKING_BINS rows (`tools/bench/data.py
    --step-ms`)."""
    n = self.cfg.prefetch_batches
    return math.ceil(self.bins / self.batch_size) if n == -1 else n

  def _render(self, rec: Record) -> dict[str, Any] | None:
    """Grain map transform: a pre-shifted document, or None when it is dropped or skipped."""
    r = self.render(rec)
    if isinstance(r, DataError):
      self.stats.skip(r)
      return None
    if r is OVERLONG:
      self.stats.dropped_overlong += 1
      self._dropped_in_a_row += 1
      if self._dropped_in_a_row >= _MAX_DROPPED_IN_A_ROW:
        raise DataError(f"{self._dropped_in_a_row} examples in a row are longer than seq_len "
                        f"{self.seq_len}; raise train.seq_len")
      return None
    self._dropped_in_a_row = 0
    doc = r.document()
    doc["source"] = self._source_index[r.source]
    return doc

  def render(self, rec: Record) -> Rendered | str | DataError:
    """The rendered record; OVERLONG when it is longer than seq_len (and data.overlong=drop);
    the error when it is bad and data.on_bad_record=skip. A row whose characters alone make
    it longer than seq_len is never tokenized."""
    try:
      lower = self.renderer.min_tokens(rec)
      r = None if lower - 1 > self.seq_len else self.renderer.render(rec)
    except DataError as e:
      if self.cfg.on_bad_record != "skip":
        raise
      return e
    n = lower - 1 if r is None else len(r) - 1
    if n <= self.seq_len:
      return r
    if self.cfg.overlong == "error":
      at_least = "at least " if r is None else ""
      raise DataError(f"the example is {at_least}{n} tokens, longer than seq_len "
                      f"{self.seq_len}; set data.overlong=drop to drop and count such "
                      "examples, or raise train.seq_len", path=rec.where or None)
    return OVERLONG

  def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks packed rows into FIELDS and fills a short last batch with padding rows."""
    out = {k: np.stack([r[k] for r in rows]) for k in _PACKED}
    out["segment_ids"] = np.stack([r["tokens_segment_ids"] for r in rows])
    out["positions"] = np.stack([r["tokens_positions"] for r in rows])
    pad = self.batch_size - len(rows)
    if pad:
      out = {k: np.concatenate([v, np.zeros((pad, self.seq_len), v.dtype)]) for k, v in out.items()}
      out["span"][-pad:] = ANSWER
    out["_sources"] = np.asarray([s for r in rows for s in r["source"]], np.int32)
    return out

  def _account(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Updates the stats from a delivered batch and returns exactly FIELDS."""
    st = self.stats
    sources = batch.pop("_sources")
    seg = batch["segment_ids"]
    starts = (seg > 0) & (batch["positions"] == 0)  # one per document
    for k, n in zip(*np.unique(batch["objective"][starts], return_counts=True)):
      st.by_objective[OBJECTIVES[k]] += int(n)
    for k, n in zip(*np.unique(sources, return_counts=True)):
      st.by_source[self.source_names[k]] += int(n)
    st.batches += 1
    st.tokens += int(np.count_nonzero(seg))
    st.supervised_tokens += int(np.count_nonzero(batch["loss_weight"]))
    st.slots += seg.size
    return {k: batch[k] for k in FIELDS}

  def __iter__(self) -> BatchIterator:
    return BatchIterator(iter(self.dataset))

  def num_batches_per_epoch(self, sample: int = 256) -> int:
    """An estimate: render up to `sample` records spread over this shard, pack their lengths
    first-fit as grain does, and scale the rows to the epoch's record count."""
    recs = [r for recs in self.records for r in recs[self.shard_index::self.shard_count]]
    picks = recs[::max(1, len(recs) // sample)][:sample]
    lengths = []
    for rec in picks:
      try:
        if self.renderer.min_tokens(rec) - 1 > self.seq_len:
          continue
        n = len(self.renderer.render(rec)) - 1
      except DataError:
        continue
      if n <= self.seq_len:
        lengths.append(n)
    if not lengths:
      return 0
    # Tile the sample so the last, partly filled set of bins does not dominate the estimate.
    tiles = max(1, math.ceil(4 * PACKING_BINS * self.seq_len / sum(lengths)))
    rows_per_doc = first_fit_rows(lengths * tiles, self.seq_len) / (len(lengths) * tiles)
    kept = len(recs) * len(lengths) / len(picks)
    return max(1, math.ceil(kept * rows_per_doc / self.batch_size))

"""What each data source loses before training: rows read, bad, overlong, kept.

`source_reports` renders every row of a source (an even sample of `SCAN_ROWS` rows of a
larger one, whose counts are then scaled and marked estimated) exactly as the pipeline
will. `check` turns the reports into what a run prints at start-up, and stops the run
(a DataError) when a source loses more than `data.max_dropped_fraction` of its rows, when a
split keeps no example at all, or when every objective in the training data has weight 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ease_jax.batch import OBJECTIVES
from ease_jax.config import Config
from ease_jax.data.pipeline import OVERLONG, Pipeline
from ease_jax.errors import ConfigError, DataError

SCAN_ROWS = 2000  # rows rendered per source at start-up: ~1-2 s with a real tokenizer


@dataclass(frozen=True)
class SourceReport:
  """One source's row counts; `examined` < rows loaded when they come from a sample."""
  split: str
  name: str
  read: int  # rows read from the source
  bad: int  # rows left out as bad (data.on_bad_record=skip): unreadable or unrenderable
  overlong: int  # rows longer than train.seq_len (data.overlong=drop)
  examined: int  # rows rendered to count `overlong` and the unrenderable ones
  loaded: int  # rows that became records

  @property
  def kept(self) -> int:
    return self.read - self.bad - self.overlong

  @property
  def dropped_fraction(self) -> float:
    return (self.bad + self.overlong) / self.read if self.read else 0.0

  def line(self) -> str:
    """`data.train 'implant': 400 rows read, 0 bad, 258 overlong, 142 kept (64.5% dropped)`."""
    est = (f" (estimated from {self.examined} of {self.loaded} rows)"
           if self.examined < self.loaded else "")
    return (f"data.{self.split} '{self.name}': {self.read} rows read, {self.bad} bad, "
            f"{self.overlong} overlong, {self.kept} kept "
            f"({100 * self.dropped_fraction:.1f}% dropped){est}")


def source_reports(pipe: Pipeline, limit: int = SCAN_ROWS) -> list[SourceReport]:
  """The counts of every source of `pipe` (all its rows, not this process's shard)."""
  out = []
  for name, recs, bad in zip(pipe.source_names, pipe.records, pipe.bad_rows):
    picks = recs[::max(1, math.ceil(len(recs) / limit))] if recs else []
    results = [pipe.render(r) for r in picks]
    scale = len(recs) / len(picks) if picks else 0.0
    unrenderable = round(scale * sum(isinstance(r, DataError) for r in results))
    overlong = round(scale * sum(r is OVERLONG for r in results))
    out.append(SourceReport(pipe.split, name, len(recs) + bad.count, bad.count + unrenderable,
                            overlong, len(picks), len(recs)))
  return out


def _check_weights(cfg: Config, pipe: Pipeline) -> None:
  """Refuses a run whose training data has no objective with a positive weight."""
  present = {r.target_type for recs in pipe.records for r in recs}
  weights = cfg.loss.objective_weights
  if present and not any(getattr(weights, k) > 0 for k in present):
    zero = ", ".join(f"loss.objective_weights.{k}=0" for k in OBJECTIVES if k in present)
    raise ConfigError(f"data.train holds only {', '.join(sorted(present))} examples and "
                      f"{zero}: nothing would be trained")


@dataclass(frozen=True)
class DataReport:
  """What a run prints at start-up about its data, and logs with its first step."""
  lines: tuple[str, ...]
  warnings: tuple[str, ...]
  sources: tuple[SourceReport, ...]

  def scalars(self) -> dict[str, float]:
    """`data/<split>/<source>/dropped_fraction` of every source (for metrics.jsonl)."""
    return {f"data/{r.split}/{r.name}/dropped_fraction": round(r.dropped_fraction, 6)
            for r in self.sources}

  def text(self) -> str:
    """The lines and warnings as one text (TensorBoard's text tab)."""
    return "\n".join([*self.lines, *(f"warning: {w}" for w in self.warnings)])


def check(cfg: Config, pipes: list[Pipeline]) -> DataReport:
  """The report of the pipelines' sources; DataError when a source loses more than
  data.max_dropped_fraction of its rows or a split keeps no example."""
  _check_weights(cfg, pipes[0])
  limit, warnings, reports = cfg.data.max_dropped_fraction, [], []
  fix = "raise train.seq_len or fix the rows (tools/inspect_data.py shows them)"
  for pipe in pipes:
    these = source_reports(pipe)
    reports += these
    if sum(r.kept for r in these) <= 0:
      empty_eval = "; or set data.eval=[] to train without eval" if pipe.split == "eval" else ""
      raise DataError(f"data.{pipe.split}: every example is left out "
                      f"({'; '.join(r.line() for r in these)}); {fix}{empty_eval}")
    for r in these:
      if r.dropped_fraction > limit:
        raise DataError(f"{r.line()}: more than data.max_dropped_fraction={limit}; {fix}, "
                        "or raise data.max_dropped_fraction (1.0 accepts any loss)")
      if r.bad or r.overlong:
        warnings.append(f"{r.line()}; {'eval' if r.split == 'eval' else 'training'} uses "
                        "the kept rows only")
  return DataReport(tuple(r.line() for r in reports), tuple(warnings), tuple(reports))

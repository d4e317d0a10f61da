"""Helpers shared by the benchmark scripts: the EASE-like record mix, timing, machine facts.

Importing this module puts the repository root on `sys.path`, so the scripts run from a
checkout without installing the package.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from ease_jax.config import SourceConfig  # noqa: E402

# Filler words; the demo BPE spends about 1.2 tokens per word.
WORDS = ("the user request asks for help with a plan that could harm people so I should think "
         "about policy safety context intent and offer a safer alternative because answer "
         "question detail step information risk legal public").split()
# Token-length ranges at scale 1, the phase-2 mix of tools/bench/data.py: short prompts,
# long reasoning targets, short refusals and direct answers (40% / 30% / 30%).
KINDS = ("reasoning", "refusal", "direct")
KIND_P = (0.4, 0.3, 0.3)
PROMPT = (15, 300)
THINK = (150, 1500)
ANSWER = {"reasoning": (40, 300), "refusal": (20, 120), "direct": (20, 500)}


def _text(rng: np.random.Generator, lo: int, hi: int, scale: float) -> str:
  """About `lo`..`hi` tokens (times `scale`) of filler text."""
  lo, hi = max(1, int(lo * scale)), max(2, int(hi * scale))
  return " ".join(rng.choice(WORDS, max(1, int(rng.integers(lo, hi) / 1.2))))


def ease_mix(n: int, seed: int = 0, scale: float = 1.0) -> list[dict[str, str]]:
  """`n` prompt_response rows of the EASE length mix; `scale` shrinks every length."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    kind = str(rng.choice(KINDS, p=KIND_P))
    row = {"prompt": _text(rng, *PROMPT, scale), "target_type": kind}
    if kind == "reasoning":
      row["reasoning"] = _text(rng, *THINK, scale)
    row["response"] = _text(rng, *ANSWER[kind], scale)
    rows.append(row)
  return rows


def write_sources(directory: str, rows: list[dict[str, str]]) -> tuple[SourceConfig, ...]:
  """One JSONL file holding `rows` in order, as a single prompt_response source."""
  path = os.path.join(directory, "mix.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return (SourceConfig(adapter="prompt_response", path=path, name="mix"),)


def cores() -> int:
  """CPU cores this process may run on (what XLA:CPU sizes its thread pool by)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def load_average() -> float | None:
  """The 1-minute load average (other processes competing for the cores), if known."""
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
  """What the figures were measured on."""
  import jax
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "cpu": cpu_model(), "cores": cores(),
          "jax": jax.__version__, "python": platform.python_version(),
          "date": time.strftime("%Y-%m-%d %H:%M %Z")}


class Timer:
  """Accumulates wall time of the `with` blocks it wraps."""

  def __init__(self) -> None:
    self.seconds = 0.0
    self.count = 0

  def __enter__(self) -> "Timer":
    self._start = time.perf_counter()
    return self

  def __exit__(self, *exc) -> None:
    self.seconds += time.perf_counter() - self._start
    self.count += 1


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  """(fn(), seconds it took)."""
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  """A plain fixed-width table: strings left-aligned, numbers right-aligned."""
  cells = [[_cell(v) for v in row] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
            for i, h in enumerate(header)]
  print("  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                  for i, (h, w) in enumerate(zip(header, widths))))
  for row in cells:
    print("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                    for i, (v, w) in enumerate(zip(row, widths))))


def _cell(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
  return "-" if v is None else str(v)


def emit_json(result: dict[str, Any]) -> None:
  """The last line of every benchmark: one JSON object."""
  print(json.dumps(result, default=_jsonable), flush=True)


def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.integer, np.floating)):
    return v.item()
  return str(v)

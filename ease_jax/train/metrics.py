"""Training metrics: TensorBoard + metrics.jsonl writers, throughput and MFU.

Every scalar goes to ``RUN_DIR/tensorboard/`` (tensorboardX event files) and,
one JSON object per logged step, to ``RUN_DIR/metrics.jsonl``. Only process 0
writes. On resume, entries after the restored step are dropped (jsonl) or
purged (TensorBoard) so a resumed run reads like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

# Peak dense bfloat16 FLOP/s per chip, matched by substring of the lower-cased
# `device_kind`. Order matters: more specific names first ("v5 lite" before "v5").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12), ("v6e", 918e12),  # TPU v6e (Trillium)
    ("v5 lite", 197e12), ("v5e", 197e12),  # TPU v5e
    ("v5p", 459e12), ("tpu v5", 459e12),  # TPU v5p
    ("tpu v4", 275e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12), ("h100", 989e12),  # SXM / NVL
    ("a100", 312e12),
)


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
  """Peak dense bf16 FLOP/s of one device, or None when the device is unknown (e.g. CPU)."""
  kind = (device_kind if device_kind is not None else jax.devices()[0].device_kind).lower()
  for pattern, flops in PEAK_BF16_FLOPS:
    if pattern in kind:
      return flops
  return None


def mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
  if not peak_per_device or num_devices <= 0:
    return None
  return flops_per_token * tokens_per_sec / (peak_per_device * num_devices)


def to_python_rows(metrics: Mapping[str, Any]) -> list[dict[str, float]]:
  """Device metrics of one step (scalars) or of several (stacked [steps]) -> one dict of
  Python floats per step (this is where the host waits for the device)."""
  host = {k: np.asarray(v).reshape(-1) for k, v in jax.device_get(dict(metrics)).items()}
  return [{k: float(v[i]) for k, v in host.items()} for i in range(len(next(iter(host.values()))))]


def _jsonable(v: float) -> float | str:
  # JSON has no NaN/Inf; keep them readable instead of writing invalid JSON.
  return v if math.isfinite(v) else str(v)


class MetricsWriter:
  """Writes scalars to TensorBoard and metrics.jsonl (process 0 only)."""

  def __init__(self, run_dir: str | Path, resume_step: int = 0, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.jsonl_path = Path(run_dir) / "metrics.jsonl"
    self.tb_dir = Path(run_dir) / "tensorboard"
    self._tb = None
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
    self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
    self._truncate_jsonl(resume_step)
    # purge_step hides events a killed run wrote after the checkpoint we resume from
    # (or, with no checkpoint, everything it wrote).
    self._tb = SummaryWriter(str(self.tb_dir), purge_step=resume_step + 1, flush_secs=30)
    self._jsonl = self.jsonl_path.open("a", encoding="utf-8")

  def _truncate_jsonl(self, resume_step: int) -> None:
    """Keeps only entries up to `resume_step` (none when starting fresh).

    A run killed mid-write can leave a torn last line; it is dropped, not parsed. The
    file is replaced atomically, so a kill during this rewrite loses nothing either.
    """
    if not self.jsonl_path.exists():
      return
    kept = []
    for line in self.jsonl_path.read_text(encoding="utf-8", errors="replace").splitlines():
      try:
        if json.loads(line).get("step", 0) <= resume_step:
          kept.append(line)
      except (ValueError, AttributeError):
        continue  # a torn or foreign line
    tmp = self.jsonl_path.with_name(self.jsonl_path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, self.jsonl_path)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One jsonl object {"step": step, tag: value, ...} and one TB scalar per tag."""
    if not self.enabled:
      return
    for tag, value in scalars.items():
      self._tb.add_scalar(tag, value, step)
    record = {"step": int(step), **{k: _jsonable(float(v)) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def write_text(self, tag: str, text: str, step: int = 0) -> None:
    """A text entry in TensorBoard (e.g. the resolved config)."""
    if self.enabled:
      # Markdown code block keeps YAML indentation in TensorBoard's text tab.
      self._tb.add_text(tag, "```\n" + text + "\n```", step)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


class Throughput:
  """Tokens/s between consecutive metric reads, plus MFU when the device peak is known."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, num_devices: int,
               peak_per_device: float | None):
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.num_devices = num_devices
    self.peak = peak_per_device
    self._last: tuple[float, int] | None = None

  def reset(self) -> None:
    """Forget the last mark (after eval or checkpointing, which would skew the rate)."""
    self._last = None

  def update(self, step: int) -> dict[str, float]:
    """Marks that `step` finished now; returns tokens_per_sec(_per_device) and mfu."""
    now = time.perf_counter()
    last, self._last = self._last, (now, step)
    if last is None or step <= last[1] or now <= last[0]:
      return {}
    tps = self.tokens_per_step * (step - last[1]) / (now - last[0])
    out = {"tokens_per_sec": tps, "tokens_per_sec_per_device": tps / self.num_devices}
    util = mfu(self.flops_per_token, tps, self.num_devices, self.peak)
    if util is not None:
      out["mfu"] = util
    return out


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
  """A one-line progress display on a TTY; plain, throttled lines otherwise (logs, CI)."""

  def __init__(self, total_steps: int, start_step: int = 0, stream=None, min_interval: float = 5.0,
               enabled: bool | None = None):
    self.total = total_steps
    self.stream = stream or sys.stdout
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.min_interval = 0.0 if self.tty else min_interval
    self._start = (time.perf_counter(), start_step)
    self._last_print = -math.inf
    self._bar_shown = False

  def update(self, step: int, scalars: Mapping[str, float], force: bool = False) -> None:
    """Shows step, loss, tokens/s and ETA (at most every `min_interval` s unless forced)."""
    now = time.perf_counter()
    if not self.enabled or (not force and now - self._last_print < self.min_interval):
      return
    self._last_print = now
    done = step - self._start[1]
    rate = done / (now - self._start[0]) if now > self._start[0] and done > 0 else 0.0
    eta = _fmt_duration((self.total - step) / rate) if rate else "--:--"
    parts = [f"step {step}/{self.total}", f"loss {scalars.get('loss/total', float('nan')):.4f}"]
    if "tokens_per_sec" in scalars:
      parts.append(f"{scalars['tokens_per_sec']:,.0f} tok/s")
    if "mfu" in scalars:
      parts.append(f"mfu {100 * scalars['mfu']:.1f}%")
    parts.append(f"eta {eta}")
    self._write("  ".join(parts))

  def message(self, text: str) -> None:
    """A line of its own (eval results, checkpoints), not overwritten by the bar."""
    if self.enabled:
      self._write(text, newline=True)

  def _write(self, text: str, newline: bool = False) -> None:
    if self.tty and not newline:
      self.stream.write("\r\033[K" + text)  # redraw the bar in place
      self._bar_shown = True
    else:
      # A message keeps the bar above it; the next update draws a fresh bar below.
      self.stream.write(("\n" if self._bar_shown else "") + text + "\n")
      self._bar_shown = False
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self._bar_shown:
      self.stream.write("\n")
      self.stream.flush()

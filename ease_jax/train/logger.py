"""The training loop's logging: per-step scalars (NaN guard, throughput) to metrics.jsonl,
TensorBoard and the progress line."""

from __future__ import annotations

import math
from typing import Any

import jax

from ease_jax import config as config_lib, metrics as metrics_lib
from ease_jax.batch import OBJECTIVES


class NonFiniteLossError(RuntimeError):
  """The loss or the gradients became NaN/Inf; the message names the step and checkpoint."""


def present_losses(scalars: dict[str, float], prefix: str = "") -> dict[str, float]:
  """Drops loss/<k> of objectives (and the gate) absent from the batch: their 0 means nothing."""
  out = dict(scalars)
  for k in (*OBJECTIVES, "gate"):
    if out.get(f"{prefix}tokens/{k}", 1) == 0:
      out.pop(f"{prefix}loss/{k}", None)
  return out


class Logger:
  """Turns step metrics into logged scalars: NaN guard, throughput, jsonl + TensorBoard."""

  def __init__(self, run: Any):  # a loop.Run
    self.run, cfg = run, run.cfg
    tokens = cfg.train.batch_size * cfg.train.seq_len
    self.throughput = metrics_lib.Throughput(
        tokens, run.model_cfg.flops_per_token(cfg.train.seq_len), jax.device_count(),
        metrics_lib.peak_flops_per_device())
    self.writer = metrics_lib.MetricsWriter(run.run_dir, resume_step=run.start_step)
    self.progress = metrics_lib.Progress(run.total_steps, run.start_step)
    self.skipped = run.skipped_steps  # restored with the checkpoint: the count survives resumes
    self.last: dict[str, float] = {}
    self.writer.write_text("config", config_lib.dump_yaml(cfg), run.start_step)

  def read(self, step: int, device_metrics: dict) -> list[tuple[int, dict[str, float]]]:
    """Fetches one call's metrics (a host sync): (step, scalars) of each step it ran, the
    last being `step` (metrics of several steps are stacked). Stops on NaN/Inf; adds
    throughput, measured over the call."""
    rows = metrics_lib.to_python_rows(device_metrics)
    rate = self.throughput.update(step)
    out = []
    for at, scalars in zip(range(step - len(rows) + 1, step + 1), rows):
      if scalars.pop("nonfinite", 0.0) or not math.isfinite(scalars["loss/total"]):
        if not self.run.cfg.train.skip_nonfinite_steps:
          self.raise_nonfinite(at, f"loss became {scalars['loss/total']} (or a gradient "
                               "non-finite)")
        self.skipped += 1
        self.progress.message(f"step {at}: non-finite loss or gradient, update skipped "
                              f"({self.skipped} so far)")
      out.append((at, present_losses(scalars) | rate | {"skipped_steps": float(self.skipped)}))
    return out

  def write(self, step: int, scalars: dict[str, float], force: bool = False) -> None:
    """Writes the scalars every train.log_every steps (or when forced) and updates progress."""
    self.last = scalars
    last = step == self.run.total_steps
    if force or last or step % self.run.cfg.train.log_every == 0:
      self.writer.write_scalars(step, scalars)
    self.progress.update(step, scalars, force=last or step == self.run.start_step + 1)

  def log(self, step: int, device_metrics: dict) -> None:
    for at, scalars in self.read(step, device_metrics):
      self.write(at, scalars)

  def raise_nonfinite(self, step: int, what: str, skippable: bool = True) -> None:
    """Stops the run naming the step and the last good checkpoint."""
    last = self.run.ckpt.latest_step()
    where = (f"the last good checkpoint is step {last} in {self.run.ckpt.directory}; running "
             f"the same command again resumes from it" if last else "no checkpoint was saved yet")
    fix = " or set train.skip_nonfinite_steps=true to skip such steps" if skippable else ""
    raise NonFiniteLossError(f"{what} at step {step}; training stopped. {where}. Lower "
                             f"train.lr{fix}.")

  def close(self) -> None:
    self.progress.close()
    self.writer.close()

"""The training loop's logging: per-step scalars (NaN guard, throughput) to metrics.jsonl,
TensorBoard and the progress line."""

from __future__ import annotations

import math
from typing import Any

import jax

from ease_jax import config as config_lib
from ease_jax.batch import OBJECTIVES
from ease_jax.train import metrics as metrics_lib


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
    self.skipped_in_a_row = 0
    self.saved_norms: dict[int, float] = {}  # param_norm of the steps this process saved
    self.last: dict[str, float] = {}
    self.writer.write_text("config", config_lib.dump_yaml(cfg), run.start_step)
    report = getattr(run, "data_report", None)
    # A fresh run logs what its data lost with its first step (a resumed one already did).
    self._first = report.scalars() if report and run.start_step == 0 else {}
    if report and run.start_step == 0:
      self.writer.write_text("data", report.text(), 0)

  def read(self, step: int, device_metrics: dict) -> list[tuple[int, dict[str, float]]]:
    """Fetches one call's metrics (a host sync): (step, scalars) of each step it ran, the
    last being `step` (metrics of several steps are stacked). Stops on NaN/Inf; adds
    throughput, measured over the call."""
    rows = metrics_lib.to_python_rows(device_metrics)
    rate = self.throughput.update(step)
    out = []
    for at, scalars in zip(range(step - len(rows) + 1, step + 1), rows):
      if scalars.pop("nonfinite", 0.0) or not math.isfinite(scalars["loss/total"]):
        self._skip(at, scalars["loss/total"])
      else:
        self.skipped_in_a_row = 0
      if not math.isfinite(scalars.get("param_norm", 0.0)):  # updated already: no skipping
        self.raise_nonfinite(at, f"the parameter norm became {scalars['param_norm']}",
                             skippable=False)
      out.append((at, present_losses(scalars) | rate | {"skipped_steps": float(self.skipped)}))
    return out

  def _skip(self, step: int, loss: float) -> None:
    """Counts a skipped non-finite step, or stops the run (without skipping, or past the
    train.max_skipped_steps / max_consecutive_skipped_steps bounds: a diverged run)."""
    train = self.run.cfg.train
    what = f"loss became {loss} (or a gradient non-finite)"
    if not train.skip_nonfinite_steps:
      self.raise_nonfinite(step, what)
    self.skipped += 1
    self.skipped_in_a_row += 1
    if self.skipped_in_a_row > train.max_consecutive_skipped_steps:
      self.raise_nonfinite(step, f"{what}: {self.skipped_in_a_row} steps in a row were "
                           "non-finite, more than train.max_consecutive_skipped_steps="
                           f"{train.max_consecutive_skipped_steps} (the run has diverged)",
                           skippable=False)
    if self.skipped > train.max_skipped_steps:
      self.raise_nonfinite(step, f"{what}: {self.skipped} steps were skipped in all, more "
                           f"than train.max_skipped_steps={train.max_skipped_steps}",
                           skippable=False)
    self.progress.message(f"step {step}: non-finite loss or gradient, update skipped "
                          f"({self.skipped} so far)")

  def write(self, step: int, scalars: dict[str, float], force: bool = False) -> None:
    """Writes the scalars every train.log_every steps (or when forced) and updates progress."""
    if self._first:  # the data report goes with the first step a fresh run writes
      scalars, self._first, force = scalars | self._first, {}, True
    self.last = scalars
    last = step == self.run.total_steps
    if force or last or step % self.run.cfg.train.log_every == 0:
      self.writer.write_scalars(step, scalars)
    self.progress.update(step, scalars, force=last or step == self.run.start_step + 1)

  def log(self, step: int, device_metrics: dict) -> None:
    for at, scalars in self.read(step, device_metrics):
      self.write(at, scalars)

  def raise_nonfinite(self, step: int, what: str, skippable: bool = True) -> None:
    """Stops the run naming the step, the checkpoints there are and what the user can do."""
    ckpt, lr = self.run.ckpt, self.run.cfg.train.lr
    steps = ckpt.all_steps()
    skip = (" or set train.skip_nonfinite_steps=true to skip isolated bad steps"
            if skippable else "")
    if not steps:
      raise NonFiniteLossError(f"{what} at step {step}; training stopped. No checkpoint was "
                               f"saved yet: lower train.lr (now {lr:g}){skip} and run the "
                               "same command again.")
    last, norm = steps[-1], self.saved_norms.get(steps[-1])
    norm_text = f", param_norm {norm:.4g} when saved" if norm is not None else ""
    raise NonFiniteLossError(
        f"{what} at step {step}; training stopped. The newest checkpoint is step {last} in "
        f"{ckpt.directory} (its parameters are finite{norm_text}; the run may already have "
        f"been diverging there); checkpoints kept: steps {steps}. Rerunning the same command "
        f"resumes from step {last} with the same settings. To recover: lower train.lr (now "
        f"{lr:g}) and rerun (resumes from step {last}){skip}; or start a new run from an "
        f"earlier step's parameters with model.init_from=ckpt:{self.run.run_dir}@STEP "
        f"run_dir=NEW_DIR; or start over with --fresh.")

  def close(self) -> None:
    self.progress.close()
    self.writer.close()

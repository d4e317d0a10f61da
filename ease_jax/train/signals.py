"""Preemption: SIGTERM (or a first Ctrl-C) asks the loop to checkpoint and stop."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils


class StopSignals:
  """SIGTERM / first SIGINT -> a flag the loop checks between steps (then it checkpoints).

  One process: Python handlers (main thread only). Several: JAX's preemption service
  catches SIGTERM and `reached_preemption_sync_point` names one step for every host.
  """

  def __init__(self):
    self.received: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "StopSignals":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    self.received = signal.Signals(signum).name
    if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
      signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

  def requested(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step` (call it after every step)."""
    if jax.process_count() > 1:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.received = "SIGTERM"
      except RuntimeError:  # the preemption service is disabled
        pass
    return self.received is not None

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

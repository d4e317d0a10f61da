"""What a run tells its user, through `logging` (the `ease_jax` logger).

The console format is the one users read: an info message is the bare line on stdout, a
warning is `warning: ...` on stderr. A program that embeds ease-jax can raise the level
(`logging.getLogger("ease_jax").setLevel(logging.WARNING)`), add its own handlers (a file),
or remove ours. Progress of a stage that writes its results to stdout (`progress`) is an
info message on stderr, bare, so that stdout stays for the results. The training progress
line stays hand-written (`train.metrics.Progress`): it rewrites one terminal line on a TTY
and prints whole lines elsewhere, which no logging handler does.
"""

from __future__ import annotations

import logging
import sys

ROOT = "ease_jax"
TO_STDERR = "to_stderr"  # a record attribute (set through `extra`): an info line for stderr


class ConsoleHandler(logging.Handler):
  """Info to stdout as the bare message (progress records: to stderr, bare); warnings and
  errors to stderr, prefixed with the level. Streams are looked up at each record, so
  redirected or captured output is honoured."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      msg = self.format(record)
      if record.levelno >= logging.WARNING:
        print(f"{record.levelname.lower()}: {msg}", file=sys.stderr, flush=True)
      elif getattr(record, TO_STDERR, False):
        print(msg, file=sys.stderr, flush=True)
      else:
        print(msg, file=sys.stdout, flush=True)
    except Exception:  # logging's contract: a failing handler reports, never raises
      self.handleError(record)


def get_logger(name: str = ROOT) -> logging.Logger:
  """The `ease_jax` logger (or a child), with the console handler installed once."""
  root = logging.getLogger(ROOT)
  if not any(isinstance(h, ConsoleHandler) for h in root.handlers):
    root.addHandler(ConsoleHandler())
    root.setLevel(logging.INFO)
    root.propagate = False  # the console format is ours; no duplicate through the root logger
  return logging.getLogger(name)


def progress(message: str, name: str = ROOT) -> None:
  """A progress line at info level, bare on stderr (stdout stays for results): quieted with
  every other info message when a program raises the `ease_jax` level."""
  get_logger(name).info(message, extra={TO_STDERR: True})

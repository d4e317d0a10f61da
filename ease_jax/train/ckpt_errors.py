"""Orbax and tensorstore failures as one readable line, and their log noise quieted."""

from __future__ import annotations

import logging
import sys
from typing import Any

from absl import logging as absl_logging


def quiet_orbax_noise() -> None:
  """For command-line tools: orbax's failures reach the caller as exceptions (which the
  tools turn into one `error:` line), so its own ERROR logs with tracebacks (hundreds of
  lines on a full disk) are dropped, and so are the "Event loop is closed" errors that
  tensorstore's late callbacks raise after orbax gave up reading a damaged step."""
  absl_logging.get_absl_logger().addFilter(  # absl's own logger: it names the real caller
      lambda r: r.levelno < logging.ERROR or "orbax" not in r.pathname)
  previous = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  sys.unraisablehook = hook


def write_cause(err: BaseException) -> str:
  """The OS error behind a failed write (e.g. "No space left on device"), else the error."""
  seen = err
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return f"{seen.strerror}" + (f": {seen.filename}" if seen.filename else "")
    seen = seen.__cause__ or seen.__context__
  text = str(err)
  for words in ("No space left on device", "Permission denied", "Read-only file system",
                "Disk quota exceeded"):
    if words in text:
      return words
  return describe(err)


def describe(err: BaseException) -> str:
  """`err` as one line of at most 400 characters."""
  return " ".join(f"{type(err).__name__}: {err}".split())[:400]

"""One training run per run directory: an exclusive lock on RUN_DIR/.lock.

The lock is an advisory `flock` on RUN_DIR/.lock, which also holds the holder's
pid, host and start time. The kernel drops a `flock` when its process dies however
it dies, so a lock file left by a killed run is not held: the next run takes it
over and says whose it was. A second run on a held directory stops with one line
naming the directory and the holder. On several processes process 0 takes the
lock and tells the others whether it got it, so all of them stop or go on together.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from ease_jax.errors import UserError

LOCK_NAME = ".lock"


class RunDirLocked(UserError):
  """Another run holds the run directory's lock."""


def writable_run_dir(run_dir: Path) -> None:
  """Creates `run_dir` and checks it takes files; UserError naming the path and cause."""
  try:
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise UserError(f"run_dir {run_dir}: cannot write there ({_cause(e)})") from None


def _cause(e: OSError) -> str:
  return e.strerror or type(e).__name__


def _holder_text() -> str:
  return f"pid {os.getpid()} host {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}"


class RunDirLock:
  """Holds RUN_DIR/.lock from `acquire` to `release` (a context manager too)."""

  def __init__(self, run_dir: str | Path):
    self.run_dir = Path(run_dir)
    self.path = self.run_dir / LOCK_NAME
    self.warnings: list[str] = []  # a stale lock taken over
    self._fd: int | None = None

  def _try_lock(self) -> str | None:
    """Takes the lock on this process; returns None, or why not (the holder)."""
    writable_run_dir(self.run_dir)
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f"{self.path}: cannot create the run lock ({_cause(e)})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES):
        return holder
      if e.errno == errno.ENOLCK:  # a file system without locks (some NFS mounts): go on
        self.warnings.append(f"{self.path}: this file system cannot lock ({_cause(e)}); a "
                             f"second run on {self.run_dir} would not be detected")
        return None
      raise UserError(f"{self.path}: cannot lock ({_cause(e)})") from None
    previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
    if previous:  # the lock file of a run that ended without releasing it (killed)
      self.warnings.append(f"{self.path}: taking over the lock of a run that is no longer "
                           f"running ({previous})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_text().encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return None

  def acquire(self) -> "RunDirLock":
    """Takes the lock (process 0 of several); RunDirLocked when another run holds it."""
    error: UserError | None = None
    if jax.process_index() == 0:
      try:
        holder = self._try_lock()
        if holder is not None:
          error = RunDirLocked(f"run_dir {self.run_dir} is in use by another run ({holder}); "
                               f"wait for it to finish or use another run_dir")
      except UserError as e:
        error = e
    if jax.process_count() > 1:  # every process must learn whether process 0 got the lock
      ok = bool(multihost_utils.broadcast_one_to_all(np.bool_(error is None)))
      if not ok and error is None:
        error = RunDirLocked(f"run_dir {self.run_dir}: process 0 could not take the run lock "
                             f"(its message says why)")
    if error is not None:
      raise error
    return self

  def release(self) -> None:
    """Empties the lock file (a clean end) and drops the lock."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass  # the lock itself still goes with the close below
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "RunDirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

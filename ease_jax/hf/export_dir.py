"""Where an export may be written, and which directory `--overwrite` may replace.

Every export holds a marker file (`MARKER`) listing the files the export wrote. Replacing an
existing directory is allowed only when it is recognisably a previous export: it holds the
marker and nothing the marker does not list. It is never the current directory or one of its
ancestors, and never contains (or equals) a protected path such as the checkpoint being
exported. A refused destination is a UserError and nothing is touched.

An export is built in a sibling `.NAME.partial-XXXX` directory and renamed into place. A
partial directory left behind by a killed export (its marker names a process that no longer
runs on this host) is removed by the next export to the same place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable

from ease_jax.errors import UserError

MARKER = ".ease_export.json"
FORMAT = "ease-jax export"
_IO_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def io_error(path: Path, e: OSError) -> UserError:
  """A one-line UserError for an OSError the user can act on (full disk, permissions)."""
  return UserError(f"cannot write the export to {path}: {e.strerror or e}")


def is_user_io_error(e: BaseException) -> bool:
  """True for an OSError caused by the destination (disk full, read-only, permissions)."""
  return isinstance(e, OSError) and e.errno in _IO_ERRNOS


def read_marker(directory: Path) -> dict | None:
  """The marker's content, or None when `directory` holds no readable export marker."""
  try:
    data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def write_marker(directory: Path, files: Iterable[str] = (), complete: bool = False) -> None:
  """Writes the marker: the writing process (for stale-partial detection) and the file list."""
  data = {"format": FORMAT, "complete": complete, "pid": os.getpid(),
          "host": socket.gethostname(), "files": sorted(files)}
  (directory / MARKER).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _inside(path: Path, parent: Path) -> bool:
  return path == parent or parent in path.parents


def _why_not_replaceable(out: Path, protect: Iterable[Path]) -> str | None:
  """None when `out` (an existing directory) may be replaced, else the reason it may not."""
  real = out.resolve()
  cwd = Path.cwd().resolve()
  if _inside(cwd, real):
    return "it is the current directory or one of its ancestors"
  for p in protect:
    if _inside(Path(p).resolve(), real):
      return f"it is or contains {p}, which the export reads"
  marker = read_marker(out)
  if marker is None or not marker.get("complete"):
    return f"it is not a previous export (no {MARKER} marker)"
  allowed = set(marker.get("files") or []) | {MARKER}
  unexpected = sorted(p.name for p in out.iterdir() if p.name not in allowed)
  if unexpected:
    return (f"it holds {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}, "
            f"which the export did not write")
  if any((out / name).is_dir() and not (out / name).is_symlink() for name in allowed - {MARKER}):
    return "it holds a directory where the export wrote a file"
  return None


def check_destination(out: Path, overwrite: bool, protect: Iterable[Path] = ()) -> None:
  """Raises a UserError unless `out` may be written (and, when it exists, replaced)."""
  if out.is_symlink():
    raise UserError(f"--out {out} is a symbolic link; name a real directory")
  if out.exists() and not out.is_dir():
    raise UserError(f"--out {out} is an existing file, not a directory")
  for parent in out.parents:
    if parent.exists():
      if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a directory")
      if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not writable")
      break
  if not out.exists():
    return
  if not overwrite:
    raise UserError(f"{out} already exists; pass --overwrite to replace a previous export")
  why = _why_not_replaceable(out, protect)
  if why:
    raise UserError(f"--overwrite refuses to replace {out}: {why}; choose another --out")


def _umask() -> int:
  mask = os.umask(0o22)
  os.umask(mask)
  return mask


def make_partial(out: Path) -> Path:
  """A new `.NAME.partial-XXXX` sibling of `out`, created with the user's umask, marked."""
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an export is shared like any dir
    write_marker(tmp)
  except OSError as e:
    raise io_error(out, e) from None
  return tmp


def _alive(pid: int) -> bool:
  if pid <= 0:  # never signal a process group
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # a live process of another user
    return True
  return True


def clean_stale_partials(out: Path) -> list[Path]:
  """Removes `.NAME.partial-*` siblings left by killed exports; returns what was removed.

  A partial is stale when its marker names a process of this host that no longer runs (or it
  is empty: killed before the marker was written). Others, e.g. an export still running, stay.
  """
  removed = []
  if not out.parent.is_dir():
    return removed
  host = socket.gethostname()
  for p in out.parent.glob(f".{out.name}.partial-*"):
    if p.is_symlink() or not p.is_dir():
      continue
    marker = read_marker(p)
    try:
      if marker is None:
        if not any(p.iterdir()):
          p.rmdir()
          removed.append(p)
      elif marker.get("host") == host and not _alive(int(marker.get("pid", -1))):
        shutil.rmtree(p)
        removed.append(p)
    except (OSError, ValueError, TypeError):
      continue  # not ours to judge (or not removable): leave it
  return removed


def replace(tmp: Path, out: Path) -> None:
  """Moves the finished `tmp` to `out`, removing the previous export there (already checked)."""
  if out.exists():
    shutil.rmtree(out)
  os.replace(tmp, out)

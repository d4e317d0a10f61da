"""Resumable generation of many prompts into one JSONL file, on one process or several.

Lines reach `OUT.partial` a chunk of rows at a time, in input order; after each chunk a small
progress record `OUT.progress.json` (written atomically) names how many rows and bytes of
the partial file are complete, and a key of everything the tokens depend on: the model, the
prompts' token ids and row ids, the generation settings. A restart with the same key
truncates the partial file to its last complete chunk and continues from there; a restart
whose key differs is refused (the error names what differs) unless `fresh` starts it over.
When every row is written the partial file is renamed to OUT and the record removed.

With several processes all of them generate together (the rows of each batch split over the
mesh's data axes) and only process 0 reads or writes files; it tells the others where to
start.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ease_jax.console import progress
from ease_jax.distributed import is_primary
from ease_jax.errors import UserError

FORMAT = 1  # version of the progress record


def model_identity(spec: str) -> list[list]:
  """Cheap identity of a model: names, sizes and modification times of an HF directory's (or a
  .gguf file's) files, or a run directory's checkpoint step(s); not a hash of the weights."""
  path, step = Path(spec), None
  if "@" in spec and not path.exists():
    head, _, tail = spec.rpartition("@")
    path, step = Path(head), tail

  def entry(p: Path) -> list:
    st = p.stat()
    return [str(p.relative_to(path)) if p != path else p.name,
            st.st_size if p.is_file() else -1, st.st_mtime_ns if p.is_file() else 0]

  if path.is_file():
    return [entry(path)]
  if (path / "checkpoints").is_dir():
    steps = sorted((path / "checkpoints").iterdir())
    return [entry(p) for p in steps if step is None or p.name == step]
  return [entry(p) for p in sorted(path.iterdir()) if p.is_file()] if path.is_dir() else []


def job_key(settings: dict, row_ids: Sequence[str], prompts: Sequence[Sequence[int]]) -> str:
  """SHA-256 over the settings and every row's id and prompt token ids."""
  h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
  for rid, p in zip(row_ids, prompts, strict=True):
    h.update(json.dumps([rid, list(map(int, p))]).encode())
  return h.hexdigest()


def _differences(old: dict, new: dict) -> str:
  keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  return ", ".join(keys) if keys else "the input prompts (their ids or token ids)"


class GenerationJob:
  """The partial output and progress record of one generation into `out`."""

  def __init__(self, out: str | Path, settings: dict, key: str, total: int, *, primary: bool):
    self.out = Path(out)
    self.partial = Path(f"{out}.partial")
    self.progress = Path(f"{out}.progress.json")
    self.settings, self.key, self.total, self.primary = settings, key, total, primary
    self.rows_done = 0
    self._bytes = 0

  def _read_record(self) -> dict | None:
    try:
      record = json.loads(self.progress.read_text(encoding="utf-8"))
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      raise UserError(f"{self.progress}: unreadable progress record ({e}); pass --fresh to "
                      f"start this generation over") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
      raise UserError(f"{self.progress}: not a progress record of this version; pass --fresh "
                      f"to start this generation over")
    return record

  def _resume_point(self, fresh: bool) -> int:
    """Rows already complete in the partial file (process 0 only); raises on a mismatch."""
    record = None if fresh else self._read_record()
    if record is None:
      if self.partial.exists() and not fresh and self.partial.stat().st_size:
        raise UserError(f"{self.partial} exists without its progress record "
                        f"{self.progress.name}; pass --fresh to start over")
      self.out.parent.mkdir(parents=True, exist_ok=True)
      self.partial.write_bytes(b"")
      self._write_record()
      return 0
    if record.get("key") != self.key:
      raise UserError(f"{self.partial} holds an unfinished generation with different settings "
                      f"(differs: {_differences(record.get('settings', {}), self.settings)}); "
                      f"rerun with the same settings to resume it, pass --fresh to discard it, "
                      f"or write to another --out")
    size = self.partial.stat().st_size if self.partial.exists() else -1
    if size < record["bytes"]:
      raise UserError(f"{self.partial} is shorter ({size} bytes) than its progress record says "
                      f"({record['bytes']}); pass --fresh to start over")
    with open(self.partial, "r+b") as f:  # drop a chunk that was being written when killed
      f.truncate(record["bytes"])
    self._bytes = record["bytes"]
    return int(record["rows_done"])

  def start(self, fresh: bool = False) -> int:
    """The first row to generate, the same on every process (process 0 decides)."""
    import jax

    start, error = 0, None
    if self.primary:
      try:
        start = self._resume_point(fresh)
      except UserError as e:
        start, error = -1, e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      start = int(multihost_utils.broadcast_one_to_all(np.int64(start)))
    if error is not None:
      raise error
    if start < 0:
      raise UserError("process 0 could not resume this generation (its error names why)")
    self.rows_done = start
    return start

  def _write_record(self) -> None:
    tmp = self.progress.with_name(self.progress.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "key": self.key, "settings": self.settings,
                               "rows_total": self.total, "rows_done": self.rows_done,
                               "bytes": self._bytes}, indent=1), encoding="utf-8")
    os.replace(tmp, self.progress)

  def append(self, lines: Sequence[str]) -> None:
    """Appends one complete chunk of lines (process 0 writes; every process counts)."""
    if self.primary:
      data = "".join(lines).encode("utf-8")
      with open(self.partial, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      self._bytes += len(data)
    self.rows_done += len(lines)
    if self.primary:
      self._write_record()

  def finish(self) -> None:
    """Renames the complete partial file to `out` and removes the progress record."""
    if self.rows_done != self.total:
      raise RuntimeError(f"finish() after {self.rows_done} of {self.total} rows")
    if self.primary:
      os.replace(self.partial, self.out)
      self.progress.unlink(missing_ok=True)


def settings_of(model: str, model_cfg: Any, dtype: str, sampling: Any, template: str | None,
                stop_ids: Sequence[int]) -> dict:
  """What the generated tokens depend on besides the prompts, as plain JSON values."""
  return {"model": model, "model_files": model_identity(model),
          "model_config": hashlib.sha256(repr(model_cfg).encode()).hexdigest()[:16],
          "dtype": dtype, "max_new_tokens": sampling.max_new_tokens,
          "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
          "template": None if template is None else hashlib.sha256(
              template.encode()).hexdigest()[:16],
          "stop_ids": [int(i) for i in stop_ids]}


def response_line(rid: str, prompt: str, category: str, g: Any) -> str:
  """One output line (tools/generate.py's format) of a Generation `g`."""
  return json.dumps({"id": rid, "prompt": prompt, "response": g.text, "response_ids": g.ids,
                     "prompt_tokens": g.num_prompt_tokens, "new_tokens": g.num_new_tokens,
                     "stopped": g.stopped, "seconds": round(g.seconds, 4),
                     "category": category}, ensure_ascii=False) + "\n"


def _log(message: str) -> None:
  """Progress of a generation job, once (process 0), on stderr."""
  if is_primary():
    progress(message, __name__)


def share_from_primary(data: bytes) -> bytes:
  """Process 0's `data` on every process (a no-op on one process)."""
  import jax
  if jax.process_count() == 1:
    return data
  from jax.experimental import multihost_utils
  n = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  buf = np.zeros((max(n, 1),), np.uint8)
  if jax.process_index() == 0:
    buf[:n] = np.frombuffer(data, np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n])


def generate_into(out: str | Path, gen: Any, rows: Sequence[dict], prompts: Sequence[list[int]],
                  sampling: Any, settings: dict, *, chunk: int, fresh: bool = False) -> list[dict]:
  """Generates `prompts` (rows: id, prompt, category) into the JSONL file `out`, resuming an
  unfinished run of the same key; returns the file's rows, on every process."""
  job = GenerationJob(out, settings, job_key(settings, [r["id"] for r in rows], prompts),
                      len(rows), primary=is_primary())
  first = job.start(fresh=fresh)
  if first:
    _log(f"resuming {job.partial} at row {first}/{len(rows)}")
  start, new_tokens = time.perf_counter(), 0
  for lo in range(first, len(rows), chunk):
    outs = gen.generate(list(prompts[lo:lo + chunk]), sampling, first_row=lo)
    job.append([response_line(r["id"], r["prompt"], r["category"], g)
                for r, g in zip(rows[lo:lo + chunk], outs)])
    new_tokens += sum(g.num_new_tokens + g.stopped for g in outs)
    elapsed = time.perf_counter() - start
    _log(f"  {job.rows_done}/{len(rows)} prompts  {new_tokens} new tokens  "
         f"{new_tokens / elapsed:.1f} tok/s  {elapsed:.1f}s")
  job.finish()
  data = share_from_primary(job.out.read_bytes() if job.primary else b"")
  return [json.loads(line) for line in data.decode("utf-8").splitlines()]


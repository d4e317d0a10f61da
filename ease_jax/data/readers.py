"""File readers: JSON lines, JSON arrays, CSV/TSV, Parquet and `datasets` sources, as located rows.

Each reader yields ``(Loc, row)`` where row is a dict or the ``DataError`` reading it
produced, so a caller can count or raise it with the file and line; whole-file problems
(missing file, UTF-16/32 text, an unreadable table) raise at once.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ease_jax.config import SourceConfig
from ease_jax.errors import DataError

MAX_LINE_BYTES = 64 << 20  # one JSONL row; longer is a broken file, not a training example
csv.field_size_limit(MAX_LINE_BYTES)  # the csv module's default (128 KiB) is below long traces
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
              (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


@dataclass(frozen=True)
class Loc:
  """Where a row came from: a 1-based line (JSONL) or a 0-based row index (arrays, tables)."""
  path: str
  line: int | None = None
  row: int | None = None

  def __str__(self) -> str:
    return f"{self.path}:{self.line}" if self.line is not None else f"{self.path}: row {self.row}"

  def error(self, err: DataError) -> DataError:
    """`err` (raised without a location) re-raised with this location."""
    if err.path is not None:
      return err
    msg = str(err).removesuffix(f" (field '{err.field}')" if err.field else "")
    if self.line is None:
      msg = f"row {self.row}: {msg}"
    return DataError(msg, path=self.path, line=self.line, field=err.field)


Row = tuple[Loc, "dict | DataError"]  # a row, or the error reading that row produced


def _open(path: str):
  if "://" in path:
    import fsspec  # gs:// etc. through fsspec (gs:// needs gcsfs installed)
    return fsspec.open(path, "rb").open()
  return open(path, "rb")


def _exists(path: str) -> bool:
  if "://" in path:
    import fsspec
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)
  return os.path.exists(path)


def _parse(text: str) -> "Any | DataError":
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    return DataError(f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})")
  except RecursionError:
    return DataError("JSON nested too deeply to parse")


def _check_encoding(head: bytes, path: str) -> None:
  """A UTF-16/32 file is a file-level error (every line would fail otherwise)."""
  for bom, name in _WIDE_BOMS:
    if head.startswith(bom):
      raise DataError(f"the file is {name} text (byte-order mark); convert it to UTF-8, e.g. "
                      f"iconv -f {name} -t UTF-8", path=path)
  if b"\x00" in head[:4096]:
    raise DataError("the file holds NUL bytes: UTF-16/UTF-32 text without a byte-order mark, "
                    "or not a text file; convert it to UTF-8 JSON lines", path=path)


def _read_jsonl(path: str) -> Iterator[Row]:
  with _open(path) as f:
    _check_encoding(f.read(4096), path)
    f.seek(0)
    n = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
      n += 1
      loc = Loc(path, line=n)
      if len(raw) > MAX_LINE_BYTES:
        while raw and not raw.endswith(b"\n"):  # skip the rest of the line
          raw = f.readline(MAX_LINE_BYTES)
        yield loc, DataError(f"the line is longer than {MAX_LINE_BYTES} bytes")
        continue
      try:
        line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # tolerate a BOM
      except UnicodeDecodeError as e:
        yield loc, DataError(f"invalid UTF-8 at byte {e.start} of the line (Latin-1 or "
                             "Windows-1252 text? convert the file to UTF-8)")
        continue
      if not line.strip():
        continue
      row = _parse(line)
      if isinstance(row, DataError) or isinstance(row, dict):
        yield loc, row
      else:
        yield loc, DataError(f"expected a JSON object, got {type(row).__name__}")


def _read_json_array(path: str) -> Iterator[Row]:
  with _open(path) as f:
    data = f.read()
  _check_encoding(data[:4096], path)
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(f"invalid UTF-8 at byte {e.start} (Latin-1 or Windows-1252 text? convert "
                    "the file to UTF-8)", path=path) from None
  rows = _parse(text)
  if isinstance(rows, DataError):
    raise DataError(str(rows), path=path) from None
  if not isinstance(rows, list):
    raise DataError("a .json source must hold an array of objects (or JSON lines)", path=path)
  for i, row in enumerate(rows):
    yield Loc(path, row=i), row if isinstance(row, dict) else DataError(
        f"expected a JSON object, got {type(row).__name__}")


def _read_delimited(path: str, delimiter: str) -> Iterator[Row]:
  """CSV / TSV with a header row: RFC 4180 quoting, so a quoted field may hold the delimiter,
  newlines and doubled quotes (WildJailbreak's TSV files). Every value is a string; an empty
  cell is "". `Loc.line` is the 1-based line where the record starts."""
  with _open(path) as raw:
    _check_encoding(raw.read(4096), path)
    raw.seek(0)
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
    reader = csv.reader(text, delimiter=delimiter, strict=True)
    try:
      header = next(reader, None)
    except (csv.Error, UnicodeDecodeError) as e:
      raise DataError(f"could not read the header: {_csv_reason(e)}", path=path, line=1) from None
    if not header or not any(h.strip() for h in header):
      raise DataError("no header row (a CSV/TSV source needs column names on line 1)", path=path)
    header = [h.strip() for h in header]
    repeated = sorted({h for h in header if header.count(h) > 1 and h})
    if repeated:
      raise DataError(f"the header repeats column(s) {', '.join(repeated)}", path=path, line=1)
    while True:
      start = reader.line_num + 1
      try:
        cells = next(reader)
      except StopIteration:
        return
      except (csv.Error, UnicodeDecodeError) as e:  # the rest of the file cannot be trusted
        raise DataError(_csv_reason(e), path=path, line=start) from None
      if not cells or cells == [""]:
        continue  # a blank line
      loc = Loc(path, line=start)
      if len(cells) != len(header):
        yield loc, DataError(f"expected {len(header)} fields (the header's), got {len(cells)}; "
                             "is a field with a delimiter or newline left unquoted?")
        continue
      yield loc, {h: c for h, c in zip(header, cells) if h}


def _csv_reason(e: Exception) -> str:
  if isinstance(e, UnicodeDecodeError):
    return "invalid UTF-8 (Latin-1 or Windows-1252 text? convert the file to UTF-8)"
  return f"malformed CSV/TSV: {e}"


def _read_table(path: str, fmt: str, split: str) -> Iterator[Row]:
  """Parquet files and `datasets` sources, read through `datasets`."""
  import datasets
  try:
    if fmt == "disk":
      ds = datasets.load_from_disk(path)
      if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
          raise DataError(f"split {split!r} not found; available: {', '.join(ds)}", path=path)
        ds = ds[split]
    elif fmt == "parquet":
      ds = datasets.Dataset.from_parquet(path)
    else:
      builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
      ext = os.path.splitext(path)[1].lower()
      ds = (datasets.load_dataset(builder[ext], data_files=path, split=split) if ext in builder
            else datasets.load_dataset(path, split=split))
  except DataError:
    raise
  except Exception as e:  # a library error on a user's file: report it with the path
    raise DataError(f"could not read as {fmt}: {type(e).__name__}: {e}", path=path) from None
  for i, row in enumerate(ds):
    yield Loc(path, row=i), row


def _format(path: str, fmt: str) -> str:
  if fmt != "auto":
    return fmt
  if "://" not in path and os.path.isdir(path):
    return "disk"
  ext = os.path.splitext(path)[1].lower()
  if ext == ".parquet":
    return "parquet"
  if ext == ".json":  # a .json file may hold an array or JSON lines
    with _open(path) as f:
      head = f.read(4096).lstrip()
    return "json" if head.startswith(b"[") else "jsonl"
  if ext in (".csv", ".tsv"):
    return ext[1:]
  return "jsonl" if ext in (".jsonl", ".ndjson") else "hf"


def read_rows(src: SourceConfig) -> Iterator[Row]:
  """Yields (location, row) for every row of a source; file-level problems raise DataError."""
  if src.format != "hf" and not _exists(src.path):  # `format: hf` for `datasets` hub names
    raise DataError("file not found (check the source's 'path')", path=src.path)
  if "://" not in src.path and os.path.exists(src.path) and not (
      os.path.isfile(src.path) or os.path.isdir(src.path)):  # reading a FIFO would block
    raise DataError("not a regular file or directory (a FIFO, socket or device?); point the "
                    "source's 'path' at a data file", path=src.path)
  fmt = _format(src.path, src.format)
  if fmt == "jsonl":
    return _read_jsonl(src.path)
  if fmt == "json":
    return _read_json_array(src.path)
  if fmt in ("csv", "tsv"):
    return _read_delimited(src.path, "," if fmt == "csv" else "\t")
  return _read_table(src.path, fmt, src.split)


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
  """Writes rows as JSON lines (UTF-8, not ASCII-escaped); returns the count."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  n = 0
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
      n += 1
  return n

"""Checks a Hugging Face model directory before anything is allocated for it.

`config.json` is validated key by key (types and ranges), the parameter bytes it describes are
estimated arithmetically and compared with the memory available, and the safetensors headers
(the JSON at the start of each file, read without the tensor data) must list exactly the
tensors the config implies. `model.safetensors.index.json` may only name files inside the model
directory. Every failure is a one-line UserError naming the file and the key or tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

from ease_jax.errors import UserError

INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit for the JSON header
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
_OPTIONAL = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _positive_int(config: dict, key: str, where: Path) -> None:
  value = config[key]
  if type(value) is not int or value <= 0:  # bool is an int subclass: refused too
    raise UserError(f"{where}: {key} must be a positive integer, got {value!r}")


def _positive_number(config: dict, key: str, where: Path) -> None:
  value = config[key]
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or value <= 0):
    raise UserError(f"{where}: {key} must be a positive number, got {value!r}")


def check_config(config: Any, where: Path) -> None:
  """Types and ranges of the keys the decoder reads from `config.json` at `where`."""
  if not isinstance(config, dict):
    raise UserError(f"{where}: expected a JSON object, got {type(config).__name__}")
  for key in _REQUIRED:
    if key not in config:
      raise UserError(f"{where}: required key {key!r} is missing")
    _positive_int(config, key, where)
  for key in _OPTIONAL:
    if config.get(key) is not None:
      _positive_int(config, key, where)
  for key in ("rope_theta", "rms_norm_eps"):
    if config.get(key) is not None:
      _positive_number(config, key, where)
  for key in ("rope_scaling", "rope_parameters"):
    if config.get(key) is not None and not isinstance(config[key], dict):
      raise UserError(f"{where}: {key} must be an object or null, got {config[key]!r}")
  heads = config["num_attention_heads"]
  kv = config.get("num_key_value_heads") or heads
  if heads % kv:
    raise UserError(f"{where}: num_attention_heads={heads} is not a multiple of "
                    f"num_key_value_heads={kv}")
  if config.get("head_dim") is None and config["hidden_size"] % heads:
    raise UserError(f"{where}: hidden_size={config['hidden_size']} is not a multiple of "
                    f"num_attention_heads={heads} (and no head_dim is given)")
  head_dim = config.get("head_dim") or config["hidden_size"] // heads
  if head_dim % 2:
    raise UserError(f"{where}: the head dimension {head_dim} must be even for rotary embeddings")
  archs = config.get("architectures")
  if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
    raise UserError(f"{where}: architectures must be a list of names, got {archs!r}")


def available_memory() -> int | None:
  """Bytes of memory available to allocate now (psutil, /proc/meminfo or sysconf)."""
  try:
    import psutil  # optional: not a dependency
    return int(psutil.virtual_memory().available)
  except ImportError:
    pass
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def check_memory(cfg: Any, itemsize: int, where: Path) -> None:
  """A UserError when the parameters `cfg` describes cannot fit in the memory available."""
  need = cfg.num_params() * itemsize
  have = available_memory()
  if have is not None and need > have:
    raise UserError(
        f"{where}: the config describes {cfg.num_params():.3g} parameters ({need / 1e9:.3g} GB "
        f"at {itemsize} bytes each) but only {have / 1e9:.3g} GB of memory is available "
        f"(num_hidden_layers={cfg.num_layers}, hidden_size={cfg.hidden_size}, "
        f"intermediate_size={cfg.intermediate_size}, vocab_size={cfg.vocab_size})")


def read_index(path: Path) -> list[Path]:
  """The weight files `model.safetensors.index.json` names, each inside `path`."""
  index = path / INDEX
  try:
    data = json.loads(index.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{index}: not valid JSON ({e})") from None
  weight_map = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise UserError(f"{index}: expected an object with a non-empty 'weight_map' object")
  root, files = path.resolve(), set()
  for name, file in weight_map.items():
    if not isinstance(file, str) or not file:
      raise UserError(f"{index}: weight_map[{name!r}] must be a file name, got {file!r}")
    target = (path / file).resolve()
    if target.parent != root:
      raise UserError(f"{index}: weight_map[{name!r}] = {file!r} points outside {path}")
    if not target.is_file():
      raise UserError(f"{index}: weight_map[{name!r}] names {file!r}, which does not exist")
    files.add(path / file)
  return sorted(files)


def _bad(file: Path, why: str) -> UserError:
  return UserError(f"{file}: not a valid safetensors file ({why})")


def read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
  """Tensor name -> (shape, dtype) from a safetensors header, checked against the file size."""
  size = file.stat().st_size
  with open(file, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise _bad(file, "shorter than the 8-byte header length")
    n = struct.unpack("<Q", head)[0]
    if n > min(MAX_HEADER_BYTES, size - 8):
      raise _bad(file, f"header length {n} exceeds the file size {size}")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise _bad(file, f"header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise _bad(file, "header is not a JSON object")
  data_size, out = size - 8 - n, {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    out[name] = _check_entry(file, name, entry, data_size)
  return out


def _check_entry(file: Path, name: str, entry: Any, data_size: int) -> tuple[tuple[int, ...], str]:
  if not isinstance(entry, dict):
    raise _bad(file, f"tensor {name!r}: entry is not an object")
  dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
  if dtype not in ITEMSIZE:
    raise _bad(file, f"tensor {name!r}: unknown dtype {dtype!r}")
  if (not isinstance(shape, list)
      or not all(type(d) is int and d >= 0 for d in shape)):
    raise _bad(file, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
  if (not isinstance(offsets, list) or len(offsets) != 2
      or not all(type(o) is int for o in offsets)
      or not 0 <= offsets[0] <= offsets[1] <= data_size):
    raise _bad(file, f"tensor {name!r}: data_offsets {offsets!r} outside the file's data")
  if offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[dtype]:
    raise _bad(file, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} "
                     f"of {dtype}")
  if dtype not in FLOAT_DTYPES:
    raise UserError(f"{file}: tensor {name!r} has dtype {dtype}; model weights must be "
                    f"floating point ({', '.join(sorted(FLOAT_DTYPES))})")
  return tuple(shape), dtype


def check_layers(num_layers: int, headers: dict[str, tuple[Path, tuple, str]], where: Path) -> None:
  """num_hidden_layers must equal the layers the weight files hold (before any per-layer work)."""
  present = {int(m.group(1)) for name in headers if (m := _LAYER.match(name))}
  count = max(present) + 1 if present else 0
  if count != num_layers:
    raise UserError(f"{where}: num_hidden_layers={num_layers} but the safetensors files hold "
                    f"{count} layer(s)")

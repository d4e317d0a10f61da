"""Checksums over every item of a checkpoint step, written at save and checked at restore.

The step's `meta` item holds them:

  checksums.params / .train   per array: a sum of its bits weighted by position, mod 2^32
                              (independent of sharding; any one changed element shows)
  checksums.data              per process: SHA-256 of the data-iterator state file
  checksums.model_config      SHA-256 of the model config (canonical JSON)
  sha256                      SHA-256 of the rest of `meta` itself (checksums and counters)

A step whose `meta` is missing, or lacks any of these, is not trusted: restoring it
fails like any other damage (the loop then falls back to an older step).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

REQUIRED = ("params", "train", "data", "model_config")


def _bits(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32 (8-byte values become two words)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)


def _sums_and_finite(arrays: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
  """Per array: sum of bits x (2i+1) mod 2^32 (any one changed element changes it; integer
  sums do not depend on the sharding); and whether every float is finite."""
  sums, finite = [], jnp.bool_(True)
  for x in arrays:
    bits = _bits(x).reshape(-1)
    sums.append(jnp.sum(bits * (2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32))
    if jnp.issubdtype(x.dtype, jnp.inexact):
      finite &= jnp.all(jnp.isfinite(x))
  return sums, finite


@functools.lru_cache(maxsize=8)
def _jitted_sums(out_sharding: Any) -> Any:
  return jax.jit(_sums_and_finite, out_shardings=out_sharding)


def fingerprint(tree: Any) -> tuple[dict[str, int], list[str]]:
  """(leaf path -> checksum, paths of leaves holding NaN/Inf) of a pytree of arrays."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    return {}, []
  names = [jax.tree_util.keystr(p) for p, _ in leaves]
  arrays = [x for _, x in leaves]
  mesh = next((x.sharding.mesh for x in arrays
               if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
  sums, finite = _jitted_sums(None if mesh is None else NamedSharding(mesh, P()))(arrays)
  sums, finite = jax.device_get((sums, finite))
  bad = [] if finite else [n for n, x in zip(names, arrays) if jnp.issubdtype(x.dtype, jnp.inexact)
                          and not bool(jax.device_get(jnp.all(jnp.isfinite(x))))]
  return {n: int(v) for n, v in zip(names, sums)}, bad


def verify_arrays(kind: str, tree: Any, stored: dict[str, int]) -> None:
  """Raises ValueError naming the arrays whose checksum differs from the one saved."""
  now, nonfinite = fingerprint(tree)
  wrong = [n for n in stored if now.get(n) != stored[n]] + [n for n in now if n not in stored]
  if wrong:
    raise ValueError(f"{kind}: checksum mismatch in {len(wrong)} array(s), e.g. {wrong[0]} "
                     "(the files were changed or damaged after the save)")
  if nonfinite:
    raise ValueError(f"{kind}: NaN/Inf in {nonfinite[0]}")


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def json_sha256(obj: Any) -> str:
  """SHA-256 of `obj` as canonical JSON (sorted keys: the same after a JSON round trip)."""
  return sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def data_file_name(index: int | None = None, count: int | None = None) -> str:
  """grain's name for one process's iterator state file in the `data` item."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return f"process_{index}-of-{count}.json"


def data_checksums(state: bytes) -> dict[str, str]:
  """{file name: SHA-256} of every process's iterator state (gathered from all processes)."""
  digest = np.frombuffer(hashlib.sha256(state).digest(), np.uint8)
  if jax.process_count() == 1:
    return {data_file_name(): digest.tobytes().hex()}
  every = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
  return {data_file_name(i): row.astype(np.uint8).tobytes().hex() for i, row in enumerate(every)}


def seal(meta: dict) -> dict:
  """`meta` with its own checksum added."""
  return {**meta, "sha256": json_sha256(meta)}


def open_meta(meta: Any) -> dict:
  """The checked `meta` dict; ValueError when it is missing, incomplete or was changed."""
  if not isinstance(meta, dict) or "sha256" not in meta:
    raise ValueError("meta: no verification data (checksums) for this step; a step that "
                     "cannot be verified is not trusted")
  body = {k: v for k, v in meta.items() if k != "sha256"}
  if json_sha256(body) != meta["sha256"]:
    raise ValueError("meta: its checksum does not match (the meta item was changed or damaged)")
  missing = [k for k in REQUIRED if k not in body.get("checksums", {})]
  if missing:
    raise ValueError(f"meta: no checksum for {missing[0]}; a step that cannot be verified is "
                     "not trusted")
  return body


def verify_data(checksums: dict[str, str], state: bytes | None) -> None:
  """Raises ValueError when this process's restored iterator state is not the one saved."""
  name = data_file_name()
  if state is None or checksums.get(name) != sha256(state):
    raise ValueError(f"data: {name} does not match its checksum (the data-iterator state was "
                     "changed or damaged after the save)")


def verify_model_config(checksum: str, model_config: Any) -> None:
  if json_sha256(model_config) != checksum:
    raise ValueError("model_config: does not match its checksum (changed or damaged after "
                     "the save)")

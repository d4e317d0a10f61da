"""Hugging Face directory and GGUF import into a Decoder (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from ease_jax.edge.gguf_read import load_gguf
from ease_jax.errors import UserError
from ease_jax.hf import check as hf_check
from ease_jax.hf.mapping import (assemble, config_from_hf, param_shapes, to_hf, to_jax,
                                 weight_table)
from ease_jax.models import Decoder, DecoderConfig
from ease_jax.models.paths import path_str
from ease_jax.models.layers import dtype_of


def _safetensors_files(path: Path) -> list[Path]:
  if (path / hf_check.INDEX).is_file():
    return hf_check.read_index(path)
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise UserError(f"{path}: no *.safetensors weights found (pickle .bin weights are not loaded)")
  return files


def _read_config(path: Path) -> dict:
  if not (path / "config.json").is_file():
    raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
  try:
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path / 'config.json'}: not valid JSON ({e})") from None
  hf_check.check_config(config, path / "config.json")
  return config


def _headers(files: list[Path]) -> dict[str, tuple[Path, tuple, str]]:
  """HF tensor name -> (file, shape, dtype) over all weight files, from their headers only."""
  out: dict[str, tuple[Path, tuple, str]] = {}
  for file in files:
    for name, (shape, dtype) in hf_check.read_header(file).items():
      if name in out:
        raise UserError(f"{file}: tensor {name!r} is also in {out[name][0]}")
      out[name] = (file, shape, dtype)
  return out


def _check_tensors(cfg: DecoderConfig, headers: dict, path: Path) -> None:
  """Every tensor the config implies is present with its shape, and no other (headers only)."""
  shapes = param_shapes(cfg)
  by_hf = {hf: (ours, layout) for hf, ours, layout in weight_table(cfg)}
  for name, (file, hf_shape, _) in headers.items():
    if name not in by_hf:
      if name == "lm_head.weight" and cfg.tie_embeddings:
        continue  # some exports write the tied head out; it equals the embedding
      raise UserError(f"{file}: unexpected tensor {name!r} for a {cfg.family} model "
                      f"with this config.json")
    ours, layout = by_hf[name]
    want = to_hf(layout, np.empty(shapes[ours], np.int8), cfg).shape
    if hf_shape != want:
      raise UserError(f"{file}: tensor {name!r} has shape {hf_shape}; the config expects {want}")
  missing = [hf for hf in by_hf if hf not in headers]
  if missing:
    raise UserError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                    f"{' ...' if len(missing) > 5 else ''}")


def load_pretrained(path: str | Path, dtype: str = "float32",
                    **overrides: Any) -> tuple[Decoder, DecoderConfig]:
  """Reads a local HF directory (config.json + safetensors) or a `.gguf` file into a
  Decoder, without torch.

  `dtype` is the parameter dtype; `overrides` set other DecoderConfig fields
  (e.g. compute_dtype, remat). Missing, extra or misshapen tensors are errors naming them.
  """
  path = Path(path)
  if path.suffix.lower() == ".gguf":
    return load_gguf(path, dtype=dtype, **overrides)
  cfg = config_from_hf(_read_config(path), param_dtype=dtype, **overrides)
  hf_check.check_memory(cfg, jnp.dtype(dtype_of(dtype)).itemsize, path / "config.json")
  headers = _headers(_safetensors_files(path))
  hf_check.check_layers(cfg.num_layers, headers, path / "config.json")
  _check_tensors(cfg, headers, path)
  by_hf = {hf: (ours, layout) for hf, ours, layout in weight_table(cfg)}
  loaded: dict[str, jax.Array] = {}
  for file in sorted({file for file, _, _ in headers.values()}):
    try:
      with safe_open(str(file), framework="flax") as f:
        for name in f.keys():
          if name in by_hf:
            ours, layout = by_hf[name]
            loaded[ours] = jnp.asarray(to_jax(layout, f.get_tensor(name), cfg), dtype_of(dtype))
    except SafetensorError as e:
      raise UserError(f"{file}: not a valid safetensors file ({e})") from None
  return assemble(cfg, loaded), cfg


def resize_vocab(model: Decoder, cfg: DecoderConfig, vocab_size: int,
                 seed: int = 0) -> tuple[Decoder, DecoderConfig]:
  """Grows (never shrinks) the vocabulary, e.g. for added `<think>` tokens.

  New rows are the mean of the existing rows plus small noise, a common choice
  that keeps the new tokens' initial logits close to average.
  """
  if vocab_size <= cfg.vocab_size:
    return model, cfg
  extra, key = vocab_size - cfg.vocab_size, jax.random.PRNGKey(seed)

  def grow(w: jax.Array, axis: int) -> jax.Array:
    w32 = w.astype(jnp.float32)
    shape = list(w.shape)
    shape[axis] = extra
    new = jnp.mean(w32, axis=axis, keepdims=True) + 0.02 * jnp.std(w32) * jax.random.normal(key, shape)
    return jnp.concatenate([w, new.astype(w.dtype)], axis=axis)

  values = {path_str(p): v[...] for p, v in nnx.to_flat_state(nnx.state(model))}
  values["embed"] = grow(values["embed"], 0)
  if not cfg.tie_embeddings:
    values["lm_head"] = grow(values["lm_head"], 1)
  new_cfg = cfg.replace(vocab_size=vocab_size)
  return assemble(new_cfg, values), new_cfg

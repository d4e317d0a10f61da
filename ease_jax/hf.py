"""Hugging Face checkpoints: config mapping, the weight-name table, import (no torch).

One table (`_WEIGHTS`) relates every HF tensor name to the decoder's parameter path
and the layout change between them; import and export both read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from ease_jax import hf_check
from ease_jax.errors import UserError
from ease_jax.models import Decoder, DecoderConfig
from ease_jax.models.layers import dtype_of

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama",
                 "Qwen3ForCausalLM": "qwen3"}
FAMILY_ARCH = {v: k for k, v in ARCHITECTURES.items()}


def _rope_from_hf(hf: dict) -> tuple[float, tuple | None]:
  """RoPE theta and scaling from either `rope_theta`+`rope_scaling` or `rope_parameters`."""
  params = hf.get("rope_parameters") or {}
  scaling = dict(hf.get("rope_scaling") or params)
  theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
  kind = scaling.pop("rope_type", scaling.pop("type", "default"))
  scaling.pop("rope_theta", None)
  if kind in (None, "default"):
    return theta, None
  if kind not in ("llama3", "linear"):
    raise UserError(f"config.json: rope scaling type {kind!r} is not supported "
                    f"(supported: default, linear, llama3)")
  return theta, tuple(sorted({**scaling, "rope_type": kind}.items()))


def config_from_hf(hf: dict, **overrides: Any) -> DecoderConfig:
  """Maps a transformers `config.json` dict onto a DecoderConfig."""
  archs = hf.get("architectures") or []
  family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
  if family is None and hf.get("model_type") in FAMILY_ARCH:  # model_type names the family
    family = hf["model_type"]
  if family is None:
    raise UserError(f"config.json: unsupported architecture {archs or hf.get('model_type')!r}; "
                    f"supported: {', '.join(ARCHITECTURES)}")
  unsupported = {"hidden_act": hf.get("hidden_act", "silu") not in ("silu", "swish"),
                 "mlp_bias": bool(hf.get("mlp_bias")),
                 "use_sliding_window": bool(hf.get("use_sliding_window")),
                 "attention_bias": family != "qwen2" and bool(hf.get("attention_bias"))}
  for key, bad in unsupported.items():
    if bad:
      raise UserError(f"config.json: {key}={hf.get(key)!r} is not supported by ease-jax's decoder")
  theta, scaling = _rope_from_hf(hf)
  heads = hf["num_attention_heads"]
  qkv_bias = family == "qwen2"  # Qwen2 always has q/k/v bias (and no o_proj bias)
  return DecoderConfig(
      family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rope_theta=theta,
      rope_scaling=scaling, max_position_embeddings=hf.get("max_position_embeddings", 4096),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
      qk_norm=family == "qwen3", **overrides)


# Layout changes between an HF tensor (torch Linear: [out, in]) and our parameter.
def _in_heads(n: int) -> Callable:   # [N*H, D] -> [D, N, H]
  return lambda w, c: w.T.reshape(c.hidden_size, n, c.head_dim)


_TO_JAX: dict[str, Callable] = {
    "q_proj": lambda w, c: _in_heads(c.num_heads)(w, c),
    "kv_proj": lambda w, c: _in_heads(c.num_kv_heads)(w, c),
    "o_proj": lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
    "q_bias": lambda w, c: w.reshape(c.num_heads, c.head_dim),
    "kv_bias": lambda w, c: w.reshape(c.num_kv_heads, c.head_dim),
    "linear": lambda w, c: w.T,
    "same": lambda w, c: w,
}
_TO_HF: dict[str, Callable] = {
    "q_proj": lambda p, c: p.reshape(c.hidden_size, -1).T,
    "kv_proj": lambda p, c: p.reshape(c.hidden_size, -1).T,
    "o_proj": lambda p, c: p.reshape(-1, c.hidden_size).T,
    "q_bias": lambda p, c: p.reshape(-1),
    "kv_bias": lambda p, c: p.reshape(-1),
    "linear": lambda p, c: p.T,
    "same": lambda p, c: p,
}

_LAYER = [  # (HF suffix under model.layers.{i}., our path under layers.{i}., layout, needs)
    ("input_layernorm.weight", "input_layernorm.weight", "same", None),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight", "same", None),
    ("self_attn.q_proj.weight", "attn.q_proj", "q_proj", None),
    ("self_attn.k_proj.weight", "attn.k_proj", "kv_proj", None),
    ("self_attn.v_proj.weight", "attn.v_proj", "kv_proj", None),
    ("self_attn.o_proj.weight", "attn.o_proj", "o_proj", None),
    ("self_attn.q_proj.bias", "attn.q_bias", "q_bias", "qkv_bias"),
    ("self_attn.k_proj.bias", "attn.k_bias", "kv_bias", "qkv_bias"),
    ("self_attn.v_proj.bias", "attn.v_bias", "kv_bias", "qkv_bias"),
    ("self_attn.q_norm.weight", "attn.q_norm.weight", "same", "qk_norm"),
    ("self_attn.k_norm.weight", "attn.k_norm.weight", "same", "qk_norm"),
    ("mlp.gate_proj.weight", "mlp.gate_proj", "linear", None),
    ("mlp.up_proj.weight", "mlp.up_proj", "linear", None),
    ("mlp.down_proj.weight", "mlp.down_proj", "linear", None),
]


def weight_table(cfg: DecoderConfig) -> list[tuple[str, str, str]]:
  """(HF name, our parameter path, layout) for every tensor of a model with `cfg`."""
  rows = [("model.embed_tokens.weight", "embed", "same"), ("model.norm.weight", "norm.weight", "same")]
  if not cfg.tie_embeddings:
    rows.append(("lm_head.weight", "lm_head", "linear"))
  for i in range(cfg.num_layers):
    rows += [(f"model.layers.{i}.{hf}", f"layers.{i}.{ours}", layout)
             for hf, ours, layout, needs in _LAYER if needs is None or getattr(cfg, needs)]
  return rows


def path_str(path: tuple) -> str:
  """An nnx state path as the dotted string the weight table uses."""
  return ".".join(str(p) for p in path)


def to_jax(name_layout: str, w: Any, cfg: DecoderConfig) -> Any:
  """An HF tensor in our layout."""
  return _TO_JAX[name_layout](w, cfg)


def to_hf(name_layout: str, p: Any, cfg: DecoderConfig) -> Any:
  """One of our parameters in HF layout."""
  return _TO_HF[name_layout](p, cfg)


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


def assemble(cfg: DecoderConfig, values: dict[str, jax.Array]) -> Decoder:
  """A Decoder for `cfg` whose parameters are `values` (dotted path -> array), without init."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  flat = [(p, v.replace(values[path_str(p)])) for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def param_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
  """Dotted parameter path -> shape, from an abstract model (no memory used)."""
  state = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  return {path_str(p): tuple(v.shape) for p, v in nnx.to_flat_state(state)}


def load_pretrained(path: str | Path, dtype: str = "float32",
                    **overrides: Any) -> tuple[Decoder, DecoderConfig]:
  """Reads a local HF directory (config.json + safetensors) or a `.gguf` file into a
  Decoder, without torch.

  `dtype` is the parameter dtype; `overrides` set other DecoderConfig fields
  (e.g. compute_dtype, remat). Missing, extra or misshapen tensors are errors naming them.
  """
  path = Path(path)
  if path.suffix.lower() == ".gguf":
    from ease_jax.gguf_io import load_gguf  # gguf_io imports this module
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


def save_pretrained(model: Decoder, config: DecoderConfig, out_dir: str | Path, tokenizer: Any = None,
                    dtype: str = "bfloat16", **kwargs: Any) -> Path:
  """Exports to a Hugging Face directory (see `ease_jax.export.save_pretrained`)."""
  from ease_jax.export import save_pretrained as _save  # export imports this module
  return _save(model, config, out_dir, tokenizer=tokenizer, dtype=dtype, **kwargs)

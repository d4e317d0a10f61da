"""Hugging Face checkpoints: config mapping and the weight-name table.

One table (`_LAYER`, read through `weight_table`) relates every HF tensor name to the
decoder's parameter path and the layout change between them; import (`hf.load`, GGUF
import) and export (`hf.save`, GGUF export) all read it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from ease_jax.errors import UserError
from ease_jax.models import Decoder, DecoderConfig
from ease_jax.models.paths import path_str

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


def to_jax(name_layout: str, w: Any, cfg: DecoderConfig) -> Any:
  """An HF tensor in our layout."""
  return _TO_JAX[name_layout](w, cfg)


def to_hf(name_layout: str, p: Any, cfg: DecoderConfig) -> Any:
  """One of our parameters in HF layout."""
  return _TO_HF[name_layout](p, cfg)


def assemble(cfg: DecoderConfig, values: dict[str, jax.Array]) -> Decoder:
  """A Decoder for `cfg` whose parameters are `values` (dotted path -> array), without init."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  flat = [(p, v.replace(values[path_str(p)])) for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def param_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
  """Dotted parameter path -> shape, from an abstract model (no memory used)."""
  state = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  return {path_str(p): tuple(v.shape) for p, v in nnx.to_flat_state(state)}

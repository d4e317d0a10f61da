"""GGUF import (llama.cpp's file format): hyper-parameters, dequantized weights, tokenizer.

Reads with the `gguf` package (no torch). Tensor names map onto the Hugging Face names of
`ease_jax.hf`'s weight table, so the layout changes to our parameters are the same as for an
HF directory. For the `llama` architecture llama.cpp stores q/k rows permuted for its
interleaved RoPE; they are put back into the rotate-half order transformers (and ours) use.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from tokenizers import pre_tokenizers

from ease_jax.errors import UserError
from ease_jax.hf.mapping import assemble, param_shapes, to_hf, to_jax, weight_table
from ease_jax.models import Decoder, DecoderConfig
from ease_jax.models.layers import dtype_of

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
ARCHITECTURES = ("llama", "qwen2", "qwen3")

# GGUF tensor name (after blk.{i}.) -> HF name (after model.layers.{i}.)
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
ROPE_FREQS = "rope_freqs.weight"


def gguf_to_hf_name(name: str) -> str | None:
  """The HF tensor name for a GGUF tensor name, or None when it has no counterpart."""
  if name in GLOBAL_NAMES:
    return GLOBAL_NAMES[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
    return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
  return None


def hf_to_gguf_name(name: str) -> str:
  """The GGUF tensor name for an HF tensor name of the weight table."""
  for ours, hf in GLOBAL_NAMES.items():
    if name == hf:
      return ours
  _, _, i, rest = name.split(".", 3)
  return f"blk.{i}." + next(g for g, h in LAYER_NAMES.items() if h == rest)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's q/k row order (interleaved RoPE pairs) from HF's rotate-half order."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """HF's rotate-half q/k row order from llama.cpp's (the inverse of `permute_qk`)."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str | Path) -> gguf.GGUFReader:
  """A GGUFReader on `path`, or a UserError naming the file."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"{path}: GGUF file not found")
  try:
    return gguf.GGUFReader(str(path))
  except (ValueError, OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not a readable GGUF file ({e})") from None


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
  """Every key-value pair of the file, values as Python scalars, strings or lists."""
  return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _llama3_scaling(factors: np.ndarray, head_dim: int, theta: float, where: str) -> tuple:
  """HF `llama3` rope scaling reproducing llama.cpp's per-frequency `rope_freqs` factors.

  The factors depend on (low_freq_factor, high_freq_factor, original length) only through
  two numbers, so low_freq_factor=1 is fixed and the other two are solved from the
  factors between 1 and `factor`; the result is checked against every factor."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  factors = np.asarray(factors, np.float64)
  factor = float(factors.max())
  wavelen = 2 * math.pi / inv_freq
  medium = (factors > 1 + 1e-6) & (factors < factor - 1e-6 * factor)
  if factor > 1 and medium.sum() >= 2:
    smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(1 / wavelen[medium], smooth, 1)  # smooth = a / wavelen + b
    # 6 significant digits: the float32 factors do not pin the values any closer.
    params = dict(rope_type="llama3", factor=factor, low_freq_factor=1.0,
                  high_freq_factor=float(f"{1 - 1 / b:.6g}"),
                  original_max_position_embeddings=float(f"{-a / b:.6g}"))
    if params["original_max_position_embeddings"].is_integer():
      params["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    if np.allclose(llama3_factors(params, head_dim, theta), factors, rtol=1e-4):
      return tuple(sorted(params.items()))
  raise UserError(f"{where}: {ROPE_FREQS} holds per-frequency RoPE factors that are not "
                  f"Llama-3 scaling with a smooth band; not supported")


def llama3_factors(params: dict, head_dim: int, theta: float) -> np.ndarray:
  """llama.cpp's `rope_freqs` for HF llama3 scaling (as convert_hf_to_gguf.py computes it)."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
  factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
  old_len = params["original_max_position_embeddings"]
  out = []
  for wavelen in 2 * math.pi / inv_freq:
    if wavelen < old_len / high:
      out.append(1.0)
    elif wavelen > old_len / low:
      out.append(factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def config_from_gguf(reader: gguf.GGUFReader, where: str, **overrides: Any) -> DecoderConfig:
  """Maps a GGUF's `{arch}.*` hyper-parameters onto a DecoderConfig."""
  meta = metadata(reader)
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise UserError(f"{where}: general.architecture {arch!r} is not supported "
                    f"(supported: {', '.join(ARCHITECTURES)})")

  def key(name: str, default: Any = None) -> Any:
    value = meta.get(f"{arch}.{name}", default)
    if value is None:
      raise UserError(f"{where}: metadata key {arch}.{name} is missing")
    return value

  tensors = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in tensors:
    raise UserError(f"{where}: tensor token_embd.weight is missing")
  hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
  head_dim = int(key("attention.key_length", hidden // heads))
  theta = float(key("rope.freq_base", 10000.0))
  scaling = None
  kind = meta.get(f"{arch}.rope.scaling.type", "none")
  if kind == "linear":
    scaling = (("factor", float(key("rope.scaling.factor"))), ("rope_type", "linear"))
  elif kind != "none":
    raise UserError(f"{where}: {arch}.rope.scaling.type={kind!r} is not supported "
                    f"(supported: none, linear, and llama3 factors in {ROPE_FREQS})")
  if ROPE_FREQS in tensors:
    scaling = _llama3_scaling(_dequantized(tensors[ROPE_FREQS], where), head_dim, theta, where)
  if arch == "llama" and "blk.0.attn_q.bias" in tensors:
    raise UserError(f"{where}: llama with attention biases is not supported")
  return DecoderConfig(
      family=arch, vocab_size=int(tensors["token_embd.weight"].shape[1]), hidden_size=hidden,
      intermediate_size=int(key("feed_forward_length")), num_layers=int(key("block_count")),
      num_heads=heads, num_kv_heads=int(key("attention.head_count_kv", heads)), head_dim=head_dim,
      rope_theta=theta, rope_scaling=scaling,
      max_position_embeddings=int(key("context_length", 4096)),
      rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in tensors, qkv_bias=arch == "qwen2",
      qk_norm=arch == "qwen3", **overrides)


def _dequantized(tensor: Any, where: str) -> np.ndarray:
  """A tensor as float32 in numpy order ([rows, cols] = HF's [out, in])."""
  qtype = Q(tensor.tensor_type)
  if qtype not in SUPPORTED_TYPES:
    raise UserError(f"{where}: tensor {tensor.name!r} has quantization type {qtype.name}, "
                    f"which is not supported (supported: "
                    f"{', '.join(t.name for t in SUPPORTED_TYPES)})")
  shape = tuple(int(d) for d in reversed(tensor.shape))
  return np.asarray(gguf.dequantize(tensor.data, qtype), np.float32).reshape(shape)


def read_tensors(reader: gguf.GGUFReader, cfg: DecoderConfig, where: str) -> dict[str, np.ndarray]:
  """HF name -> float32 array in HF layout (q/k un-permuted for llama), shapes checked."""
  shapes = param_shapes(cfg)
  expected = {hf: to_hf(layout, np.empty(shapes[ours], np.int8), cfg).shape
              for hf, ours, layout in weight_table(cfg)}
  out: dict[str, np.ndarray] = {}
  for tensor in reader.tensors:
    if tensor.name == ROPE_FREQS:
      continue  # read into the config's rope scaling
    name = gguf_to_hf_name(tensor.name)
    if name is None or name not in expected:
      raise UserError(f"{where}: unexpected tensor {tensor.name!r} for a {cfg.family} model "
                      f"with this file's hyper-parameters")
    w = _dequantized(tensor, where)
    if w.shape != expected[name]:
      raise UserError(f"{where}: tensor {tensor.name!r} has shape {w.shape}; "
                      f"the hyper-parameters expect {expected[name]}")
    if cfg.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      w = unpermute_qk(w, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
    out[name] = w
  missing = [n for n in expected if n not in out]
  if missing:
    raise UserError(f"{where}: missing tensor(s) {', '.join(hf_to_gguf_name(n) for n in missing[:5])}"
                    f"{' ...' if len(missing) > 5 else ''}")
  return out


def load_gguf(path: str | Path, dtype: str = "float32",
              **overrides: Any) -> tuple[Decoder, DecoderConfig]:
  """A Decoder from a GGUF file (llama, qwen2, qwen3), weights dequantized to `dtype`."""
  where = str(path)
  reader = open_gguf(path)
  cfg = config_from_gguf(reader, where, param_dtype=dtype, **overrides)
  values = {}
  tensors = read_tensors(reader, cfg, where)
  for hf_name, ours, layout in weight_table(cfg):
    values[ours] = jnp.asarray(to_jax(layout, tensors.pop(hf_name), cfg), dtype_of(dtype))
  return assemble(cfg, values), cfg


def load_gguf_tokenizer(path: str | Path) -> Any:
  """The tokenizer a GGUF describes (vocabulary, merges, special tokens, chat template)."""
  from transformers import AutoTokenizer  # heavy; only tokenizer loading needs it

  path = Path(path)
  open_gguf(path)  # a located error before transformers' own
  try:
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"{path}: could not build a tokenizer from the GGUF metadata: {e}") from None
  if metadata(open_gguf(path)).get("tokenizer.ggml.pre") == "smollm":
    # llama.cpp's `smollm` splits every digit off before GPT-2's regex, as SmolLM's own
    # tokenizer.json does; transformers builds the GPT-2 split only.
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  return tokenizer


def describe(path: str | Path) -> dict[str, Any]:
  """A short summary: architecture, hyper-parameters, tensor types (for tools and errors)."""
  reader = open_gguf(path)
  meta = metadata(reader)
  types: dict[str, int] = {}
  for t in reader.tensors:
    types[Q(t.tensor_type).name] = types.get(Q(t.tensor_type).name, 0) + 1
  return {"architecture": meta.get("general.architecture"), "name": meta.get("general.name"),
          "tensor_types": types, "tokenizer": meta.get("tokenizer.ggml.model"),
          "pre_tokenizer": meta.get("tokenizer.ggml.pre"),
          "chat_template": bool(meta.get("tokenizer.chat_template"))}


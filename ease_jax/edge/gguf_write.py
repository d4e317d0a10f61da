"""Direct GGUF export (llama.cpp's format), written with the `gguf` package's GGUFWriter.

What llama.cpp's own `convert_hf_to_gguf.py` would write for a Llama / Qwen2 / Qwen3
checkpoint: the tensors under llama.cpp's names (llama q/k rows permuted for its RoPE,
Llama-3 scaling as a `rope_freqs` tensor), the hyper-parameters, and the byte-level BPE
tokenizer: vocabulary, merges, token types (`<think>`/`</think>` user-defined, so one
token each), special ids with the end-of-turn token as EOT (so it is end-of-generation),
the run's chat template, and a pre-tokenizer name llama.cpp knows whose split matches
the tokenizer's own (the demo tokenizer's is Qwen2's regex: `qwen2`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ease_jax.edge.gguf_read import ROPE_FREQS, hf_to_gguf_name, llama3_factors, permute_qk
from ease_jax.errors import UserError
from ease_jax.hf.mapping import to_hf, weight_table
from ease_jax.models.paths import path_str
from ease_jax.hf.save import END_OF_TURN_TOKENS
from ease_jax.models import Decoder, DecoderConfig

Q, FT = gguf.GGMLQuantizationType, gguf.LlamaFileType
# --type -> (tensor type of 2-D weights, the file type llama.cpp reports)
TYPES = {"F32": (Q.F32, FT.ALL_F32), "F16": (Q.F16, FT.MOSTLY_F16), "BF16": (Q.BF16, FT.MOSTLY_BF16),
         "Q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0), "Q4_0": (Q.Q4_0, FT.MOSTLY_Q4_0),
         "Q4_1": (Q.Q4_1, FT.MOSTLY_Q4_1), "Q5_0": (Q.Q5_0, FT.MOSTLY_Q5_0),
         "Q5_1": (Q.Q5_1, FT.MOSTLY_Q5_1)}

# Pre-tokenizer splits (as tokenizer.json spells them) -> the llama.cpp pre-tokenizer name
# that splits text the same way (src/llama-vocab.cpp).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_NAMES = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def _byte_level(step: dict, use_regex: bool) -> bool:
  return (step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == use_regex
          and not step.get("add_prefix_space", False))


def pre_tokenizer_name(tokenizer: Any) -> str:
  """llama.cpp's name for the tokenizer's pre-tokenizer, or a UserError saying which it is."""
  spec = json.loads(tokenizer.backend_tokenizer.to_str())
  pre = spec.get("pre_tokenizer") or {}
  steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
  if spec.get("model", {}).get("type") != "BPE":
    raise UserError(f"GGUF export: only byte-level BPE tokenizers are supported, not "
                    f"{spec.get('model', {}).get('type')!r}")
  if len(steps) == 1 and _byte_level(steps[0], use_regex=True):
    return "gpt-2"  # GPT-2's regex: the same in llama.cpp's gpt-2 pre-tokenizer
  if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
      and _byte_level(steps[1], use_regex=True)):
    return "smollm"  # \p{N} one by one, then GPT-2's regex
  if len(steps) == 2 and steps[0].get("type") == "Split" and _byte_level(steps[1], False):
    name = _SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
    if name:
      return name
  raise UserError(f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} has no "
                  f"llama.cpp equivalent known to ease-jax (known: GPT-2 byte-level, SmolLM "
                  f"digits, Qwen2, Llama-3)")


def _merges(tokenizer: Any) -> list[str]:
  merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges", [])
  return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
  """Token strings and llama.cpp token types for ids [0, vocab_size); unused rows padded."""
  T = gguf.TokenType
  by_id = {i: t for t, i in tokenizer.get_vocab().items()}
  added = tokenizer.added_tokens_decoder
  tokens, types = [], []
  for i in range(vocab_size):
    if i not in by_id:
      tokens.append(f"[PAD{i}]")
      types.append(T.UNUSED)
    elif i in added:  # special -> control (never printed); else user-defined (kept whole)
      tokens.append(added[i].content)
      types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
    else:
      tokens.append(by_id[i])
      types.append(T.NORMAL)
  return tokens, types


def _adds_bos(tokenizer: Any) -> bool:
  with_special = tokenizer("a")["input_ids"]
  return bool(tokenizer.bos_token_id is not None and with_special[:1] == [tokenizer.bos_token_id])


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int,
                  chat_template: str | None = None) -> None:
  """Vocabulary, merges, special ids (end-of-turn as EOT), chat template."""
  if len(tokenizer) > vocab_size:
    raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                    f"{vocab_size} embedding rows")
  tokens, types = _tokens(tokenizer, vocab_size)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(_merges(tokenizer))
  vocab = tokenizer.get_vocab()
  if tokenizer.bos_token_id is not None:
    writer.add_bos_token_id(tokenizer.bos_token_id)
  writer.add_add_bos_token(_adds_bos(tokenizer))
  if tokenizer.eos_token_id is None:
    raise UserError("GGUF export: the tokenizer has no eos token; generation would not stop")
  writer.add_eos_token_id(tokenizer.eos_token_id)
  eot = next((vocab[t] for t in END_OF_TURN_TOKENS if t in vocab), tokenizer.eos_token_id)
  writer.add_eot_token_id(eot)
  if tokenizer.pad_token_id is not None:
    writer.add_pad_token_id(tokenizer.pad_token_id)
  template = chat_template if chat_template is not None else tokenizer.chat_template
  if template:
    writer.add_chat_template(template)


def add_hyperparameters(writer: gguf.GGUFWriter, cfg: DecoderConfig, file_type: int,
                        name: str) -> None:
  """The `{arch}.*` keys llama.cpp reads for these families."""
  writer.add_name(name)
  writer.add_block_count(cfg.num_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_key_length(cfg.head_dim)
  writer.add_value_length(cfg.head_dim)
  writer.add_rope_dimension_count(cfg.head_dim)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_file_type(file_type)
  scaling = dict(cfg.rope_scaling or {})
  if scaling.get("rope_type") == "linear":
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(scaling["factor"]))
  elif scaling and scaling.get("rope_type") != "llama3":  # llama3: the rope_freqs tensor
    raise UserError(f"GGUF export: rope scaling {scaling.get('rope_type')!r} is not supported")


def gguf_tensors(model: Decoder, cfg: DecoderConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(GGUF name, float32 array in llama.cpp's layout), one tensor at a time."""
  values = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
  for hf_name, ours, layout in weight_table(cfg):
    w = np.asarray(jax.device_get(jnp.asarray(values[ours][...]).astype(jnp.float32)))
    w = np.ascontiguousarray(to_hf(layout, w, cfg))
    if cfg.family == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
      w = permute_qk(w, cfg.num_heads if "q_proj" in hf_name else cfg.num_kv_heads)
    yield hf_to_gguf_name(hf_name), w
  scaling = dict(cfg.rope_scaling or {})
  if scaling.get("rope_type") == "llama3":
    yield ROPE_FREQS, llama3_factors(scaling, cfg.head_dim, cfg.rope_theta)


def _encode(w: np.ndarray, qtype: int) -> tuple[np.ndarray, int]:
  """`w` in the file's type: 1-D tensors (norms, biases) stay F32 as llama.cpp expects, and
  rows a quantized block does not divide fall back to F16, as convert_hf_to_gguf.py does."""
  if w.ndim == 1 or qtype == Q.F32:
    return w.astype(np.float32), Q.F32
  block = gguf.GGML_QUANT_SIZES[Q(qtype)][0]
  if w.shape[-1] % block:
    qtype = Q.F16
  if qtype == Q.F16:
    return w.astype(np.float16), Q.F16
  return gguf.quantize(w, Q(qtype)), Q(qtype)


def save_gguf(model: Decoder, cfg: DecoderConfig, out: str | Path, tokenizer: Any,
              type_name: str = "F16", chat_template: str | None = None, name: str = "ease-jax",
              overwrite: bool = False) -> Path:
  """Writes one .gguf file (temporary sibling, renamed into place when complete)."""
  out = Path(out)
  if type_name not in TYPES:
    raise UserError(f"GGUF type {type_name!r} is not supported; choose {', '.join(TYPES)}")
  if cfg.family not in ("llama", "qwen2", "qwen3"):
    raise UserError(f"GGUF export: unsupported architecture family {cfg.family!r}")
  if out.exists() and not overwrite:
    raise UserError(f"{out} already exists; pass --overwrite to replace it")
  qtype, file_type = TYPES[type_name]
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
  os.close(fd)
  try:
    writer = gguf.GGUFWriter(tmp, cfg.family)
    add_hyperparameters(writer, cfg, file_type, name)
    add_tokenizer(writer, tokenizer, cfg.vocab_size, chat_template)
    for tensor_name, w in gguf_tensors(model, cfg):
      data, dtype = _encode(w, qtype)
      writer.add_tensor(tensor_name, data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it owner-only; a model file is not secret
    os.replace(tmp, out)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return out


def _nll(logits: np.ndarray, ids: list[int]) -> float:
  """Mean next-token negative log-likelihood of `ids` under `logits` [T, V]."""
  z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def _rounded_like_file(model: Decoder, dtype: Any) -> Decoder:
  """`model` with the matrices rounded to `dtype` as the file stores them; norms and biases
  stay float32 (llama.cpp keeps 1-D tensors in F32)."""
  if dtype is None:
    return model
  graphdef, state = nnx.split(model)
  flat = [(p, v.replace(v[...] if _kept_f32(path_str(p)) else
                        v[...].astype(dtype).astype(jnp.float32)))
          for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _kept_f32(path: str) -> bool:
  return "norm" in path or path.endswith("_bias")


def verify_gguf(model: Decoder, path: str | Path, token_ids: list[list[int]],
                type_name: str) -> list[dict]:
  """The GGUF read back (ease_jax.edge.gguf_read) vs the checkpoint, per token sequence.

  For F32/F16/BF16 the checkpoint's parameters are rounded to the file's type first, so
  `max_abs_diff` is an export error, not rounding. For quantized types it is the
  quantization's effect, reported with the greedy (argmax) agreement over all positions
  and the mean next-token loss of both models on the sequences."""
  from ease_jax.edge.gguf_read import load_gguf  # imports this module's names' sources; no cycle

  ref_model = _rounded_like_file(model, {"F16": jnp.float16, "BF16": jnp.bfloat16}.get(type_name))
  read_back, _ = load_gguf(path)
  results = []
  for ids in token_ids:
    tokens = jnp.asarray([ids], jnp.int32)
    ref = np.asarray(ref_model(tokens)[0])
    out = np.asarray(read_back(tokens)[0])
    results.append({"tokens": len(ids), "max_abs_diff": float(np.abs(out - ref).max()),
                    "max_abs_logit": float(np.abs(ref).max()),
                    "argmax_agreement": float((out.argmax(-1) == ref.argmax(-1)).mean()),
                    "loss_checkpoint": _nll(ref, ids), "loss_gguf": _nll(out, ids)})
  return results

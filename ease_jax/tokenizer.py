"""The bundled demo tokenizer, loading any HF tokenizer, and the `<think>` tokens."""

import os
from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ease_jax.errors import UserError

THINK_TOKENS = ("<think>", "</think>")


def demo_tokenizer_path() -> str:
  """Directory of the byte-level BPE tokenizer bundled with the package."""
  return str(Path(__file__).resolve().parent / "assets" / "demo_tokenizer")


def load_tokenizer(path: str = "") -> PreTrainedTokenizerBase:
  """Loads a local HF tokenizer directory or a .gguf file's tokenizer ("" = the demo
  tokenizer); never runs remote code."""
  path = path or demo_tokenizer_path()
  if path.lower().endswith(".gguf"):
    from ease_jax.gguf_io import load_gguf_tokenizer  # imports the model code; only for GGUF
    return load_gguf_tokenizer(path)
  if not os.path.isdir(path):
    raise UserError(f"tokenizer directory not found: {path}")
  try:
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
  except (OSError, ValueError) as e:
    raise UserError(f"could not load a tokenizer from {path}: {e}") from e


def ensure_think_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
  """Adds `<think>`/`</think>` if absent (one token each); returns the ids of added tokens."""
  vocab = tokenizer.get_vocab()
  missing = [t for t in THINK_TOKENS if t not in vocab]
  # special=False as in Qwen3: still never split, but kept by decode(skip_special_tokens=True),
  # so evaluation can see whether the model opened a think block.
  tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
  return [tokenizer.convert_tokens_to_ids(t) for t in missing]

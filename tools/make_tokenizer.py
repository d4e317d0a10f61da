"""Builds the demo byte-level BPE tokenizer from the project's own text, reproducibly.

  python tools/make_tokenizer.py [--out ease_jax/assets/demo_tokenizer] [--vocab_size 2048]
"""

import argparse
import json
import os
import sys

from tokenizers import (
  AddedToken,
  Tokenizer,
  decoders,
  models,
  normalizers,
  pre_tokenizers,
  processors,
  trainers,
)
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ease_jax.demo import text as demo_text  # noqa: E402
from ease_jax.errors import UserError  # noqa: E402
from ease_jax.tokenizer import THINK_TOKENS, demo_tokenizer_path, qwen2_pre_tokenizer  # noqa: E402

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen-style ChatML, no default system prompt.
CHAT_TEMPLATE = (
  "{%- for message in messages %}"
  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
  "{%- endfor %}"
  "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
  """Trains byte-level BPE on `texts`; vocab_size counts the special and think tokens."""
  if vocab_size < 256 + len(SPECIAL_TOKENS) + len(THINK_TOKENS) + 1:
    raise UserError(f"--vocab_size {vocab_size} is below the 256 byte symbols plus special tokens")
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size - len(THINK_TOKENS), min_frequency=2, show_progress=False,
    special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  # Served with Qwen2's pre-tokenizer: the demo model is a Qwen2-family model, and transformers
  # loads a Qwen2 export's tokenizer as Qwen2Tokenizer, which always splits text this way. With
  # it in tokenizer.json, training, transformers and llama.cpp tokenize every text alike.
  tok.pre_tokenizer = qwen2_pre_tokenizer()
  # Think tokens are plain added tokens (Qwen3 convention): one id each, kept by
  # decode(skip_special_tokens=True).
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token=None, unk_token=None, eos_token="<|im_end|>",
    pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE, model_max_length=32768,
    clean_up_tokenization_spaces=False)


def make(out: str, vocab_size: int, seed: int = 0) -> PreTrainedTokenizerFast:
  """Builds the tokenizer from the demo corpus and writes it to `out` (HF format)."""
  tokenizer = build_tokenizer(demo_text.corpus_texts(seed), vocab_size)
  os.makedirs(out, exist_ok=True)
  tokenizer.save_pretrained(out)
  # transformers 5 writes its internal class name; the public alias also loads in 4.x.
  config_path = os.path.join(out, "tokenizer_config.json")
  with open(config_path) as f:
    config = json.load(f)
  config["tokenizer_class"] = "PreTrainedTokenizerFast"
  with open(config_path, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  return tokenizer


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=demo_tokenizer_path())
  parser.add_argument("--vocab_size", type=int, default=2048)
  args = parser.parse_args(argv)
  try:
    tokenizer = make(args.out, args.vocab_size)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out} (vocab {len(tokenizer)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())

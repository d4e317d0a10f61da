"""The bundled demo tokenizer, loading any HF tokenizer, the `<think>` tokens, and the run's
effective chat template (the one training renders with, saved and served with the run)."""

import os
from pathlib import Path

from tokenizers import AddedToken, Regex, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ease_jax.errors import UserError

THINK_TOKENS = ("<think>", "</think>")
# Qwen2's pre-tokenizer split (as published in Qwen2/2.5's tokenizer.json, and as transformers'
# Qwen2Tokenizer rebuilds it whatever tokenizer.json says).
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
  """Qwen2's pre-tokenizer: the split above, then byte-level mapping without a second regex."""
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def demo_tokenizer_path() -> str:
  """Directory of the byte-level BPE tokenizer bundled with the package."""
  return str(Path(__file__).resolve().parent / "assets" / "demo_tokenizer")


def load_tokenizer(path: str = "") -> PreTrainedTokenizerBase:
  """Loads a local HF tokenizer directory or a .gguf file's tokenizer ("" = the demo
  tokenizer); never runs remote code."""
  path = path or demo_tokenizer_path()
  if path.lower().endswith(".gguf"):
    from ease_jax.edge.gguf_read import load_gguf_tokenizer  # imports the model code; only for GGUF
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


# An empty think block, as ease_jax.data.render.assistant_content writes it for direct targets.
EMPTY_THINK = f"{THINK_TOKENS[0]}\n\n{THINK_TOKENS[1]}\n\n"


def _jinja_string(text: str) -> str:
  """`text` as a Jinja string literal (Jinja unescapes Python-style backslash escapes)."""
  return repr(str(text))


def effective_chat_template(template: str, system_prompt: str = "",
                            empty_think: bool = False) -> str:
  """`template` preceded by the data options training applies, so serving renders the same.

  `system_prompt` is inserted as the first turn when the conversation has no system turn;
  `empty_think` writes the empty think block into a final assistant turn that has none (the turn
  training supervises; earlier turns are rendered as given, as in training).
  """
  head = []
  if empty_think:
    head.append(
        "{%- set _ease = namespace(messages=[]) %}{%- for m in messages %}"
        "{%- if loop.last and m.role == 'assistant' and m.content is string"
        " and '<think>' not in m.content %}"
        "{%- set _ease.messages = _ease.messages + [{'role': m.role, 'content': "
        + _jinja_string(EMPTY_THINK) + " + m.content}] %}"
        "{%- else %}{%- set _ease.messages = _ease.messages + [m] %}{%- endif %}{%- endfor %}"
        "{%- set messages = _ease.messages %}")
  if system_prompt:
    head.append(
        "{%- if not messages or messages[0].role != 'system' %}{%- set messages = "
        "[{'role': 'system', 'content': " + _jinja_string(system_prompt) + "}] + messages %}"
        "{%- endif %}")
  head = "".join(head)
  return template if template.startswith(head) else head + template  # idempotent


def training_template(tokenizer: PreTrainedTokenizerBase, chat_template: str = "") -> str:
  """The template training starts from: the `data.chat_template` file, else the tokenizer's."""
  if chat_template:
    if not os.path.isfile(chat_template):
      raise UserError(f"data.chat_template: file not found: {chat_template}")
    with open(chat_template, encoding="utf-8") as f:
      return f.read()
  return tokenizer.chat_template or ""


def apply_run_template(tokenizer: PreTrainedTokenizerBase, chat_template: str = "",
                       system_prompt: str = "", empty_think: bool = False) -> None:
  """Sets the tokenizer's template to the run's effective one (what it is saved and served with)."""
  template = training_template(tokenizer, chat_template)
  if template and (chat_template or system_prompt or empty_think):
    tokenizer.chat_template = effective_chat_template(template, system_prompt, empty_think)

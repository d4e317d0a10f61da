"""Tiny byte-level BPE tokenizers with the special tokens of the fixture chat templates.

Built in memory from a small corpus (no model hub): `chatml_tokenizer()` (Qwen2.5 template),
`llama3_tokenizer()` (Llama-3.2 template) and `qwen3_tokenizer()` (a small Qwen3-like template
written here). `<think>` and `</think>` are added special tokens unless `think=False`.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# The published Qwen2.5-Instruct and Llama-3.2-Instruct chat templates, verbatim.
TEMPLATES = Path(__file__).resolve().parent / "data" / "chat_templates"

THINK = ["<think>", "</think>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]

# A Qwen3-like template: ChatML; reasoning is split off assistant content at </think> and
# kept only after the last user turn; the generation prompt may open <think> itself.
QWEN3_TEMPLATE = """\
{%- set ns = namespace(last_query=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'assistant' %}
{%- set content = m.content %}{%- set reasoning = '' %}
{%- if '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
{%- endif %}
{%- else %}
{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if open_think is defined and open_think %}{{- '<think>\\n' }}{%- endif %}{%- endif %}"""

# Same, but the generation prompt always opens <think> (QwQ / Qwen3-Thinking style).
QWEN3_OPEN_THINK_TEMPLATE = QWEN3_TEMPLATE.replace("open_think is defined and open_think", "true")

# A template that drops everything before </think> from every assistant turn (R1 style).
DROPS_THINK_TEMPLATE = """\
{%- for m in messages %}
{%- set content = m.content.split('</think>')[-1] if m.role == 'assistant' else m.content %}
{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

_CORPUS = [
    "You are a helpful assistant. The user asks a question and the assistant answers it.",
    "I cannot help with that request because it could cause harm. Here is a safer idea.",
    "Let me think about whether this request is safe. The policy says violent content is not ok.",
    "Sure! The capital of France is Paris. 2 + 2 = 4. Cutting Knowledge Date: December 2023",
    "Today Date: 26 Jul 2024\n\nsystem user assistant\n\n Ünïcödé naïve café — 你好",
]


@functools.lru_cache(maxsize=None)
def _bpe_json() -> str:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(_CORPUS * 4, trainer)
  return tok.to_str()


def _build(specials: list[str], template: str, think: bool, **named: str) -> PreTrainedTokenizerFast:
  tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe_json()), **named)
  tok.add_special_tokens({"additional_special_tokens": specials + (THINK if think else [])})
  tok.chat_template = template
  return tok


def chatml_tokenizer(think: bool = True) -> PreTrainedTokenizerFast:
  """Qwen2.5-Instruct template (default system prompt) over a tiny BPE."""
  return _build(CHATML_SPECIALS, (TEMPLATES / "qwen2_5_instruct.jinja").read_text(), think,
                eos_token="<|im_end|>", pad_token="<|endoftext|>")


def llama3_tokenizer(think: bool = True) -> PreTrainedTokenizerFast:
  """Llama-3.2-Instruct template (date line, trimmed content) over a tiny BPE."""
  return _build(LLAMA3_SPECIALS, (TEMPLATES / "llama3_2_instruct.jinja").read_text(), think,
                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def qwen3_tokenizer(template: str = QWEN3_TEMPLATE, think: bool = True) -> PreTrainedTokenizerFast:
  """A Qwen3-like template (drops earlier reasoning, may open <think>) over a tiny BPE."""
  return _build(CHATML_SPECIALS, template, think, eos_token="<|im_end|>",
                pad_token="<|endoftext|>")

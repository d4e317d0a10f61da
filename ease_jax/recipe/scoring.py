"""What a generation is made of, the same for every template family: its think block, its
final answer, whether it reasoned and whether it was cut off.

A generation *reasoned* when it holds a think block with non-empty content, wherever that block
was opened: by the model (the continuation starts with `<think>`) or by the chat template (the
generation prompt ends with `<think>`, as DeepSeek-R1-Distill and QwQ templates do, so the
continuation is the think text, then `</think>`, then the answer). An empty block
(`<think>\\n\\n</think>\\n\\n...`, what Qwen3-style templates and `data.empty_think=true` write for a
direct answer) is not reasoning.

The *answer* is the text after `</think>`, or the whole text when there is no think block. A
think block that never closes (cut off by `max_new_tokens`, or ended without `</think>`) leaves
no answer: refusal and judge scoring see nothing, so a half-written thought such as "I cannot
see any harm here" is not counted as a refusal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ease_jax.data.records import THINK_CLOSE, THINK_OPEN

_OPEN_THINK_AT_END = re.compile(re.escape(THINK_OPEN) + r"\s*$")


@dataclass(frozen=True)
class Parsed:
  """One generation split into its think text and its final answer."""
  think: str | None  # the think block's content; None when there is no think block
  answer: str | None  # the final answer; None when a think block never closed
  opened_by_prompt: bool = False  # the generation prompt opened the think block

  @property
  def reasoned(self) -> bool:
    """A think block with non-empty content."""
    return bool(self.think and self.think.strip())

  @property
  def answered(self) -> bool:
    """There is a final answer (possibly empty) after the think block, or no think block."""
    return self.answer is not None

  def full_text(self) -> str:
    """The reasoning and the answer as one text, `<think>` written out even when the prompt
    opened it (what a judge sees when it is asked to include the reasoning)."""
    if self.think is None:
      return self.answer or ""
    closed = f"{THINK_CLOSE}\n\n{self.answer}" if self.answer is not None else ""
    return f"{THINK_OPEN}\n{self.think.strip()}\n{closed}".strip()


def prompt_opens_think(prompt_text: str) -> bool:
  """Whether a rendered generation prompt ends inside an opened think block (`...<think>\\n`)."""
  return bool(_OPEN_THINK_AT_END.search(prompt_text))


def parse(text: str, opened_by_prompt: bool = False) -> Parsed:
  """Splits a generated continuation into think text and answer (see the module docstring)."""
  body = text.lstrip()
  if not opened_by_prompt:
    if not body.startswith(THINK_OPEN):
      return Parsed(None, text.strip())
    body = body[len(THINK_OPEN):]
  think, closed, answer = body.partition(THINK_CLOSE)
  return Parsed(think.strip(), answer.strip() if closed else None, opened_by_prompt)


def think_token_count(ids: Sequence[int], think_open: int, think_close: int,
                      opened_by_prompt: bool = False) -> int:
  """Generated tokens of the leading think block, tags included (unclosed: to the end).

  With `opened_by_prompt` the block starts before the first generated token, so every token up
  to and including `</think>` counts (the prompt's `<think>` was not generated)."""
  ids = list(ids)
  if not opened_by_prompt:
    if not ids or ids[0] != think_open:
      return 0
  return ids.index(think_close) + 1 if think_close in ids else len(ids)

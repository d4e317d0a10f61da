"""Chat rendering through the tokenizer's own template: token ids, loss mask, spans, gate.

The assistant turn is found by rendering the prompt alone (``add_generation_prompt=True``) and
the whole conversation, and taking the part of the second that follows the first; it is never
searched for by a marker string. The rendered turn is then checked to reproduce the intended
assistant content (think text included) followed by one end-of-turn special token, and the
supervised token ids are decoded and compared with that text. A template that rewrites or drops
the content (e.g. one that removes everything before ``</think>``) is an error that names the
template; ``data.chat_template`` supplies a training template instead.

Fixed date: templates that write today's date (``strftime_now`` or ``date_string``) get
``FIXED_DATE`` in both renders, so a render does not change from day to day.

Special-token text in the data (``<|im_end|>`` inside a response) would be tokenized as the
control token itself: a fake turn or an end-of-turn trained mid-answer. ``special_text``
decides: ``error`` (a DataError naming the row, the field and the token), ``escape`` (a
zero-width space after its first character, so it is ordinary text), ``allow``.

Before a record is rendered, ``min_tokens`` bounds its token count from below by its
character count and the most characters any token of the vocabulary spells, so a row far
longer than ``train.seq_len`` is dropped without tokenizing it.

Generation prompts that open ``<think>`` themselves (QwQ, Qwen3-Thinking style): the assistant
turn is taken to start *before* that ``<think>``, so ``<think>`` stays the first supervised
token and the gate for every target. Such a template forces reasoning at inference time; to let
the model choose, train and serve with a template that does not open it.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
from dataclasses import dataclass

import jinja2
import numpy as np

from ease_jax.batch import OBJECTIVES, SPANS
from ease_jax.data.records import THINK_CLOSE, THINK_OPEN, Record
from ease_jax.errors import DataError, UserError

FIXED_DATE = datetime.datetime(2024, 7, 26)
THINK, ANSWER, GATE = (SPANS.index(s) for s in ("think", "answer", "gate"))
_OPEN_THINK_AT_END = re.compile(re.escape(THINK_OPEN) + r"\s*$")
ZERO_WIDTH_SPACE = "\u200b"
# How much a normalizer may shrink text (NFC composes at most a few code points into one):
# with one, a token may stand for this many times the characters its vocabulary entry has.
NORMALIZER_SHRINK = 4


class SpecialTextError(DataError):
  """A record's text spells one of the tokenizer's special tokens (data.special_text=error)."""


def _alternation(words: list[str]) -> re.Pattern:
  """A regex matching any of `words` (longest first), or nothing when there are none."""
  return re.compile("|".join(map(re.escape, sorted(words, key=len, reverse=True))) or r"(?!)")


def max_chars_per_token(tokenizer) -> int:
  """The most characters of input text one token can stand for: the longest vocabulary
  entry (byte-level entries spell one character per byte, SentencePiece ones one per
  character, byte-fallback `<0x..>` more), times NORMALIZER_SHRINK if there is a normalizer."""
  longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
  backend = getattr(tokenizer, "backend_tokenizer", None)
  normalized = backend is None or backend.normalizer is not None
  return max(1, longest) * (NORMALIZER_SHRINK if normalized else 1)


@dataclass(frozen=True)
class Rendered:
  """One rendered example: ids end with the end-of-turn token; ids[start:] is supervised."""
  ids: np.ndarray  # int32 [L]
  start: int  # first assistant token: the gate
  think_end: int  # one past `</think>`; start + 1 when there is no think block
  objective: int  # index into OBJECTIVES
  source: str

  def __len__(self) -> int:
    return len(self.ids)

  def document(self) -> dict[str, np.ndarray]:
    """Pre-shifted per-target arrays of length L-1 (see ease_jax/batch.py)."""
    n = len(self.ids)
    weight = np.zeros(n, np.float32)
    weight[self.start:] = 1.0
    span = np.full(n, ANSWER, np.int32)
    span[self.start] = GATE
    span[self.start + 1:self.think_end] = THINK
    return {"tokens": self.ids[:-1], "targets": self.ids[1:], "loss_weight": weight[1:],
            "objective": np.full(n - 1, self.objective, np.int32), "span": span[1:]}


def assistant_content(record: Record, empty_think: bool = False) -> str:
  """The assistant turn's text: `<think>\\n{reasoning}\\n</think>\\n\\n{response}` or the answer."""
  if record.reasoning:
    return f"{THINK_OPEN}\n{record.reasoning}\n{THINK_CLOSE}\n\n{record.response}"
  if empty_think:
    return f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n{record.response}"
  return record.response


def think_token_ids(tokenizer) -> tuple[int, int]:
  """The ids of `<think>` and `</think>`; UserError when they are not single added tokens."""
  added = tokenizer.get_added_vocab()
  ids = []
  for t in (THINK_OPEN, THINK_CLOSE):
    enc = tokenizer.encode(t, add_special_tokens=False)
    if t not in added or len(enc) != 1:
      raise UserError(f"the tokenizer has no single special token {t!r}; call "
                      "ease_jax.tokenizer.ensure_think_tokens(tokenizer) (and grow the model's "
                      "embeddings) before rendering training data")
    ids.append(enc[0])
  return ids[0], ids[1]


class Renderer:
  """Renders Records with a chat template into token ids with the supervised span located."""

  def __init__(self, tokenizer, chat_template: str = "", system_prompt: str = "",
               empty_think: bool = False, special_text: str = "error"):
    self.tokenizer = tokenizer
    if special_text not in ("error", "escape", "allow"):
      raise ValueError(f"special_text must be error, escape or allow, got {special_text!r}")
    self.special_text = special_text
    if chat_template:
      if not os.path.isfile(chat_template):
        raise UserError(f"data.chat_template: file not found: {chat_template}")
      with open(chat_template, encoding="utf-8") as f:
        self.template = f.read()
      self.template_name = f"chat template {chat_template}"
    else:
      self.template = tokenizer.chat_template
      self.template_name = (f"the chat template of tokenizer "
                            f"'{getattr(tokenizer, 'name_or_path', '') or '?'}'")
    if not self.template:
      raise UserError("the tokenizer has no chat template; set data.chat_template to a Jinja file")
    try:  # a template that does not parse fails here, once, not inside every render
      self.text([{"role": "user", "content": "hi"}], True)
    except jinja2.TemplateSyntaxError as e:
      raise UserError(f"{self.template_name}: the Jinja template does not parse: {e.message} "
                      f"(template line {e.lineno})") from None
    self.system_prompt, self.empty_think = system_prompt, empty_think
    self.think_open, self.think_close = think_token_ids(tokenizer)
    # Longest first, so that '<|im_end|>' wins over a shorter special that prefixes it.
    self._specials = sorted({t for t, _ in tokenizer.get_added_vocab().items()}
                            | set(tokenizer.all_special_tokens), key=len, reverse=True)
    self._special_re = _alternation(self._specials)
    # An earlier assistant turn of a conversation may keep its think block.
    self._special_re_history = _alternation(
        [t for t in self._specials if t not in (THINK_OPEN, THINK_CLOSE)])
    self.max_chars_per_token = max_chars_per_token(tokenizer)

  def min_tokens(self, record: Record) -> int:
    """A lower bound on the rendered example's token count, from its characters alone."""
    chars = (sum(len(c) for _, c in record.messages) + len(record.response)
             + len(record.reasoning or "") + len(self.system_prompt))
    return math.ceil(chars / self.max_chars_per_token)

  def _texts(self, record: Record) -> list[tuple[str, str, re.Pattern]]:
    """(field, text, specials to look for) of every piece of the record the template writes."""
    out = [(f"messages[{i}].content" if len(record.messages) > 1 else "prompt", c,
            self._special_re_history if r == "assistant" else self._special_re)
           for i, (r, c) in enumerate(record.messages)]
    return out + [("reasoning", record.reasoning or "", self._special_re),
                  ("response", record.response, self._special_re)]

  def check_special_text(self, record: Record) -> Record:
    """The record with special-token text handled per `special_text` (see the module doc)."""
    if self.special_text == "allow":
      return record
    if self.special_text == "error":
      for name, text, specials in self._texts(record):
        if m := specials.search(text):
          raise SpecialTextError(
              f"the text {m.group(0)!r} at character {m.start()} is a special token of the "
              "tokenizer and would be trained as that control token; remove it, or set "
              "data.special_text=escape (train it as plain text) or allow", path=record.where
              or None, field=name)
      return record
    def esc(text: str, specials: re.Pattern = self._special_re) -> str:
      return specials.sub(lambda m: m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:], text)
    messages = tuple((r, esc(c, self._special_re_history if r == "assistant" else
                             self._special_re)) for r, c in record.messages)
    return dataclasses.replace(record, messages=messages, response=esc(record.response),
                               reasoning=record.reasoning and esc(record.reasoning))

  def text(self, messages: list[dict], add_generation_prompt: bool) -> str:
    """The template's text with a fixed date."""
    return self.tokenizer.apply_chat_template(
        messages, chat_template=self.template, tokenize=False,
        add_generation_prompt=add_generation_prompt,
        date_string=FIXED_DATE.strftime("%d %b %Y"), strftime_now=FIXED_DATE.strftime)

  def _fail(self, record: Record, msg: str) -> DataError:
    return DataError(f"{msg}; {self.template_name} cannot train this example - set "
                     "data.chat_template to a training template that keeps the assistant turn",
                     path=record.where or None)

  def _locate(self, record: Record, content: str) -> tuple[str, int, str]:
    """(text up to and incl. the end-of-turn token, char offset of the turn, end-of-turn)."""
    messages = [{"role": r, "content": c} for r, c in record.messages]
    if self.system_prompt and messages[0]["role"] != "system":
      messages.insert(0, {"role": "system", "content": self.system_prompt})
    prompt = self.text(messages, True)
    full = self.text(messages + [{"role": "assistant", "content": content}], False)
    opened = _OPEN_THINK_AT_END.search(prompt)
    base = prompt[:opened.start()] if opened else prompt
    if not full.startswith(base):
      raise self._fail(record, "the conversation with the assistant turn does not start with "
                       "the prompt rendered with add_generation_prompt=True")
    rest = full[len(base):]
    if not rest.startswith(content):
      hint = ("the template writes a think block for every answer: set data.empty_think=true"
              if rest.startswith(THINK_OPEN) and not content.startswith(THINK_OPEN) else
              "does the template drop or rewrite text, e.g. the reasoning before </think>?")
      raise self._fail(record, f"the rendered assistant turn {rest[:80]!r}... is not the "
                       f"intended content {content[:80]!r}... ({hint})")
    after = rest[len(content):]
    eot = next((t for t in self._specials if after.startswith(t)), None)
    if eot is None:
      raise self._fail(record, f"the assistant turn is not closed by a special end-of-turn "
                       f"token (it is followed by {after[:40]!r})")
    return full[:len(base) + len(content) + len(eot)], len(base), eot

  def render(self, record: Record) -> Rendered:
    """Renders one record; DataError when its assistant turn cannot be supervised exactly."""
    record = self.check_special_text(record)
    content = assistant_content(record, self.empty_think)
    text, offset, eot = self._locate(record, content)
    enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    starts = [s for s, _ in enc["offset_mapping"]]
    try:
      start = starts.index(offset)
    except ValueError:
      raise self._fail(record, "the tokenizer merges text across the start of the assistant "
                       "turn") from None
    decoded = self.tokenizer.decode(ids[start:].tolist(), skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    if decoded != content + eot or start == 0 or len(ids) - start < 2:
      raise self._fail(record, f"the supervised tokens decode to {decoded[:80]!r}..., not the "
                       f"assistant content plus {eot!r}")
    think_end = start + 1
    if ids[start] == self.think_open:
      close = np.flatnonzero(ids[start:] == self.think_close)
      think_end = start + int(close[0]) + 1
    return Rendered(ids, start, think_end, OBJECTIVES.index(record.target_type), record.source)

  def marked(self, r: Rendered, color: bool = False) -> str:
    """The example's text with the supervised part marked: gate, think span and answer."""
    dec = lambda a, b: self.tokenizer.decode(r.ids[a:b].tolist(), skip_special_tokens=False,
                                             clean_up_tokenization_spaces=False)
    prompt, gate = dec(0, r.start), dec(r.start, r.start + 1)
    think, answer = dec(r.start + 1, r.think_end), dec(r.think_end, len(r.ids))
    if color:  # prompt dim, gate bold magenta, think yellow, answer green
      return (f"\033[2m{prompt}\033[0m\033[1;35m{gate}\033[0m\033[33m{think}\033[0m"
              f"\033[32m{answer}\033[0m")
    think_part = f"[[think:{think}]]" if r.think_end > r.start + 1 else ""
    return f"{prompt}[[gate:{gate}]]{think_part}[[answer:{answer}]]"

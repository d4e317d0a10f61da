"""The Record, adapters from public formats and validation (files are read by `readers`).

Every bad row raises ``DataError`` naming the file, the line (JSONL, 1-based) or row
(JSON array / Parquet / `datasets`, 0-based index) and the field. With
``on_bad_record: skip`` the row is counted in a ``BadRecords`` and left out.

Whole-file problems are errors even under skip: a UTF-16/UTF-32 file (byte-order
mark or NUL bytes), a missing file, an empty source. A JSONL line over
``readers.MAX_LINE_BYTES`` or JSON nested deeper than Python can parse is a bad row.
Repeated ids within a source are kept (a repeat may be deliberate upsampling) but
counted in ``BadRecords.duplicate_ids`` and reported with a ``DuplicateIdWarning``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ease_jax.batch import OBJECTIVES
from ease_jax.config import SourceConfig
from ease_jax.data.readers import read_rows
from ease_jax.errors import DataError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ROLES = ("system", "user", "assistant", "tool")
T = TypeVar("T")


class DuplicateIdWarning(UserWarning):
  """Rows of one source share an `id` (kept, counted)."""


@dataclass(frozen=True)
class Record:
  """One training example: the conversation up to the assistant turn and its target."""
  messages: tuple[tuple[str, str], ...]  # (role, content) up to the supervised assistant turn
  response: str
  target_type: str  # one of OBJECTIVES
  reasoning: str | None = None
  source: str = ""
  category: str = ""
  id: str = ""
  where: str = ""  # "file:line" or "file: row N", for error messages

  @property
  def prompt(self) -> str:
    """The last user message."""
    return next((c for r, c in reversed(self.messages) if r == "user"), "")


@dataclass
class BadRecords:
  """Counts rows skipped under `on_bad_record: skip` and keeps the first few reasons."""
  count: int = 0
  reasons: list[str] = field(default_factory=list)
  keep: int = 5
  duplicate_ids: int = 0  # rows whose id repeats an earlier row's in the same source

  def add(self, error: DataError) -> None:
    self.count += 1
    if len(self.reasons) < self.keep:
      self.reasons.append(str(error))


# ---------------------------------------------------------------- field helpers

def _str(row: dict, key: str, *, required: bool = True, empty_ok: bool = False) -> str | None:
  """A string field, stripped; raises DataError(field=key) when missing, mistyped or empty."""
  value = row.get(key)
  if value is None:
    if required:
      raise DataError("missing required field", field=key)
    return None
  if not isinstance(value, str):
    raise DataError(f"expected a string, got {type(value).__name__}", field=key)
  _check_text(value, key)
  value = value.strip()
  if not value and not empty_ok:
    if required:
      raise DataError("is empty", field=key)
    return None
  return value


def meta_str(row: dict, key: str) -> str:
  """A metadata field (category, source, tactics, ...) as text for reports, whatever its type:
  a list is joined with ', ', a mapping or number written as JSON; missing or null is ''.
  Metadata never rejects a row (STAR-1 ships `category` as a list, `score` as a struct)."""
  value = row.get(key)
  if value is None:
    return ""
  if isinstance(value, str):
    text = value
  elif isinstance(value, (list, tuple)):
    text = ", ".join(v if isinstance(v, str) else json.dumps(v, default=str) for v in value
                     if v is not None)
  else:
    text = json.dumps(value, default=str, ensure_ascii=False)
  text = text.encode("utf-8", "replace").decode("utf-8")  # an unpaired surrogate is not fatal
  return text.strip()


def _check_text(value: str, key: str) -> None:
  """Strings from JSON escapes may hold unpaired surrogates, which no tokenizer can encode."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise DataError(f"has an unpaired surrogate (\\u{ord(value[e.start]):04x}) at character "
                    f"{e.start}", field=key) from None


def split_think(text: str, key: str = "response") -> tuple[str | None, str]:
  """Splits '[<think>]reasoning</think>answer' into (reasoning, answer); no tag -> (None, text)."""
  if THINK_CLOSE not in text:
    if THINK_OPEN in text:
      raise DataError("has '<think>' but no closing '</think>'", field=key)
    return None, text.strip()
  head, _, answer = text.partition(THINK_CLOSE)
  head = head.strip()
  if head.startswith(THINK_OPEN):
    head = head[len(THINK_OPEN):]
  if THINK_OPEN in head or THINK_CLOSE in answer or THINK_OPEN in answer:
    raise DataError("has more than one think block", field=key)
  return head.strip() or None, answer.strip()


def make_record(messages: list[tuple[str, str]], response: str, target_type: str,
                reasoning: str | None, **meta: str) -> Record:
  """Builds a Record and checks the rules of docs/design.md (raises DataError naming the field)."""
  if target_type not in OBJECTIVES:
    raise DataError(f"unknown target_type {target_type!r}; expected one of {', '.join(OBJECTIVES)}",
                    field="target_type")
  if not response:
    raise DataError("is empty", field="response")
  if target_type == "reasoning" and not reasoning:
    raise DataError("a 'reasoning' target needs reasoning text ('<think>...</think>' or a "
                    "'reasoning' field)", field="reasoning")
  if target_type != "reasoning" and reasoning:
    raise DataError(f"a '{target_type}' target must not carry reasoning; use target_type "
                    "'reasoning' or drop the think text", field="reasoning")
  if not messages or messages[-1][0] not in ("user", "tool"):
    raise DataError("the conversation must end with a user (or tool) turn before the target",
                    field="messages")
  return Record(tuple(messages), response, target_type, reasoning, **meta)


# ---------------------------------------------------------------- adapters

def _think_target(row: dict, question_key: str, target: str, **meta: str) -> Record:
  prompt = _str(row, question_key)
  reasoning, answer = split_think(_str(row, "response"))
  return make_record([("user", prompt)], answer, target or "reasoning", reasoning,
                     category=meta_str(row, "category"), **meta)


def adapt_star(row: dict, target: str, **meta: str) -> Record:
  """STAR-1 / STAR-41K: `question`, `response` = '<think>...</think>answer'; `category` (a list
  of strings in the release) is joined; `id`, `source`, `score` and other columns are metadata."""
  return _think_target(row, "question", target, **meta)


def adapt_ease10k(row: dict, target: str, **meta: str) -> Record:
  """EASE 10K release: `original_question`, `response` = 'reasoning</think>answer'."""
  return _think_target(row, "original_question", target, **meta)


# WildJailbreak's data_type -> the default target. adversarial_harmful has none: in EASE those
# prompts are the diagnosis pool (tools/diagnose.py), not refusal training data.
_WJ_TYPES = {"vanilla_harmful": "refusal", "vanilla_benign": "direct",
             "adversarial_harmful": "", "adversarial_benign": "direct"}


def _wj_type(row: dict) -> str:
  data_type = _str(row, "data_type")
  if data_type not in _WJ_TYPES:
    raise DataError(f"unknown data_type {data_type!r}; expected one of {', '.join(_WJ_TYPES)}",
                    field="data_type")
  return data_type


def wildjailbreak_prompt(row: dict) -> tuple[str, str]:
  """(prompt, data_type) of a WildJailbreak row, its completion not needed: the diagnosis pool."""
  data_type = _wj_type(row)
  return _str(row, "adversarial" if data_type.startswith("adversarial") else "vanilla"), data_type


def _wj_record(row: dict, target: str, adversarial_target: str, **meta: str) -> Record:
  prompt, data_type = wildjailbreak_prompt(row)
  default = _WJ_TYPES[data_type] or adversarial_target
  if not (target or default):
    raise DataError("adversarial_harmful rows are EASE's diagnosis pool (tools/diagnose.py), not "
                    "refusal training data; to train them as direct refusals on purpose use "
                    "adapter 'wildjailbreak_refuse_adversarial' (or set the source's "
                    "target_type)", field="data_type")
  reasoning, answer = split_think(_str(row, "completion"), "completion")
  return make_record([("user", prompt)], answer, target or default, reasoning,
                     category=data_type, **meta)


def adapt_wildjailbreak(row: dict, target: str, **meta: str) -> Record:
  """WildJailbreak train: `vanilla`, `adversarial` (empty on vanilla rows), `tactics`,
  `completion`, `data_type`. vanilla_harmful -> refusal, vanilla_benign and adversarial_benign
  -> direct; adversarial_harmful is an error unless the source sets `target_type`."""
  return _wj_record(row, target, "", **meta)


def adapt_wildjailbreak_refuse_adversarial(row: dict, target: str, **meta: str) -> Record:
  """WildJailbreak train as `wildjailbreak`, with adversarial_harmful trained as refusals."""
  return _wj_record(row, target, "refusal", **meta)


def _target_type(row: dict, target: str) -> str:
  if target:
    return target
  return _str(row, "target_type")


def adapt_prompt_response(row: dict, target: str, **meta: str) -> Record:
  """Plain `prompt`, `response`, `target_type`, optional `reasoning` and `category`."""
  prompt = _str(row, "prompt")
  reasoning = _str(row, "reasoning", required=False)
  response = _str(row, "response")
  if reasoning is None:
    reasoning, response = split_think(response)
  return make_record([("user", prompt)], response, _target_type(row, target), reasoning,
                     category=meta_str(row, "category"), **meta)


def parse_messages(msgs: object) -> list[tuple[str, str]]:
  """A `messages` field as (role, content) pairs, contents stripped; raises DataError naming
  the field (`messages`, `messages[i]`, `messages[i].content`) when it is not a non-empty list
  of {role, content: string} or a content cannot be encoded. Used by every reader of chat rows."""
  if not isinstance(msgs, list) or not msgs:
    raise DataError("expected a non-empty list of {role, content}", field="messages")
  pairs = []
  for i, m in enumerate(msgs):
    if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
      raise DataError(f"message {i} must be {{role: {'|'.join(ROLES)}, content: string}}",
                      field=f"messages[{i}]")
    _check_text(m["content"], f"messages[{i}].content")
    pairs.append((m["role"], m["content"].strip()))
  return pairs


def adapt_messages(row: dict, target: str, **meta: str) -> Record:
  """Chat `messages` ending with the assistant turn to supervise; `target_type` as above."""
  pairs = parse_messages(row.get("messages"))
  if pairs[-1][0] != "assistant":
    raise DataError("the last message must be the assistant turn to supervise", field="messages")
  reasoning = _str(row["messages"][-1], "reasoning_content", required=False)
  response = pairs[-1][1]
  if reasoning is None:
    reasoning, response = split_think(response, f"messages[{len(pairs) - 1}].content")
  return make_record(pairs[:-1], response, _target_type(row, target), reasoning,
                     category=meta_str(row, "category"), **meta)


ADAPTERS: dict[str, Callable[..., Record]] = {
    "star": adapt_star, "ease10k": adapt_ease10k, "wildjailbreak": adapt_wildjailbreak,
    "wildjailbreak_refuse_adversarial": adapt_wildjailbreak_refuse_adversarial,
    "prompt_response": adapt_prompt_response, "messages": adapt_messages,
}


def source_name(src: SourceConfig) -> str:
  """The name shown in stats: `name`, else the file stem."""
  return src.name or os.path.splitext(os.path.basename(src.path.rstrip("/")))[0]


def adapt_rows(src: SourceConfig, adapt: Callable[[dict, dict[str, str]], T | None],
               on_bad: Callable[[object, DataError], None]) -> tuple[list[T], int]:
  """The read-rows-then-adapt loop of every reader: (what `adapt` made, rows read).

  Each row of `src` (the first `src.max_rows` when set) goes to `adapt(row, meta)`, `meta`
  being the Record's `source`, `where` and `id`; a None result leaves the row out. A row that
  cannot be read, or whose `adapt` raises DataError, goes to `on_bad(row, error)` with the
  error located (file, line or row): the caller raises it, or counts it and goes on."""
  name, out, rows = source_name(src), [], 0
  for loc, row in read_rows(src):
    if src.max_rows and rows >= src.max_rows:
      break
    rows += 1
    try:
      if isinstance(row, DataError):
        raise row
      rid = row.get("id")
      item = adapt(row, {"source": name, "where": str(loc), "id": "" if rid is None else str(rid)})
    except DataError as e:
      error = loc.error(e)
    else:
      if item is not None:
        out.append(item)
      continue
    on_bad(row, error)  # outside the except block: a raised error carries no chained one
  return out, rows


def load_records(src: SourceConfig, on_bad_record: str = "error",
                 bad: BadRecords | None = None) -> list[Record]:
  """Reads, adapts and validates every row of one source."""
  if src.adapter not in ADAPTERS:
    raise DataError(f"adapter {src.adapter!r} does not read training records; expected one of "
                    f"{', '.join(ADAPTERS)} (safety benchmarks hold prompts without answers: "
                    "evaluate them with tools/evaluate.py --adapter NAME)", path=src.path)
  adapter = ADAPTERS[src.adapter]
  bad = bad if bad is not None else BadRecords()

  def on_bad(row: object, error: DataError) -> None:
    if on_bad_record != "skip":
      raise error
    bad.add(error)

  records, rows = adapt_rows(src, lambda row, meta: adapter(row, src.target_type, **meta), on_bad)
  _warn_duplicate_ids(src, records, bad)
  if rows == 0:
    raise DataError("no records: the source is empty", path=src.path)
  if not records:
    raise DataError(f"every one of its {rows} rows is bad; the first: {bad.reasons[0]}",
                    path=src.path)
  return records


def _warn_duplicate_ids(src: SourceConfig, records: list[Record], bad: BadRecords) -> None:
  """Counts rows whose id repeats an earlier row's (kept: it may be deliberate upsampling)."""
  first_seen: dict[str, str] = {}
  repeats = []
  for rec in records:
    if rec.id:
      if rec.id in first_seen:
        repeats.append((rec.id, first_seen[rec.id], rec.where))
      first_seen.setdefault(rec.id, rec.where)
  if repeats:
    bad.duplicate_ids += len(repeats)
    rid, first, again = repeats[0]
    warnings.warn(f"{src.path}: {len(repeats)} row(s) repeat an earlier row's id (e.g. {rid!r} "
                  f"at {first} and {again}); they are kept as separate examples",
                  DuplicateIdWarning, stacklevel=3)

"""Training data for the paper's baselines, derived from an EASE config's own sources so that
the baselines see the same prompts and answers as EASE:

  refusal        every target without its reasoning: harmful and jailbreak prompts get their
                 direct refusal, benign prompts their direct answer (refusal training).
  always_reason  every target with reasoning (deliberative-alignment style): targets that have
                 none get a teacher trace from `--traces` (tools/write_traces.py or
                 tools/generate.py output, matched by prompt), or, with `generic`, a fixed short reasoning per target type.

The answers are never changed: only the think block differs between EASE and a baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

from ease_jax.config import Config, SourceConfig
from ease_jax.data.readers import write_jsonl
from ease_jax.data.records import Record, load_records, source_name, split_think
from ease_jax.errors import DataError, UserError
from ease_jax.recipe.refusals import pattern_refusal

KINDS = ("refusal", "always_reason")
# `generic` reasoning for targets without a trace: honest about being a template (the demo's
# always-reason baseline); real comparisons use teacher traces.
GENERIC = {
    "refusal": "The request asks for help that could cause real harm. Policy check: I should "
               "not provide it. I will decline briefly and offer a safe alternative.",
    "direct": "The request is harmless. Policy check: nothing here is unsafe. I will answer "
              "it directly and helpfully.",
}


def read_traces(path: str) -> dict[str, str]:
  """{prompt: reasoning} from tools/write_traces.py or tools/generate.py output (`prompt`, `response` with a closed
  think block); rows without one are left out (the caller reports prompts still missing)."""
  traces: dict[str, str] = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        prompt, response = row["prompt"].strip(), row["response"]
        # a trace cut off by max_new_tokens (stopped=false) or never closed is no trace
        if "</think>" not in response or row.get("stopped", True) is False:
          continue
        reasoning, _ = split_think(response)
      except (ValueError, KeyError, TypeError, AttributeError, DataError) as e:
        raise DataError(f"{path}:{n}: not a tools/generate.py row ({e})") from None
      if reasoning:
        traces.setdefault(prompt, reasoning)
  return traces


def refusal_target(record: Record, is_refusal) -> dict:
  """The record as a direct target: its answer without the reasoning."""
  target = record.target_type
  if target == "reasoning":
    target = "refusal" if is_refusal(record.response) else "direct"
  return {"id": record.id, "prompt": record.prompt, "response": record.response,
          "target_type": target, "category": record.category}


def reasoning_target(record: Record, traces: dict[str, str], generic: bool) -> dict | None:
  """The record with reasoning: its own, a trace for its prompt, or the generic text."""
  reasoning = record.reasoning or traces.get(record.prompt.strip())
  if reasoning is None and generic:
    reasoning = GENERIC["refusal" if record.target_type == "refusal" else "direct"]
  if reasoning is None:
    return None
  return {"id": record.id, "prompt": record.prompt, "reasoning": reasoning,
          "response": record.response, "target_type": "reasoning", "category": record.category}


def write_baseline(sources: tuple[SourceConfig, ...], kind: str, out_dir: str,
                   traces: str = "", generic: bool = False) -> dict[str, int]:
  """One prompt_response JSONL per source under `out_dir`; {file: rows}."""
  if kind not in KINDS:
    raise UserError(f"unknown baseline {kind!r}; expected one of {', '.join(KINDS)}")
  trace_map = read_traces(traces) if traces else {}
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  counts = {}
  for src in sources:
    records = load_records(src)
    if any(len(r.messages) != 1 for r in records):
      raise DataError(f"{src.path}: multi-turn conversations are not supported by the "
                      "baseline builder (prompt_response rows hold one user turn)")
    if kind == "refusal":
      rows = [refusal_target(r, pattern_refusal) for r in records]
    else:
      rows = [reasoning_target(r, trace_map, generic) for r in records]
      missing = [r.prompt for r, row in zip(records, rows) if row is None]
      if missing:
        raise DataError(f"{src.path}: {len(missing)} prompt(s) have no reasoning and no trace "
                        f"(first: {missing[0][:80]!r}); pass --traces FILE or --generic")
    path = out / f"{source_name(src)}.jsonl"
    counts[str(path)] = write_jsonl(str(path), rows)
  return counts


def train_sources(cfg: Config) -> tuple[SourceConfig, ...]:
  """The training sources of an EASE config (phase 1 and phase 2 configs are passed in turn)."""
  if not cfg.data.train:
    raise UserError(f"the config for {cfg.run_dir} has no data.train sources")
  return cfg.data.train

"""Phase 2, step 2 as library code: the three-way calibration mix (`tools/build_mix.py`).

  vulnerable prompts (diagnose's vulnerable.jsonl) + teacher traces -> reasoning.jsonl
  plainly harmful prompts with refusals                            -> refusal.jsonl
  general prompts with direct answers                              -> direct.jsonl

Joining a vulnerable prompt to its trace: by `id` when both have one and the trace with that
id has the same normalised prompt text (`stages.normalize`: NFKC, case-folded, whitespace
collapsed); otherwise by that normalised text of the last user message. An id that matches
with different text is not trusted (ids like "0", "1" from different files collide) and is
reported. Nothing is dropped silently: every vulnerable prompt without a trace (with why),
every trace row that is not a valid reasoning Record, and every duplicate (a prompt seen earlier
in the same set, or in a set of higher priority: reasoning > refusal > direct, where it is kept;
a second trace row with the same id or prompt) is listed in report.json, and the prompts without
a trace in missing_traces.jsonl, a prompt file for tools/generate.py to write their traces from.
Train weights in sources.yaml are the selected counts as fractions: grain mixes sources by
weight, so equal weights would upsample the smaller sets and undo the chosen ratio.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass, field

import yaml

from ease_jax.config import SourceConfig
from ease_jax.data.records import (
  ADAPTERS,
  Record,
  adapt_rows,
  load_records,
  make_record,
)
from ease_jax.errors import DataError, UserError
from ease_jax.recipe.diagnose import Prompt, normalize, prompt_fields, write_jsonl

KINDS = ("reasoning", "refusal", "direct")


@dataclass
class Issues:
  """What could not be used, with where it came from."""
  missing: list[dict] = field(default_factory=list)  # vulnerable prompts without a trace
  duplicates: list[dict] = field(default_factory=list)
  bad_traces: list[str] = field(default_factory=list)
  notes: list[str] = field(default_factory=list)
  bad_trace_keys: dict[str, str] = field(default_factory=dict)  # id / prompt key -> where
  truncated: dict[str, int] = field(default_factory=dict)  # set -> rows cut off (stopped=false)

  def bad_trace(self, row: object, error: DataError) -> None:
    """Records an unusable trace row, keyed so that its prompt's report can point at it."""
    self.bad_traces.append(str(error))
    if isinstance(row, dict):
      text = next((row[k] for k in ("prompt", "question", "original_question")
                   if isinstance(row.get(k), str)), None)
      for key in ([f"id:{row['id']}"] if row.get("id") is not None else []) + (
          [normalize(text)] if text else []):
        self.bad_trace_keys.setdefault(key, str(error))


def check_finished(row: dict) -> None:
  """A generated row cut off by max_new_tokens (`stopped: false`, as tools/generate.py and
  tools/write_traces.py write it) is not a target: it would teach the student to stop
  mid-sentence, whether the cut fell inside the think block or after `</think>`."""
  if row.get("stopped") is False:
    raise DataError("the generation was cut off by max_new_tokens (stopped=false); generate "
                    "it again with more new tokens", field="stopped")


def load_targets(path: str, adapter: str, target: str, drop_reasoning: bool = False,
                 issues: Issues | None = None) -> list[Record]:
  """Records of one file as `target` examples. Trace files (target reasoning) keep their bad
  rows in `issues.bad_traces`; for refusal/direct, think text is an error unless dropped.
  Rows cut off by max_new_tokens (`stopped: false`) are left out and counted in every set."""
  if adapter not in ADAPTERS:
    raise UserError(f"unknown adapter {adapter!r}; expected one of {', '.join(ADAPTERS)}")
  fn = ADAPTERS[adapter]
  issues = issues if issues is not None else Issues()
  dropped = 0

  def adapt(row: dict, meta: dict[str, str]) -> Record | None:
    nonlocal dropped
    if row.get("stopped") is False:
      issues.truncated[target] = issues.truncated.get(target, 0) + 1
      if target != "reasoning":
        issues.notes.append(f"{meta['where']}: left out: cut off by max_new_tokens "
                            "(stopped=false)")
        return None
    check_finished(row)
    try:
      return fn(row, target, **meta)
    except DataError as e:
      if target == "reasoning" or e.field != "reasoning" or not drop_reasoning:
        raise
      rec = fn(row, "reasoning", **meta)  # the same row, its think text then dropped
      dropped += 1
      return dataclasses.replace(rec, reasoning=None, target_type=target)

  def on_bad(row: object, error: DataError) -> None:
    if target != "reasoning":
      hint = ("; pass --drop_reasoning to keep only the answer" if error.field == "reasoning"
              else "")
      raise DataError(f"{error}{hint}")
    issues.bad_trace(row, error)

  out, _ = adapt_rows(SourceConfig(adapter=adapter, path=path), adapt, on_bad)
  if dropped:
    issues.notes.append(f"{path}: dropped the think text of {dropped} {target} rows")
  return out


def dedupe(items: list, key, kind: str, seen: dict[str, str], issues: Issues) -> list:
  """Keeps the first of each prompt (over `seen`, shared across sets); reports the rest."""
  out = []
  for it in items:
    k = normalize(key(it))
    if k in seen:
      issues.duplicates.append({"set": kind, "id": it.id, "where": it.where,
                                "prompt": key(it), "first_seen": seen[k]})
      continue
    seen[k] = f"{kind} {it.where}" + (f" (id {it.id})" if it.id else "")
    out.append(it)
  return out


def index_traces(traces: list[Record], issues: Issues) -> tuple[dict, dict]:
  """Traces by id and by normalised prompt; repeated ones are reported, the first is used."""
  by_id: dict[str, Record] = {}
  by_text: dict[str, Record] = {}
  for t in traces:
    if t.id and t.id in by_id:
      issues.duplicates.append({"set": "traces", "id": t.id, "where": t.where,
                                "prompt": t.prompt, "first_seen": by_id[t.id].where})
      continue
    k = normalize(t.prompt)
    if k in by_text:  # the first is used for text joins; an id join may still use this one
      issues.duplicates.append({"set": "traces", "id": t.id, "where": t.where,
                                "prompt": t.prompt, "first_seen": by_text[k].where})
    if t.id:
      by_id[t.id] = t
    by_text.setdefault(k, t)
  return by_id, by_text


def join(vulnerable: list[Prompt], traces: list[Record], issues: Issues) -> list[Record]:
  """Reasoning Records: each vulnerable prompt with its teacher's reasoning and answer."""
  by_id, by_text = index_traces(traces, issues)
  out = []
  for p in vulnerable:
    key, trace, why = normalize(p.prompt), None, "no trace with this id or prompt text"
    if p.id and p.id in by_id:
      if normalize(by_id[p.id].prompt) == key:
        trace = by_id[p.id]
      else:
        why = f"the trace with id {p.id} ({by_id[p.id].where}) has a different prompt"
    trace = trace or by_text.get(key)
    bad = issues.bad_trace_keys.get(f"id:{p.id}") or issues.bad_trace_keys.get(key)
    if trace is None and bad:
      why = f"its trace is not a valid reasoning record: {bad}"
    if trace is None:
      issues.missing.append({"id": p.id, "prompt": p.prompt, "where": p.where, "reason": why})
      continue
    out.append(make_record(list(p.messages), trace.response, "reasoning", trace.reasoning,
                           source="reasoning", category=p.category or trace.category,
                           id=p.id or trace.id, where=p.where))
  return out


def parse_ratio(text: str) -> tuple[float, float, float]:
  """'1:1:2' -> reasoning : refusal : direct."""
  try:
    parts = tuple(float(x) for x in text.split(":"))
  except ValueError:
    parts = ()
  if len(parts) != 3 or parts[0] <= 0 or min(parts) < 0:
    raise UserError(f"--ratio {text!r}: expected R:F:D (reasoning:refusal:direct), R > 0, "
                    "e.g. 1:1:2")
  return parts


def select(sets: dict[str, list], ratio: tuple | None, caps: dict[str, int], seed: int,
           issues: Issues) -> dict[str, list]:
  """How many of each kind: all, or the ratio against the reasoning count; then the caps.
  A seeded sample keeps the file order of what it picks."""
  rng = random.Random(seed)
  want = {k: len(v) for k, v in sets.items()}
  if caps.get("reasoning"):
    want["reasoning"] = min(want["reasoning"], caps["reasoning"])
  if ratio is not None:
    for k, r in zip(KINDS[1:], ratio[1:]):
      want[k] = round(want["reasoning"] * r / ratio[0])
  out = {}
  for k in KINDS:
    n = min(want[k], caps.get(k) or want[k])
    if n > len(sets[k]):
      issues.notes.append(f"{k}: the ratio asks for {n} examples, only {len(sets[k])} available;"
                          " all are used")
      n = len(sets[k])
    picked = sorted(rng.sample(range(len(sets[k])), n))
    out[k] = [sets[k][i] for i in picked]
  return out


def split_eval(records: list[Record], fraction: float, rng: random.Random) -> tuple[list, list]:
  """(train, eval): `fraction` of the records (rounded) held out for eval."""
  n = round(len(records) * fraction)
  held = set(rng.sample(range(len(records)), n))
  return ([r for i, r in enumerate(records) if i not in held],
          [r for i, r in enumerate(records) if i in held])


def record_row(rec: Record) -> dict:
  """A Record as a `prompt_response` row (`messages` row when the conversation has more turns)."""
  row = prompt_fields(Prompt(rec.messages, rec.id))
  if "messages" in row:  # the messages adapter: the answer is the last turn
    row["messages"].append({"role": "assistant", "content": rec.response,
                            **({"reasoning_content": rec.reasoning} if rec.reasoning else {})})
  else:
    row.update(reasoning=rec.reasoning, response=rec.response)
  return {**row, "target_type": rec.target_type, "category": rec.category, "origin": rec.where}


def write_mix(out_dir: str, splits: dict[str, dict[str, list[Record]]]) -> dict:
  """{reasoning,refusal,direct}.jsonl (+ eval_*.jsonl) and sources.yaml; re-reads every file
  with the adapter named in sources.yaml, so the training config reads what was checked."""
  data: dict[str, list] = {"train": [], "eval": []}
  for split, prefix in (("train", ""), ("eval", "eval_")):
    for kind in KINDS:
      recs = splits[split][kind]
      path = os.path.join(out_dir, f"{prefix}{kind}.jsonl")
      if not recs:
        if os.path.exists(path):
          os.remove(path)  # stale from an earlier run
        continue
      write_jsonl(path, (record_row(r) for r in recs))
      adapter = "messages" if any(len(r.messages) > 1 for r in recs) else "prompt_response"
      # Train weights are the sampling proportions of grain's mix: the counts, so one epoch
      # sees each record about once and the mix keeps the chosen ratio.
      total = sum(len(v) for v in splits[split].values())
      src = {"name": f"{prefix}{kind}", "adapter": adapter, "path": path, "target_type": kind,
             "weight": round(len(recs) / total, 6) if split == "train" else 1.0}
      if len(load_records(SourceConfig(**src))) != len(recs):
        raise AssertionError(f"{path}: re-read a different number of records")
      data[split].append(src)
  snippet = {"data": {k: v for k, v in data.items() if v}}
  with open(os.path.join(out_dir, "sources.yaml"), "w", encoding="utf-8") as f:
    f.write("# Written by tools/build_mix.py: the phase-2 data sources. Usable as is\n"
            "# (tools/inspect_data.py --config sources.yaml) or pasted into a phase-2 config.\n")
    yaml.safe_dump(snippet, f, sort_keys=False)
  return snippet


def build_mix(out_dir: str, *, vulnerable: list[Prompt], traces: list[Record],
              harmful: list[Record], general: list[Record], issues: Issues,
              ratio: tuple | None = None, caps: dict[str, int] | None = None, seed: int = 0,
              eval_fraction: float = 0.0) -> dict:
  """Joins, de-duplicates, selects, splits and writes the mix; returns the summary."""
  if not 0 <= eval_fraction < 1:
    raise UserError(f"--eval_fraction must be in [0, 1), got {eval_fraction}")
  seen: dict[str, str] = {}
  n_vulnerable = len(vulnerable)
  vulnerable = dedupe(vulnerable, lambda p: p.prompt, "vulnerable", seen, issues)
  sets = {"reasoning": join(vulnerable, traces, issues)}
  sets["refusal"] = dedupe(harmful, lambda r: r.prompt, "refusal", seen, issues)
  sets["direct"] = dedupe(general, lambda r: r.prompt, "direct", seen, issues)
  chosen = select(sets, ratio, caps or {}, seed, issues)
  rng = random.Random(seed + 1)
  splits: dict[str, dict] = {"train": {}, "eval": {}}
  for k in KINDS:
    splits["train"][k], splits["eval"][k] = split_eval(chosen[k], eval_fraction, rng)
  snippet = write_mix(out_dir, splits)
  write_jsonl(os.path.join(out_dir, "missing_traces.jsonl"), issues.missing)
  table = {k: {"available": len(sets[k]), "selected": len(chosen[k]),
               "train": len(splits["train"][k]), "eval": len(splits["eval"][k])} for k in KINDS}
  summary = {"kinds": table, "vulnerable_prompts": n_vulnerable, "traces": len(traces),
             "missing_traces": issues.missing, "duplicates": issues.duplicates,
             "bad_traces": issues.bad_traces, "truncated": dict(issues.truncated),
             "notes": issues.notes, "seed": seed,
             "ratio": list(ratio) if ratio else None, "sources": snippet["data"]}
  with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, ensure_ascii=False)
  return summary


def check_nonempty(s: dict) -> None:
  """Raises UserError with the likely cause when nothing was selected."""
  if any(n["selected"] for n in s["kinds"].values()):
    return
  cause = "no vulnerable prompt joined a trace"
  if s["ratio"] and any(n["available"] for n in s["kinds"].values()):
    cause += ", and --ratio sets the refusal and direct counts relative to that count (0)"
  elif not any(n["available"] for n in s["kinds"].values()):
    cause += ", and there are no --harmful or --general records"
  raise UserError(f"the mix is empty: {cause}")


def format_summary(s: dict) -> str:
  """The summary table and every problem, for the terminal."""
  lines = [f"{'kind':10s} {'available':>9s} {'selected':>8s} {'train':>6s} {'eval':>5s}"]
  for k, n in s["kinds"].items():
    lines.append(f"{k:10s} {n['available']:9d} {n['selected']:8d} {n['train']:6d} {n['eval']:5d}")
  total = sum(n["selected"] for n in s["kinds"].values())
  if total:
    lines.append("mix: " + "  ".join(f"{k} {100 * n['selected'] / total:.0f}%"
                                     for k, n in s["kinds"].items()))
  lines.append(f"missing traces: {len(s['missing_traces'])}   duplicates: "
               f"{len(s['duplicates'])}   bad trace rows: {len(s['bad_traces'])}   truncated "
               f"(stopped=false, left out): {sum(s.get('truncated', {}).values())}")
  for m in s["missing_traces"]:
    lines.append(f"  missing trace: {m['where']} id={m['id'] or '-'}: {m['reason']}")
  for d in s["duplicates"]:
    lines.append(f"  duplicate ({d['set']}): {d['where']} id={d['id'] or '-'} "
                 f"(first seen: {d['first_seen']})")
  lines += [f"  bad trace: {b}" for b in s["bad_traces"]]
  lines += [f"  note: {n}" for n in s["notes"]]
  return "\n".join(lines)

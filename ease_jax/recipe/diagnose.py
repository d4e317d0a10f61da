"""Phase 2, step 1 as library code: prompt files, judged generations, and `diagnose`.

File schemas between the stages (every reader checks its rows and names file, line and field):

  prompts      plain rows with `prompt` (or `messages` ending in a user turn) and optional
               `id`, `category`; other fields are ignored, so eval files and tools/generate.py
               output are prompt files too. Or any adapter's Records ("auto" picks by the
               first row's fields, as tools/generate.py does).
  responses    `tools/generate.py` output: a prompt row plus `response` (the generated text,
               `<think>` block included); diagnose judges these without loading a model.
  judged       diagnose's vulnerable.jsonl / safe.jsonl / invalid.jsonl: a prompt row plus
               `answer` (the text judged), `verdict` (unsafe | safe | invalid), `categories`
               (policy categories), `hazard_codes`, `judge`, `judge_output`. build_mix reads
               vulnerable.jsonl back as a prompt file.
"""

from __future__ import annotations

import json
import os
import random
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ease_jax import sharding
from ease_jax.config import MeshConfig, SourceConfig
from ease_jax.console import progress
from ease_jax.data.benchmarks import EVAL_ADAPTERS, detect_benchmark, load_eval_prompts
from ease_jax.data.readers import read_rows, write_jsonl  # noqa: F401  (stages write with it)
from ease_jax.data.records import (
  ADAPTERS,
  _str,
  adapt_rows,
  meta_str,
  parse_messages,
  wildjailbreak_prompt,
)
from ease_jax.distributed import is_primary
from ease_jax.errors import DataError, UserError
from ease_jax.generation import files as F
from ease_jax.generation import generate as G
from ease_jax.generation.continuous import ContinuousGenerator
from ease_jax.recipe.judges import Judge, Verdict

VERDICTS = ("unsafe", "safe", "invalid")


@dataclass(frozen=True)
class Prompt:
  """A conversation up to the turn to answer, with what identifies it."""
  messages: tuple[tuple[str, str], ...]
  id: str = ""
  category: str = ""
  where: str = ""  # "file:line"
  extra: tuple[tuple[str, object], ...] = ()  # fields a stage passes on (answer, verdict, ...)

  @property
  def prompt(self) -> str:
    """The last user message."""
    return next((c for r, c in reversed(self.messages) if r == "user"), "")

  def get(self, key: str, default=None):
    """A passed-on field."""
    return dict(self.extra).get(key, default)


def normalize(text: str) -> str:
  """The join key of a prompt: NFKC, case-folded, whitespace runs collapsed to one space."""
  return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def log(msg: str) -> None:
  """Progress output of the phase-2 stages (stderr, so stdout stays for results)."""
  progress(msg, __name__)


# ---------------------------------------------------------------- readers

def _messages(row: dict) -> tuple[tuple[str, str], ...]:
  """`messages` (ending with a user turn) or `prompt`, validated by records.py's reader."""
  if "messages" in row and "prompt" not in row:
    pairs = parse_messages(row["messages"])
    if pairs[-1][0] == "assistant":
      pairs.pop()  # a full conversation: answer its last user turn again
    if not pairs or pairs[-1][0] not in ("user", "tool"):
      raise DataError("the conversation must end with a user turn", field="messages")
    return tuple(pairs)
  return (("user", _str(row, "prompt")),)


def _plain_prompt(row: dict, keep: tuple[str, ...]) -> tuple[tuple[tuple[str, str], ...], dict]:
  extra = {k: row[k] for k in keep if k in row}
  return _messages(row), extra


# First-row field -> the adapter that reads it, in this order (as tools/generate.py detects).
_DETECT = (("messages", "prompts"), ("prompt", "prompts"), ("question", "star"),
           ("original_question", "ease10k"), ("data_type", "wildjailbreak"))


def detect_adapter(path: str) -> str:
  """'prompts' (plain rows) or the Record adapter the first row's fields call for."""
  src = SourceConfig(adapter="prompt_response", path=path)
  first = next((row for _, row in read_rows(src) if isinstance(row, dict)), None)
  if first is None:
    raise DataError("no rows", path=path)
  found = detect_benchmark(first) or next((a for key, a in _DETECT if key in first), None)
  if found is None:
    raise DataError(f"cannot tell the format from the fields {sorted(first)}; pass --adapter",
                    path=path)
  return found


def read_prompts(path: str, adapter: str = "prompts", keep: tuple[str, ...] = (),
                 max_rows: int = 0) -> list[Prompt]:
  """Prompts of a file: plain prompt rows (adapter "prompts"), any adapter's Records, or
  "auto" (picked by the first row's fields).

  `keep` names row fields carried along in `Prompt.extra` (e.g. "response" of a responses file).
  """
  adapter = detect_adapter(path) if adapter == "auto" else adapter
  adapter = "" if adapter == "prompts" else adapter
  if adapter in EVAL_ADAPTERS:  # a safety benchmark: its class is the prompt's category
    pairs = load_eval_prompts(SourceConfig(adapter=adapter, path=path, max_rows=max_rows))
    return [Prompt(r.messages, r.id, r.category or cls, r.where) for r, cls in pairs]
  if adapter and adapter not in ADAPTERS:
    raise UserError(f"unknown adapter {adapter!r}; expected auto, prompts or one of "
                    f"{', '.join((*ADAPTERS, *EVAL_ADAPTERS))}")

  def adapt(row: dict, meta: dict[str, str]) -> Prompt:
    if adapter.startswith("wildjailbreak"):  # the diagnosis pool: prompts, answers unused
      prompt, category = wildjailbreak_prompt(row)
      messages, extra = (("user", prompt),), {}
    elif adapter:  # target "direct" only to satisfy the Record rules; the answer is unused
      rec = ADAPTERS[adapter](row, "reasoning" if _has_think(row) else "direct")
      messages, extra, category = rec.messages, {}, rec.category
    else:
      messages, extra = _plain_prompt(row, keep)
      category = meta_str(row, "category")
    return Prompt(messages, meta["id"], category, meta["where"], tuple(extra.items()))

  def on_bad(row: object, error: DataError) -> None:
    raise error

  src = SourceConfig(adapter=adapter or "prompt_response", path=path, max_rows=max_rows)
  out, _ = adapt_rows(src, adapt, on_bad)
  if not out:
    raise DataError("no prompts: the file is empty", path=path)
  return out


def _has_think(row: dict) -> bool:
  return any(isinstance(v, str) and "</think>" in v for v in row.values()) or bool(
      row.get("reasoning"))


def read_responses(path: str, max_rows: int = 0) -> tuple[list[Prompt], list[str]]:
  """A `tools/generate.py` output file: its prompts and their generated `response` texts."""
  prompts = read_prompts(path, keep=("response",), max_rows=max_rows)
  responses = []
  for p in prompts:
    text = p.get("response")
    if not isinstance(text, str):
      raise DataError(f"{p.where}: a responses file needs the generated text as a string "
                      "(an empty string is allowed)", field="response")
    responses.append(text)
  return prompts, responses


def read_judged(path: str, verdict: str | None = "unsafe") -> list[Prompt]:
  """A diagnose output file (or a plain prompt file); rows judged otherwise are an error."""
  prompts = read_prompts(path, keep=("verdict", "categories", "hazard_codes", "answer"))
  for p in prompts:
    got = p.get("verdict")
    if got is not None and verdict is not None and got != verdict:
      raise DataError(f"{p.where}: verdict is {got!r}, expected {verdict!r} (pass diagnose's "
                      f"{'vulnerable' if verdict == 'unsafe' else verdict}.jsonl)",
                      field="verdict")
  return prompts


def prompt_fields(p: Prompt) -> dict:
  """The prompt part of a row: `prompt`, plus `messages` when there is more than one turn."""
  row = {"id": p.id, "prompt": p.prompt}
  if len(p.messages) > 1:
    row["messages"] = [{"role": r, "content": c} for r, c in p.messages]
    del row["prompt"]
  return row


# ---------------------------------------------------------------- diagnose

def auto_mesh(tensor: int = 1):
  """Every device of every process on the mesh when there is more than one: tensor-parallel
  over `tensor`, the rest on the fsdp axis (as tools/generate.py does)."""
  import jax
  if jax.device_count() == 1 and tensor == 1:
    return None
  return sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=tensor))


# The reference recipe's diagnosis sampling: the original student answers each prompt once.
REFERENCE_SAMPLING = {"max_new_tokens": 512, "temperature": 0.7, "top_p": 1.0, "seed": 42}


def sample_pool(prompts: list[Prompt], categories: tuple[str, ...] = (), per_category: int = 0,
                seed: int = 42) -> list[Prompt]:
  """The diagnosis pool: only `categories` (all when empty), at most `per_category` of each
  (0 = all) by a seeded sample, in file order (the reference: 1,000 each of WildJailbreak's
  adversarial_harmful and adversarial_benign, seed 42)."""
  if categories:
    missing = [c for c in categories if not any(p.category == c for p in prompts)]
    if missing:
      raise UserError(f"no prompt has category {', '.join(map(repr, missing))}; the file's "
                      f"categories: {', '.join(sorted({p.category for p in prompts})) or '-'}")
    prompts = [p for p in prompts if p.category in categories]
  if not per_category:
    return prompts
  rng, keep = random.Random(seed), set()
  by_cat: dict[str, list[int]] = {}
  for i, p in enumerate(prompts):
    by_cat.setdefault(p.category, []).append(i)
  for idx in by_cat.values():
    keep.update(rng.sample(idx, min(per_category, len(idx))))
  return [p for i, p in enumerate(prompts) if i in keep]


def generate_answers(prompts: list[Prompt], model_spec: str, *,
                     max_new_tokens: int = REFERENCE_SAMPLING["max_new_tokens"],
                     batch_size: int = 8, template: str | None = None,
                     seed: int = REFERENCE_SAMPLING["seed"],
                     temperature: float = REFERENCE_SAMPLING["temperature"],
                     top_p: float = REFERENCE_SAMPLING["top_p"],
                     dtype: str = "float32", tensor: int = 1, out_path: str | None = None,
                     fresh: bool = False) -> list[str]:
  """The model's answers, rendered with its own chat template; sampled as the reference does
  by default (temperature 0.7, top_p 1.0, 512 new tokens, seeded); temperature 0 = greedy.
  With `out_path` they are also written there in tools/generate.py's format, resumably (a
  killed run continues from its last complete chunk; `fresh` discards one of other settings)."""
  log(f"diagnose: loading {model_spec}")
  model, cfg, tok = G.load_generation_model(model_spec, param_dtype=dtype, compute_dtype=dtype)
  gen = ContinuousGenerator(model, cfg, tok, mesh=auto_mesh(tensor), batch_size=batch_size)
  sampling = G.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed)
  convs = [[{"role": r, "content": c} for r, c in p.messages] for p in prompts]
  if out_path is None:
    out = gen.generate_chat(convs, sampling, template=template,
                            progress=lambda d, t: log(f"diagnose: generated {d}/{t}"))
    return [g.text for g in out]
  ids = [gen.render(c, template) for c in convs]
  settings = F.settings_of(model_spec, cfg, dtype, sampling, template, gen.stop_ids)
  rows = [{"id": p.id or str(i), "prompt": p.prompt, "category": p.category}
          for i, p in enumerate(prompts)]
  lines = F.generate_into(out_path, gen, rows, ids, sampling, settings, chunk=batch_size * 16,
                          fresh=fresh)
  return [line["response"] for line in lines]


def judge_all(judge: Judge, prompts: list[Prompt], answers: list[str],
              chunk: int = 256) -> list[Verdict]:
  """Verdicts in chunks, with progress output."""
  verdicts: list[Verdict] = []
  for start in range(0, len(prompts), chunk):
    verdicts += judge.judge([p.prompt for p in prompts[start:start + chunk]],
                            answers[start:start + chunk])
    log(f"diagnose: judged {len(verdicts)}/{len(prompts)} with {judge.name}")
  return verdicts


def verdict_name(v: Verdict) -> str:
  return "invalid" if not v.valid else ("unsafe" if v.unsafe else "safe")


def judged_row(p: Prompt, answer: str, v: Verdict, judge_name: str) -> dict:
  """One line of vulnerable/safe/invalid.jsonl. `category`: the prompt's own, else the judge's."""
  return {**prompt_fields(p), "answer": answer, "verdict": verdict_name(v),
          "categories": list(v.categories), "hazard_codes": list(v.codes),
          "category": p.category or (v.categories[0] if v.categories else ""),
          "origin": p.where, "judge": judge_name, "judge_output": v.raw}


def write_diagnosis(out_dir: str, prompts: list[Prompt], answers: list[str],
                    verdicts: list[Verdict], judge_name: str, meta: dict,
                    write: bool = True) -> dict:
  """vulnerable.jsonl, safe.jsonl (and invalid.jsonl when the judge's output did not parse),
  summary.json; returns the summary. `write=False` (processes other than 0): no files."""
  rows = [judged_row(p, a, v, judge_name) for p, a, v in zip(prompts, answers, verdicts)]
  counts = Counter(r["verdict"] for r in rows)
  files = {}
  for name, verdict in (("vulnerable", "unsafe"), ("safe", "safe"), ("invalid", "invalid")):
    path = os.path.join(out_dir, f"{name}.jsonl")
    if verdict != "invalid" or counts["invalid"]:
      if write:
        write_jsonl(path, (r for r in rows if r["verdict"] == verdict))
      files[name] = path
    elif write and os.path.exists(path):
      os.remove(path)  # a stale file from an earlier run would read as this run's
  first: dict[str, str] = {}
  duplicates = []  # judged like any other prompt; build_mix keeps the first
  for r in rows:
    key = normalize(r.get("prompt") or json.dumps(r.get("messages")))
    if key in first:
      duplicates.append({"where": r["origin"], "id": r["id"], "first_seen": first[key]})
    first.setdefault(key, r["origin"])
  by_cat: dict[str, Counter] = {}
  for r in rows:
    by_cat.setdefault(r["category"] or "(none)", Counter())[r["verdict"]] += 1
  summary = {**meta, "judge": judge_name, "prompts": len(rows),
             **{v: counts[v] for v in VERDICTS},
             "unsafe_rate": counts["unsafe"] / max(1, counts["unsafe"] + counts["safe"]),
             "by_category": {c: dict(n) for c, n in sorted(by_cat.items())},
             "hazard_codes": dict(Counter(c for r in rows for c in r["hazard_codes"])),
             "duplicate_prompts": duplicates, "files": files}
  if write:
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
  return summary


def format_counts(summary: dict) -> str:
  """The summary as a small table."""
  lines = [f"{summary['prompts']} prompts judged by {summary['judge']}: "
           f"{summary['unsafe']} unsafe (vulnerable), {summary['safe']} safe, "
           f"{summary['invalid']} invalid judge outputs; unsafe rate "
           f"{100 * summary['unsafe_rate']:.1f}%", f"{'category':24s} unsafe  safe  invalid"]
  for cat, n in summary["by_category"].items():
    lines.append(f"{cat:24s} {n.get('unsafe', 0):6d} {n.get('safe', 0):5d} "
                 f"{n.get('invalid', 0):8d}")
  for d in summary["duplicate_prompts"]:
    lines.append(f"duplicate prompt: {d['where']} id={d['id'] or '-'} "
                 f"(first seen: {d['first_seen']})")
  return "\n".join(lines)


def diagnose(out_dir: str, judge_factory: Callable[[], Judge], *, prompts_path: str = "",
             adapter: str = "auto", responses_path: str = "", model: str = "",
             max_rows: int = 0, categories: tuple[str, ...] = (), per_category: int = 0,
             pool_seed: int = 42, **gen_options) -> dict:
  """Prompts + model (or a responses file) + judge -> the diagnosis files; returns the summary.
  `model` should be the original student (the reference diagnoses the model before any EASE
  training); `categories`/`per_category`/`pool_seed` pick the pool (see `sample_pool`)."""
  if bool(responses_path) == bool(model):
    raise UserError("give either --model (generate the answers) or --responses (a "
                    "tools/generate.py output file, judged as is)")
  if responses_path:
    prompts, answers = read_responses(responses_path, max_rows)
    log(f"diagnose: {len(prompts)} responses from {responses_path}")
  else:
    if not prompts_path:
      raise UserError("--model needs --prompts FILE")
    prompts = sample_pool(read_prompts(prompts_path, adapter, max_rows=max_rows), categories,
                          per_category, pool_seed)
    log(f"diagnose: {len(prompts)} prompts from {prompts_path}")
    answers = generate_answers(prompts, model, out_path=os.path.join(out_dir, "generations.jsonl"),
                               **gen_options)
  judge = judge_factory()  # after generation: the student's weights can be freed first
  verdicts = judge_all(judge, prompts, answers)
  sampling = {k: gen_options.get(k, v) for k, v in REFERENCE_SAMPLING.items()} if model else None
  meta = {"model": model, "prompts_file": prompts_path, "responses_file": responses_path,
          "sampling": sampling, "pool": {"categories": list(categories),
                                         "per_category": per_category, "seed": pool_seed}}
  return write_diagnosis(out_dir, prompts, answers, verdicts, judge.name, meta,
                         write=is_primary())

"""Shows rendered training examples with the supervised text marked, and a data summary.

  ease-inspect-data --config configs/qwen2.5-0.5b_phase1.yaml [key=value ...] [-n 3]
  ease-inspect-data --config CONFIG --split eval --json

Supervised text is marked `[[gate:...]][[think:...]][[answer:...]]` (in colour on a terminal:
prompt dim, gate magenta, think yellow, answer green). The summary comes from one pass of the
real pipeline at `train.seq_len` (one epoch of the weighted mix for `train`): examples per
objective and source, document length percentiles, dropped and skipped examples, and packing
efficiency (the non-padding fraction of packed token positions), and the mean examples per
optimizer step (packed rows hold several examples). `--examples_per_step N` also prints the
`train.batch_size` that gives about N examples per step on this data (the reference recipe
trains 32 examples per step, one per padded row).

`behavior.file` (a `class`-labelled eval file or a safety benchmark: StrongREJECT, XSTest,
JailbreakBench, WildJailbreak eval) is shown too: prompts per class and one rendered prompt.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ease_jax import init_from as init
from ease_jax.config import NON_NEGATIVE, Config, arg, load_config
from ease_jax.data import report
from ease_jax.data.pipeline import OVERLONG, Pipeline
from ease_jax.errors import DataError, UserError


def example_info(pipe: Pipeline, rec, color: bool) -> dict:
  """One rendered record: where it came from, its token counts and its marked text."""
  info = {"source": rec.source, "where": rec.where, "objective": rec.target_type}
  r = pipe.render(rec)
  if isinstance(r, DataError):
    return info | {"skipped": str(r)}
  if r is OVERLONG:  # rendered only when it may fit: a huge row is never tokenized
    r = pipe.renderer.render(rec) if pipe.renderer.min_tokens(rec) - 1 <= pipe.seq_len else None
  if r is None:
    return info | {"overlong": True, "min_tokens": pipe.renderer.min_tokens(rec) - 1}
  think = r.think_end - r.start - 1
  return info | {"tokens": len(r) - 1, "prompt_tokens": r.start,
                 "supervised_tokens": len(r) - r.start, "think_tokens": think,
                 "answer_tokens": len(r) - r.think_end,
                 "overlong": len(r) - 1 > pipe.seq_len, "text": pipe.renderer.marked(r, color)}


def pick(records: list[list], n: int) -> list:
  """The first `n` records taken round-robin over sources, so every source shows."""
  out, depth = [], 0
  while len(out) < n and any(depth < len(rs) for rs in records):
    out += [rs[depth] for rs in records if depth < len(rs)]
    depth += 1
  return out[:n]


def summarize(pipe: Pipeline, tokenizer_path: str = "") -> dict:
  """One pass of the pipeline; lengths come from the packed segments."""
  lengths = []
  for batch in pipe:
    seg = batch["segment_ids"]
    for row in seg:
      ids, counts = np.unique(row[row > 0], return_counts=True)
      lengths += counts.tolist()
  pct = {f"p{q}": int(np.percentile(lengths, q)) for q in (0, 50, 90, 99, 100)} if lengths else {}
  stats = pipe.stats.as_dict()
  examples = sum(stats["examples_by_objective"].values())
  per_step = examples / stats["batches"] if stats["batches"] else 0.0
  return {"split": pipe.split, "seq_len": pipe.seq_len, "tokenizer": tokenizer_path,
          "vocab_size": len(pipe.renderer.tokenizer),
          "records": sum(map(len, pipe.records)), "document_tokens": pct,
          "batch_size": pipe.batch_size, "examples_per_step": round(per_step, 2),
          "sources": [r.line() for r in report.source_reports(pipe)], **stats}


def batch_for(summary: dict, examples: int) -> int:
  """The batch_size (packed rows) whose steps hold about `examples` examples on this data."""
  per_row = summary["examples_per_step"] / summary["batch_size"]
  return max(1, round(examples / per_row)) if per_row else 0


def eval_prompts(cfg: Config, tok) -> dict | None:
  """behavior.file: prompts per class and the first prompt rendered as generation sees it."""
  if not cfg.behavior.file:
    return None
  from collections import Counter

  from ease_jax.data.render import FIXED_DATE  # the date generation renders with
  from ease_jax.recipe.evaluate import read_eval_file
  items = read_eval_file(cfg.behavior.file)
  msgs = [{"role": r, "content": c} for r, c in items[0].record.messages]
  text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                 date_string=FIXED_DATE.strftime("%d %b %Y"),
                                 strftime_now=FIXED_DATE.strftime)
  return {"file": cfg.behavior.file, "prompts_by_class": dict(Counter(i.cls for i in items)),
          "first": {"where": items[0].record.where, "class": items[0].cls, "text": text}}


def print_human(examples: list[dict], summary: dict) -> None:
  for i, ex in enumerate(examples):
    if "skipped" in ex:
      print(f"--- example {i}: {ex['source']} ({ex['where']}) SKIPPED: {ex['skipped']}")
      continue
    if "text" not in ex:
      print(f"--- example {i}: {ex['source']} ({ex['where']}) OVERLONG: at least "
            f"{ex['min_tokens']} tokens (not tokenized)")
      continue
    print(f"--- example {i}: {ex['source']} ({ex['where']}) objective={ex['objective']} "
          f"tokens={ex['tokens']} prompt={ex['prompt_tokens']} "
          f"supervised={ex['supervised_tokens']} (think {ex['think_tokens']}, "
          f"answer {ex['answer_tokens']})" + (" OVERLONG" if ex["overlong"] else ""))
    print(ex["text"])
  s = summary
  print(f"--- summary ({s['split']}, seq_len {s['seq_len']}, {s['records']} records read, "
        f"tokenizer {s['tokenizer']})")
  for line in s["sources"]:
    print(line)
  print("examples per objective:", s["examples_by_objective"])
  print("examples per source:   ", s["examples_by_source"])
  print("document tokens:       ", s["document_tokens"])
  print(f"dropped overlong: {s['dropped_overlong']}   skipped bad records: "
        f"{s['skipped_bad_records']}")
  for reason in s["skip_reasons"]:
    print("  skipped:", reason)
  print(f"batches: {s['batches']}   tokens: {s['tokens']}   supervised: {s['supervised_tokens']}"
        f"   packing efficiency: {100 * s['packing_efficiency']:.1f}%")
  print(f"examples per step: {s['examples_per_step']:.1f} (batch_size {s['batch_size']} packed "
        f"rows of {s['seq_len']} tokens)")
  if s.get("batch_for"):
    n, b = s["batch_for"]
    print(f"batch_size for about {n} examples per step on this data: {b}")
  if s.get("behavior"):
    e = s["behavior"]
    print(f"--- behavior eval {e['file']}: prompts per class {e['prompts_by_class']}")
    print(f"first prompt ({e['first']['where']}, class {e['first']['class']}), rendered:")
    print(e["first"]["text"])



def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", help="YAML config (default: the built-in defaults)")
  ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
  ap.add_argument("-n", type=arg(int, NON_NEGATIVE), default=3, help="examples to show (default 3)")
  ap.add_argument("--split", choices=("train", "eval"), default="train")
  ap.add_argument("--json", action="store_true", help="print one JSON object instead")
  ap.add_argument("--examples_per_step", type=arg(int, NON_NEGATIVE), default=0,
                  help="also print the batch_size giving about N examples per step")
  args = ap.parse_args(argv)
  try:
    cfg = load_config(args.config, args.overrides)
    # Exactly the tokenizer launch/train.py trains with (a ckpt: run's own, think tokens added).
    tok = init.load_run_tokenizer(cfg)
    pipe = Pipeline(cfg.data, tok, seq_len=cfg.train.seq_len,
                    batch_size=cfg.train.batch_size, seed=cfg.train.seed, split=args.split,
                    num_epochs=1)
    color = sys.stdout.isatty() and not args.json
    examples = [example_info(pipe, r, color) for r in pick(pipe.records, args.n)]
    summary = summarize(pipe, init.tokenizer_path(cfg))
    if args.examples_per_step:
      summary["batch_for"] = [args.examples_per_step, batch_for(summary, args.examples_per_step)]
    summary["behavior"] = eval_prompts(cfg, tok)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps({"examples": examples, "summary": summary}, indent=1))
  else:
    print_human(examples, summary)
  return 0

#!/usr/bin/env python
"""Selective-reasoning evaluation of a model on an eval file with `class` labels.

  ease-evaluate --model runs/demo/phase2 --eval data/demo/eval.jsonl --out runs/demo/eval
      [--judge refusal|llama_guard:HF_DIR|python:module:function] [--judge_reasoning]
      [--refusal keyword|xstest|patterns|python:module:function] [--max_new_tokens 256]

Writes OUT/report.json (per class and overall: n, reasoning_rate, refusal_rate, unsafe_rate with
a judge, mean/p90 new tokens, mean think tokens, truncated_rate, no_answer_rate, seconds per
prompt; attack_success_rate and over_refusal_rate; which detector and judge, and what the judge
saw), OUT/report.md, OUT/chart.png and OUT/generations.jsonl. docs/evaluation.md explains them.
Several processes (TPU VM workers, or --coordinator/--num_processes/--process_id as in
launch/train.py) evaluate together, the model sharded over all their devices (--tensor:
tensor-parallel size); process 0 writes. docs/generation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ease_jax import distributed
from ease_jax.config import POSITIVE, arg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="RUN_DIR[@STEP] or a Hugging Face directory")
  p.add_argument("--eval", required=True, help="eval records with a `class` field")
  p.add_argument("--adapter", default="prompt_response", help="the eval file's adapter")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--judge", default=None, help="refusal | llama_guard:HF_DIR | python:module:fn")
  p.add_argument("--judge_reasoning", action="store_true",
                 help="the judge reads the think block too (default: the final answer only)")
  p.add_argument("--refusal", default="keyword",
                 help="refusal detector: keyword | xstest | patterns | python:module:fn")
  p.add_argument("--max_new_tokens", type=arg(int, POSITIVE), default=256)
  p.add_argument("--batch_size", type=arg(int, POSITIVE), default=16)
  p.add_argument("--tensor", type=arg(int, POSITIVE), default=1,
                 help="tensor-parallel size (mesh.tensor)")
  distributed.add_args(p)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  distributed.init_distributed(args)
  from ease_jax.recipe import evaluate as E
  from ease_jax.recipe.diagnose import auto_mesh
  from ease_jax.recipe.judges import make_judge
  from ease_jax.recipe.refusals import make_refusal_detector

  mesh = auto_mesh(args.tensor)
  judge_opts = {"mesh": mesh} if (args.judge or "").startswith("llama_guard:") else {}
  scorers = E.Scorers(refusal=make_refusal_detector(args.refusal),
                      judge=make_judge(args.judge, **judge_opts) if args.judge else None,
                      judge_reasoning=args.judge_reasoning)
  primary = distributed.is_primary()
  progress = lambda done, total: primary and print(f"  generated {done}/{total}", file=sys.stderr)
  report = E.evaluate_model(args.model, args.eval, args.out, args.max_new_tokens,
                            args.batch_size, adapter=args.adapter, progress=progress,
                            scorers=scorers, mesh=mesh)
  if not primary:
    return 0
  out = Path(args.out)
  print(E.markdown(report, title=f"{args.model} on {args.eval}"))
  print(f"wrote {out / 'report.json'}, report.md, chart.png, generations.jsonl")
  return 0

#!/usr/bin/env python
"""Teacher selection: distil each candidate teacher into the same student, evaluate, rank.

  ease-select-teacher --candidates strong=data/demo/teachers/strong.jsonl \\
      weak=data/demo/teachers/weak.jsonl overcautious=data/demo/teachers/overcautious.jsonl \\
      --eval data/demo/eval.jsonl --out runs/teachers
      [--config configs/demo_phase1.yaml] [--judge refusal|llama_guard:DIR|python:mod:fn]
      [--steps N] [--max_new_tokens 256] [key.sub=value ...]

A candidate is NAME=FILE or NAME=FILE:ADAPTER (adapter `star` by default). Each student trains
in OUT/NAME with the config's settings and only that file as data.train (same seed, same
steps), is evaluated greedily into OUT/NAME/eval, and OUT/ranking.json and OUT/ranking.md
rank the teachers (unsafe and refusal rates on harmful classes, over-refusal on benign ones,
think-token lengths of traces and students, and the score; see ease_jax/recipe/teachers.py).
Running the command again resumes or reuses each student's checkpoints.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ease_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[2]  # the checkout (configs/) of an editable install


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--candidates", nargs="+", required=True, metavar="NAME=FILE[:ADAPTER]")
  p.add_argument("--eval", required=True, help="eval records with a `class` field")
  p.add_argument("--out", required=True, help="output directory (one run per teacher)")
  p.add_argument("--config", default=str(ROOT / "configs" / "demo_phase1.yaml"),
                 help="the phase-1 config every student trains with")
  p.add_argument("--judge", default="refusal", help="refusal | llama_guard:DIR | python:mod:fn")
  p.add_argument("--steps", type=int, default=0, help="steps per student (0: the config's)")
  p.add_argument("--max_new_tokens", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=20, help="generation batch size")
  p.add_argument("overrides", nargs="*", metavar="key.sub=value", default=[])
  args = p.parse_args(argv)
  # Overrides written after the candidate list land in it: a dotted key is an override.
  moved = [c for c in args.candidates if "." in c.partition("=")[0]]
  args.candidates = [c for c in args.candidates if c not in moved]
  args.overrides = list(args.overrides) + moved
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  from ease_jax.config import load_config
  from ease_jax.recipe import teachers

  if any(o.startswith("run_dir=") for o in args.overrides):
    raise UserError("run_dir= does not apply here: each student trains in OUT/NAME (use --out)")
  overrides = args.overrides + ([f"train.steps={args.steps}"] if args.steps else [])
  base = load_config(args.config, overrides)
  candidates = [teachers.parse_candidate(c) for c in args.candidates]
  ranking = teachers.select(base, candidates, args.eval, args.out, args.judge,
                            args.max_new_tokens, args.batch_size,
                            config_name=os.path.relpath(args.config))
  print("\n" + (Path(args.out) / "ranking.md").read_text())
  print(f"winner: {ranking[0]['teacher']} (score {ranking[0]['score']:.3f})")
  print(f"wrote {Path(args.out) / 'ranking.json'}, {Path(args.out) / 'ranking.md'}")
  return 0

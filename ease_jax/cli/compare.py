#!/usr/bin/env python
"""Side-by-side comparison of models on a safety suite (and optional lm-eval tasks).

  ease-compare --models base=runs/base refusal=runs/refusal ease=runs/demo/phase2 \
      --suite configs/suites/demo.yaml --out runs/compare [--base base]

Each model is NAME=RUN_DIR[@STEP] or NAME=HF_DIR. Writes OUT/report.md, OUT/report.json,
OUT/chart_<benchmark>.png (ASR, over-refusal, think tokens and seconds per prompt per class)
and each model's full evaluation under OUT/<model>/<benchmark>/; deltas are against --base
(default: the first model). docs/evaluation.md describes the suite file and every number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", required=True, help="NAME=RUN_DIR[@STEP] or NAME=HF_DIR")
  p.add_argument("--suite", required=True, help="the suite YAML (benchmarks, judges, lm_eval)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--base", default="", help="the model deltas are against (default: the first)")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  from ease_jax.recipe import compare as CMP

  suite = CMP.load_suite(args.suite)  # a bad suite or model list fails before any model loads
  models = CMP.parse_models(args.models)
  log = lambda msg: print(msg, file=sys.stderr)
  report = CMP.compare(models, suite, args.out, base=args.base, log=log)
  out = Path(args.out)
  print((out / "report.md").read_text())
  print(f"wrote {out / 'report.md'}, report.json, chart_*.png; per model: {out}/<model>/<benchmark>/")
  return 0 if report else 1

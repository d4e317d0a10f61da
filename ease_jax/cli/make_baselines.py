#!/usr/bin/env python
"""Training data for the refusal-training and always-reason baselines, from EASE configs' sources.

  ease-make-baselines --kind refusal --config configs/demo.yaml --out data/baselines/demo/refusal
  ease-make-baselines --kind always_reason --config configs/demo.yaml \
      --out data/baselines/demo/always_reason --generic
  ease-make-baselines --kind always_reason --config configs/qwen2.5-0.5b_phase1.yaml \
      configs/qwen2.5-0.5b_phase2.yaml --out data/baselines/qwen2.5-0.5b/always_reason --traces traces.jsonl

refusal: every target without its reasoning (a reasoning target's answer becomes a `refusal`
target when it reads as a refusal, else `direct`). always_reason: every target with reasoning,
its own, a teacher trace for its prompt (--traces: tools/write_traces.py or tools/generate.py
output; traces cut off by max_new_tokens are not used), or with --generic a fixed short reasoning. Answers are never changed.
Writes OUT/<source name>.jsonl (prompt_response rows) per training source of every config.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--kind", required=True, choices=("refusal", "always_reason"))
  p.add_argument("--config", nargs="+", required=True, help="the EASE config(s) whose sources to use")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--traces", default="", help="tools/write_traces.py or tools/generate.py output: teacher traces by prompt")
  p.add_argument("--generic", action="store_true",
                 help="always_reason: a fixed short reasoning where there is no trace")
  args = p.parse_args(argv)
  from ease_jax.config import load_config
  from ease_jax.recipe import baselines

  sources = tuple(s for c in args.config for s in baselines.train_sources(load_config(c)))
  for path, n in baselines.write_baseline(sources, args.kind, args.out, args.traces,
                                          args.generic).items():
    print(f"{path}: {n} rows")
  return 0

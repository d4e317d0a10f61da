#!/usr/bin/env python
"""Teacher reasoning traces for the vulnerable prompts, with the reference recipe's defaults.

  ease-write-traces --model models/DeepSeek-R1-Distill-Qwen-14B \\
      --input runs/diagnose/vulnerable.jsonl --out runs/traces.jsonl --dtype bfloat16

Each prompt is wrapped in the policy specification for its hazard category (the Llama Guard
codes S1-S14 in vulnerable.jsonl's `hazard_codes`, else the row's `category`; else the
generic policy) from --policies (default configs/templates/policies.yaml), and the teacher's
answer is pre-filled with "<think>\\n". Defaults: temperature 0.7, top_p 1.0, 2048 new
tokens, seed 42. --generic_policy uses the generic policy for every prompt; --greedy decodes
greedily; --no_prefill leaves the assistant turn empty.

Output: one JSON line per prompt, in input order: id, prompt (the original text, so
build_mix joins on it), response ("<think>\\n" + the continuation), stopped (false: cut off by
--max_new_tokens; build_mix rejects those), new_tokens, category, policy, hazard_codes.
OUT.summary.json counts the policies used and the truncated traces.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ease_jax.recipe import diagnose as stages
from ease_jax.recipe import traces

ROOT = Path(__file__).resolve().parents[2]  # the checkout (configs/) of an editable install


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="the teacher: HF_DIR or RUN_DIR[@STEP]")
  p.add_argument("--input", required=True, help="vulnerable.jsonl or any prompt file")
  p.add_argument("--out", required=True, help="output JSONL")
  p.add_argument("--adapter", default="auto", help="--input format (as tools/diagnose.py)")
  p.add_argument("--policies", default=str(ROOT / "configs" / "templates" / "policies.yaml"))
  p.add_argument("--generic_policy", action="store_true",
                 help="the generic policy for every prompt (no per-category sections)")
  p.add_argument("--max_new_tokens", type=int, default=2048)
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=42)
  p.add_argument("--greedy", action="store_true", help="temperature 0 (not the reference's)")
  p.add_argument("--no_prefill", action="store_true", help="do not pre-fill '<think>\\n'")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--max_rows", type=int, default=0, help="use only the first N (0 = all)")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  from ease_jax.generation import generate as G

  policies = traces.load_policies(args.policies, args.generic_policy)
  sampling = G.SamplingConfig(max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                              temperature=0.0 if args.greedy else args.temperature,
                              seed=args.seed)
  prompts = stages.read_prompts(args.input, args.adapter, keep=("hazard_codes",),
                                max_rows=args.max_rows)
  model, cfg, tok = G.load_generation_model(args.model, param_dtype=args.dtype,
                                            compute_dtype=args.dtype)
  gen = G.Generator(model, cfg, tok, mesh=stages.auto_mesh(), batch_size=args.batch_size)
  stages.log(f"write_traces: {len(prompts)} prompts from {args.input}; teacher {args.model}")
  rows, summary = traces.write_traces(
      prompts, gen, policies, sampling, prefill="" if args.no_prefill else traces.PREFILL,
      progress=lambda d, t: stages.log(f"write_traces: generated {d}/{t}"))
  stages.write_jsonl(args.out, rows)
  summary.update(model=args.model, input=args.input, policies_file=args.policies,
                 sampling={"temperature": sampling.temperature, "top_p": sampling.top_p,
                           "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed},
                 prefill=not args.no_prefill)
  with open(f"{os.path.splitext(args.out)[0]}.summary.json", "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  print(f"wrote {len(rows)} traces to {args.out}: policies {summary['policies']}, "
        f"{summary['truncated']} cut off by --max_new_tokens (build_mix rejects them)")
  return 0

"""Phase 2, step 1: find the vulnerable region. Generate with the student, judge its answers.

  # generate with the phase-1 model, judge with Llama-Guard-3 on this framework's decoder
  python tools/diagnose.py --prompts data/jailbreaks.jsonl --model runs/qwen2.5-0.5b_phase1 \\
      --judge llama_guard:/models/Llama-Guard-3-8B --out runs/diagnose
  # judge answers generated earlier by tools/generate.py (no student model loaded)
  python tools/diagnose.py --responses gens.jsonl --judge refusal --out runs/diagnose

Writes OUT/vulnerable.jsonl (prompts whose answers the judge calls unsafe: prompt, answer,
verdict, categories, hazard codes, id), OUT/safe.jsonl, OUT/invalid.jsonl (only when the
judge's output could not be parsed) and OUT/summary.json, and prints the counts.
Judges: llama_guard:HF_DIR | refusal (weak; harmful prompt sets only) | python:module:function.
Prompt files: rows with `prompt` (or `messages`) and optional `id`, `category`, or any
adapter's format (--adapter auto detects it as tools/generate.py does). A prompt seen twice is
judged twice and listed in summary.json. See ease_jax/stages.py for the file schemas.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ease_jax import judges, stages  # noqa: E402
from ease_jax.errors import UserError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--prompts", default="", help="prompt file (JSONL, JSON, Parquet, datasets)")
  ap.add_argument("--adapter", default="auto",
                  help="--prompts format: auto | prompts (plain rows) | a Record adapter")
  ap.add_argument("--model", default="", help="RUN_DIR[@STEP] or HF_DIR of the student")
  ap.add_argument("--responses", default="", help="tools/generate.py output to judge as is")
  ap.add_argument("--judge", required=True, help="llama_guard:HF_DIR | refusal | python:mod:fn")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--template", default="", help="prompt template file with {prompt}")
  ap.add_argument("--max_new_tokens", type=int, default=512)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--top_p", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--batch_size", type=int, default=8, help="generation batch (student)")
  ap.add_argument("--judge_batch_size", type=int, default=8, help="llama_guard batch")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="parameter and compute dtype of the student and a llama_guard judge")
  ap.add_argument("--max_rows", type=int, default=0, help="use only the first N (0 = all)")
  return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    template = None
    if args.template:
      if not os.path.isfile(args.template):
        raise UserError(f"--template file not found: {args.template}")
      template = open(args.template, encoding="utf-8").read()
    opts = {}
    if args.judge.startswith("llama_guard:"):
      opts = {"batch_size": args.judge_batch_size, "dtype": args.dtype,
              "mesh": stages.auto_mesh()}
    os.makedirs(args.out, exist_ok=True)
    summary = stages.diagnose(
        args.out, lambda: judges.make_judge(args.judge, **opts), prompts_path=args.prompts,
        adapter=args.adapter, responses_path=args.responses, model=args.model,
        max_rows=args.max_rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        template=template, seed=args.seed, temperature=args.temperature, top_p=args.top_p,
        dtype=args.dtype)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(stages.format_counts(summary))
  print(f"wrote {', '.join(summary['files'].values())} and {args.out}/summary.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())

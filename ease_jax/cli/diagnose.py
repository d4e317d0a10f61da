"""Phase 2, step 1: find the vulnerable region. Generate with the student, judge its answers.

  # as the reference recipe: the ORIGINAL student (before any EASE training) answers 1,000
  # adversarial-harmful and 1,000 adversarial-benign WildJailbreak prompts, sampled
  # (temperature 0.7, top_p 1.0, 512 new tokens, seed 42); Llama-Guard-3 judges
  ease-diagnose --prompts data/wildjailbreak/train/train.tsv \\
      --categories adversarial_harmful adversarial_benign --per_category 1000 \\
      --model models/Qwen2.5-1.5B-Instruct --judge llama_guard:/models/Llama-Guard-3-8B \\
      --out runs/diagnose
  # the alternative (not the reference's): the phase-1 model, greedy
  ease-diagnose --prompts data/jailbreaks.jsonl --model runs/qwen2.5-1.5b_phase1 \\
      --greedy --judge llama_guard:/models/Llama-Guard-3-8B --out runs/diagnose_phase1
  # judge answers generated earlier by tools/generate.py (no student model loaded)
  ease-diagnose --responses gens.jsonl --judge refusal --out runs/diagnose

Writes OUT/generations.jsonl (the student's answers, tools/generate.py's format; a killed
generation resumes from its last complete chunk when the command is run again, --fresh
discards an unfinished one of other settings), OUT/vulnerable.jsonl (prompts whose answers the judge calls unsafe: prompt, answer,
verdict, categories, hazard codes, id), OUT/safe.jsonl, OUT/invalid.jsonl (only when the
judge's output could not be parsed) and OUT/summary.json, and prints the counts.
Judges: llama_guard:HF_DIR | refusal (weak; harmful prompt sets only) | python:module:function.
Prompt files: rows with `prompt` (or `messages`) and optional `id`, `category`, or any
adapter's format (--adapter auto detects it as tools/generate.py does). A prompt seen twice is
judged twice and listed in summary.json. See ease_jax/recipe/diagnose.py for the file schemas.
Several processes (TPU VM workers, or --coordinator/--num_processes/--process_id as in
launch/train.py) generate and judge together, the models sharded over all their devices
(--tensor: tensor-parallel size); process 0 writes. docs/generation.md.

The options may also come from the `diagnose:` section of a YAML file (--config FILE.yaml;
the phase-2 training config may carry it) and key=value words (the flag names without --;
lists comma-separated): a --flag wins over key=value, which wins over the file (docs/recipe.md).
"""

from __future__ import annotations

import argparse
import os
import sys

from ease_jax import distributed
from ease_jax.cli import options
from ease_jax.errors import UserError
from ease_jax.recipe import diagnose as stages
from ease_jax.recipe import judges


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--prompts", default="", help="prompt file (JSONL, JSON, CSV/TSV, Parquet, datasets)")
  ap.add_argument("--adapter", default="auto",
                  help="--prompts format: auto | prompts (plain rows) | a Record adapter")
  ap.add_argument("--model", default="", help="RUN_DIR[@STEP] or HF_DIR of the student")
  ap.add_argument("--responses", default="", help="tools/generate.py output to judge as is")
  ap.add_argument("--judge", required=True, help="llama_guard:HF_DIR | refusal | python:mod:fn")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--template", default="", help="prompt template file with {prompt}")
  ref = stages.REFERENCE_SAMPLING
  ap.add_argument("--max_new_tokens", type=int, default=ref["max_new_tokens"])
  ap.add_argument("--temperature", type=float, default=ref["temperature"], help="0 = greedy")
  ap.add_argument("--top_p", type=float, default=ref["top_p"])
  ap.add_argument("--seed", type=int, default=ref["seed"], help="sampling seed")
  ap.add_argument("--greedy", action="store_true",
                  help="temperature 0: the deterministic alternative, not the reference's")
  ap.add_argument("--categories", nargs="*", default=[],
                  help="keep only prompts of these categories (WildJailbreak: data_type)")
  ap.add_argument("--per_category", type=int, default=0,
                  help="a seeded sample of at most N prompts per category (0 = all)")
  ap.add_argument("--pool_seed", type=int, default=42, help="seed of the --per_category sample")
  ap.add_argument("--batch_size", type=int, default=8, help="generation batch (student)")
  ap.add_argument("--judge_batch_size", type=int, default=8, help="llama_guard batch")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="parameter and compute dtype of the student and a llama_guard judge")
  ap.add_argument("--max_rows", type=int, default=0, help="use only the first N (0 = all)")
  ap.add_argument("--tensor", type=int, default=1, help="tensor-parallel size (mesh.tensor)")
  ap.add_argument("--fresh", action="store_true",
                  help="discard an unfinished OUT/generations.jsonl.partial of other settings")
  distributed.add_args(ap)
  return options.parse_args(ap, argv, "diagnose")


def main(argv: list[str] | None = None) -> int:
  try:
    args = parse_args(argv)
    distributed.init_distributed(args)
    template = None
    if args.template:
      if not os.path.isfile(args.template):
        raise UserError(f"--template file not found: {args.template}")
      template = open(args.template, encoding="utf-8").read()
    opts = {}
    if args.judge.startswith("llama_guard:"):
      opts = {"batch_size": args.judge_batch_size, "dtype": args.dtype,
              "mesh": stages.auto_mesh(args.tensor)}
    os.makedirs(args.out, exist_ok=True)
    summary = stages.diagnose(
        args.out, lambda: judges.make_judge(args.judge, **opts), prompts_path=args.prompts,
        adapter=args.adapter, responses_path=args.responses, model=args.model,
        max_rows=args.max_rows, categories=tuple(args.categories),
        per_category=args.per_category, pool_seed=args.pool_seed,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, template=template,
        seed=args.seed, temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p,
        dtype=args.dtype, tensor=args.tensor, fresh=args.fresh)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not distributed.is_primary():
    return 0
  print(stages.format_counts(summary))
  print(f"wrote {', '.join(summary['files'].values())} and {args.out}/summary.json")
  return 0

"""Phase 2, step 2: build the three-way calibration mix as Records.

  ease-build-mix --vulnerable runs/diagnose/vulnerable.jsonl \\
      --traces runs/teacher/traces.jsonl --harmful data/harmful_refusals.jsonl \\
      --general data/general_answers.jsonl --ratio 1:1:2 --seed 0 --out data/phase2/mix

  vulnerable prompts + teacher traces -> OUT/reasoning.jsonl (target `reasoning`)
  --harmful (prompts with refusals)   -> OUT/refusal.jsonl   (target `refusal`)
  --general (prompts with answers)    -> OUT/direct.jsonl    (target `direct`)

Traces: tools/write_traces.py or tools/generate.py output (response =
'<think>...</think>answer') or any Record file with reasoning (--traces_adapter star | ease10k |
prompt_response | messages). A row cut off by max_new_tokens (`stopped: false`) is left out and
counted in every set (report.json `truncated`), wherever the cut fell: inside the think block
or after '</think>' ("...</think>\\n\\nI can't help with break"). A vulnerable
prompt joins its trace by `id` when the prompt texts agree, else by normalised prompt text
(NFKC, case-folded, whitespace collapsed). Every prompt without a trace, every bad trace row and
every duplicate prompt is printed and listed in OUT/report.json; OUT/missing_traces.jsonl is a
prompt file to generate the missing traces from. Duplicates keep their first occurrence, and a
prompt in more than one set stays in the first of reasoning > refusal > direct.

Counts: all of every set by default; --ratio R:F:D sets refusal and direct counts relative to
the reasoning count; --max_reasoning/--max_refusal/--max_direct cap each; --seed picks the
sample. --eval_fraction F holds out F of each set as OUT/eval_*.jsonl. OUT/sources.yaml is a
`data:` config section listing the files (show them: tools/inspect_data.py --config
OUT/sources.yaml); copy its entries into the phase-2 config. --require_all_traces makes a
missing trace an error (exit 2) after the report is written.

The options may also come from the `build_mix:` section of a YAML file (--config FILE.yaml;
the phase-2 training config may carry it) and key=value words (the flag names without --;
lists comma-separated): a --flag wins over key=value, which wins over the file (docs/recipe.md).
"""

from __future__ import annotations

import argparse
import os
import sys

from ease_jax.cli import options
from ease_jax.errors import UserError
from ease_jax.recipe import diagnose as stages
from ease_jax.recipe import mix


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--vulnerable", required=True, help="diagnose's vulnerable.jsonl")
  ap.add_argument("--traces", required=True, help="teacher traces for the vulnerable prompts")
  ap.add_argument("--traces_adapter", default="prompt_response")
  ap.add_argument("--harmful", default="", help="plainly harmful prompts with refusals")
  ap.add_argument("--harmful_adapter", default="prompt_response")
  ap.add_argument("--general", default="", help="general prompts with direct answers")
  ap.add_argument("--general_adapter", default="prompt_response")
  ap.add_argument("--drop_reasoning", action="store_true",
                  help="keep only the answer of --harmful/--general rows that carry think text")
  ap.add_argument("--ratio", default="", help="reasoning:refusal:direct, e.g. 1:1:2")
  for k in mix.KINDS:
    ap.add_argument(f"--max_{k}", type=int, default=0, help=f"cap on {k} examples (0 = none)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--eval_fraction", type=float, default=0.0)
  ap.add_argument("--require_all_traces", action="store_true")
  ap.add_argument("--out", required=True, help="output directory")
  return options.parse_args(ap, argv, "build_mix")


def main(argv: list[str] | None = None) -> int:
  try:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    inputs = [args.vulnerable, args.traces, args.harmful, args.general]
    if any(p and os.path.dirname(os.path.abspath(p)) == out for p in inputs):
      raise UserError(f"--out {args.out} holds an input file; write the mix to its own directory")
    issues = mix.Issues()
    vulnerable = stages.read_judged(args.vulnerable)
    traces = mix.load_targets(args.traces, args.traces_adapter, "reasoning", issues=issues)
    harmful = (mix.load_targets(args.harmful, args.harmful_adapter, "refusal",
                                args.drop_reasoning, issues) if args.harmful else [])
    general = (mix.load_targets(args.general, args.general_adapter, "direct",
                                args.drop_reasoning, issues) if args.general else [])
    stages.log(f"build_mix: {len(vulnerable)} vulnerable prompts, {len(traces)} traces, "
               f"{len(harmful)} harmful, {len(general)} general")
    caps = {k: getattr(args, f"max_{k}") for k in mix.KINDS}
    os.makedirs(out, exist_ok=True)
    summary = mix.build_mix(args.out, vulnerable=vulnerable, traces=traces, harmful=harmful,
                            general=general, issues=issues, caps=caps, seed=args.seed,
                            ratio=mix.parse_ratio(args.ratio) if args.ratio else None,
                            eval_fraction=args.eval_fraction)
    print(mix.format_summary(summary))
    mix.check_nonempty(summary)
    print(f"wrote {args.out}/sources.yaml, report.json, missing_traces.jsonl")
    if args.require_all_traces and summary["missing_traces"]:
      raise UserError(f"{len(summary['missing_traces'])} vulnerable prompts have no trace "
                      f"(listed in {out}/missing_traces.jsonl)")
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0

#!/usr/bin/env python
"""Export a training checkpoint to a Hugging Face directory, optionally verifying parity.

  ease-export --checkpoint RUN_DIR[@STEP] --out exports/demo [--step N]
      [--dtype bfloat16|float16|float32] [--verify] [--overwrite]

--overwrite replaces only a previous export (a directory holding the export's .ease_export.json
marker and nothing else), never a run directory, the current directory or one of its parents.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ease_jax.config import POSITIVE, arg
from ease_jax.errors import UserError
from ease_jax.hf import export_dir
from ease_jax.hf import save as export
from ease_jax.tokenizer import load_tokenizer
from ease_jax.train import checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="a training RUN_DIR, or RUN_DIR@STEP")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--out", required=True,
                 help="output directory (new, or a previous export with --overwrite)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  p.add_argument("--verify", action="store_true",
                 help="compare tokenization and logits with transformers")
  p.add_argument("--overwrite", action="store_true",
                 help="replace --out if it is a previous export")
  p.add_argument("--max_shard_gb", type=arg(float, POSITIVE), default=2.0, help="safetensors file size limit")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  run_dir, step = checkpoint.parse_ckpt_spec(args.checkpoint)
  if step is not None and args.step is not None and step != args.step:
    raise UserError(f"--checkpoint {args.checkpoint} names step {step} but --step is {args.step}")
  if not args.max_shard_gb > 0:
    raise UserError(f"--max_shard_gb must be positive, got {args.max_shard_gb}")
  protect = (run_dir,)
  export_dir.check_destination(Path(args.out), args.overwrite, protect)  # before any loading
  model, cfg, step = checkpoint.load_model(run_dir, step if step is not None else args.step)
  tokenizer = load_tokenizer(str(run_dir / "tokenizer"))
  out = export.save_pretrained(model, cfg, args.out, tokenizer=tokenizer, dtype=args.dtype,
                               overwrite=args.overwrite, protect=protect,
                               max_shard_bytes=int(args.max_shard_gb * 1024**3))
  print(f"exported step {step} of {run_dir} ({cfg.family}, {cfg.num_params() / 1e6:.1f}M params, "
        f"{args.dtype}) to {out}")
  if not args.verify:
    return 0
  return 0 if _verify(model, out, tokenizer, args.dtype) else 1


def _verify(model, out: Path, tokenizer, dtype: str) -> bool:
  """Prints the tokenizer and logit checks (docs/export.md); True when all pass."""
  tok_ok = True
  for r in export.verify_tokenizer(out, tokenizer):
    tok_ok &= r["same"]
    print(f"  tokenizer ({r['class']}): {'same' if r['same'] else 'DIFFERENT'} ids "
          f"({r['tokens']} run vs {r['tokens_exported']} exported)  {r['text'][:40]!r}")
  logits_ok, worst = True, 0.0
  for r in export.verify_export(model, out, tokenizer, dtype):
    logits_ok &= r["ok"] and r["same_ids_as_run"]
    worst = max(worst, r["max_abs_diff"] / max(r["logit_scale"], 1.0))
    print(f"  {r['tokens']:4d} tokens  max|logit diff| {r['max_abs_diff']:.2e} of scale "
          f"{r['logit_scale']:.3g} (bound {r['bound']:.2e})  argmax agree "
          f"{r['argmax_agree']:.3f}, flips {r['argmax_flips']}  (vs unrounded float32 model "
          f"{r['quantization_diff']:.2e})  chat ids "
          f"{'same' if r['same_ids_as_run'] else 'DIFFERENT'}"
          f"  {r['prompt'][:40]!r}")
  ok = tok_ok and logits_ok
  print(f"verify: {'PASS' if ok else 'FAIL'} (tokenizer {'same' if tok_ok else 'DIFFERENT'}; max "
        f"relative logit diff {worst:.2e}, tolerance {export.RELATIVE_TOLERANCE:g})")
  return ok

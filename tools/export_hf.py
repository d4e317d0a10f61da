#!/usr/bin/env python
"""Export a training checkpoint to a Hugging Face directory, optionally verifying parity.

  python tools/export_hf.py --checkpoint runs/demo --out exports/demo [--step N]
      [--dtype bfloat16|float16|float32] [--verify] [--overwrite]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ease_jax import checkpoint, export  # noqa: E402
from ease_jax.config import POSITIVE, arg  # noqa: E402
from ease_jax.errors import run_main  # noqa: E402
from ease_jax.tokenizer import load_tokenizer  # noqa: E402

FLOAT32_TOLERANCE = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="a training RUN_DIR")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--out", required=True, help="output directory (must not exist)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  p.add_argument("--verify", action="store_true", help="compare logits with transformers")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument("--max_shard_gb", type=arg(float, POSITIVE), default=2.0, help="safetensors file size limit")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  run_dir = Path(args.checkpoint)
  model, cfg, step = checkpoint.load_model(run_dir, args.step)
  tokenizer = load_tokenizer(str(run_dir / "tokenizer"))
  out = export.save_pretrained(model, cfg, args.out, tokenizer=tokenizer, dtype=args.dtype,
                               overwrite=args.overwrite,
                               max_shard_bytes=int(args.max_shard_gb * 1024**3))
  print(f"exported step {step} of {run_dir} ({cfg.family}, {cfg.num_params() / 1e6:.1f}M params, "
        f"{args.dtype}) to {out}")
  if not args.verify:
    return 0
  worst = 0.0
  for r in export.verify_export(model, out, tokenizer, args.dtype):
    worst = max(worst, r["max_abs_diff"])
    agree = "same" if r["next_token_hf"] == r["next_token_jax"] else "DIFFERENT"
    print(f"  {r['tokens']:4d} tokens  max|logit diff| {r['max_abs_diff']:.2e}  "
          f"(vs unrounded float32 model {r['quantization_diff']:.2e})  greedy next token: "
          f"hf {r['next_token_hf']} jax {r['next_token_jax']} ({agree})  {r['prompt'][:40]!r}")
  ok = worst <= FLOAT32_TOLERANCE
  print(f"verify: {'PASS' if ok else 'FAIL'} (max diff {worst:.2e}, tolerance {FLOAT32_TOLERANCE:g})")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(run_main(main))

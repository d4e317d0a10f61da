#!/usr/bin/env python
"""Export a checkpoint (or an HF directory) straight to one GGUF file for llama.cpp.

  ease-export-gguf --model RUN_DIR[@STEP]|HF_DIR|FILE.gguf --out FILE.gguf
      [--type F16|F32|BF16|Q8_0|Q4_0|Q4_1|Q5_0|Q5_1] [--template FILE] [--verify]
      [--verify_data FILE.jsonl] [--overwrite]

--verify reads the file back (ease_jax.edge.gguf_read) and compares logits with the checkpoint on
chat-rendered prompts (and on --verify_data rows' text, held-out data, when given):
for F32/F16/BF16 the bound is float32's (1e-4) after rounding the checkpoint the same way;
for quantized types it reports greedy agreement and the loss delta.
"""

from __future__ import annotations

import argparse
from pathlib import Path


from ease_jax.config import SourceConfig
from ease_jax.data import readers
from ease_jax.edge import gguf_write as gguf_export
from ease_jax.errors import DataError, UserError
from ease_jax.generation.generate import load_generation_model
from ease_jax.hf.save import VERIFY_PROMPTS

FLOAT32_TOLERANCE = 1e-4
EXACT_TYPES = ("F32", "F16", "BF16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="RUN_DIR[@STEP], an HF directory or a .gguf")
  p.add_argument("--out", required=True, help="output .gguf file (must not exist)")
  p.add_argument("--type", default="F16", choices=list(gguf_export.TYPES))
  p.add_argument("--template", default=None, help="chat template file (default: the tokenizer's)")
  p.add_argument("--name", default="ease-jax", help="general.name in the file")
  p.add_argument("--verify", action="store_true", help="read the file back and compare logits")
  p.add_argument("--verify_data", default=None,
                 help="JSONL rows whose prompt/response text also enter --verify (held-out data)")
  p.add_argument("--verify_rows", type=int, default=16, help="rows of --verify_data used")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  return p.parse_args(argv)


def _verify_ids(tokenizer, args: argparse.Namespace) -> list[list[int]]:
  """Chat-rendered verify prompts, plus the text of held-out rows when given."""
  ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for p in VERIFY_PROMPTS]
  if args.verify_data:
    for loc, row in list(readers.read_rows(SourceConfig(adapter="prompt_response", path=args.verify_data)))[:args.verify_rows]:
      if isinstance(row, DataError):
        raise row
      text = "\n".join(str(row[k]) for k in ("prompt", "response", "text") if row.get(k))
      if text:
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][:512])
  return ids


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  model, cfg, tokenizer = load_generation_model(args.model)
  template = None
  if args.template:
    if not Path(args.template).is_file():
      raise UserError(f"--template {args.template}: file not found")
    template = Path(args.template).read_text(encoding="utf-8")
  out = gguf_export.save_gguf(model, cfg, args.out, tokenizer, args.type, chat_template=template,
                              name=args.name, overwrite=args.overwrite)
  print(f"wrote {out} ({cfg.family}, {cfg.num_params() / 1e6:.1f}M params, {args.type}, "
        f"{out.stat().st_size / 1e6:.1f} MB)")
  if not args.verify:
    return 0
  results = gguf_export.verify_gguf(model, out, _verify_ids(tokenizer, args), args.type)
  for r in results:
    print(f"  {r['tokens']:4d} tokens  max|logit diff| {r['max_abs_diff']:.2e} (max|logit| "
          f"{r['max_abs_logit']:.1f})  argmax agreement {r['argmax_agreement']:.3f}  "
          f"loss {r['loss_checkpoint']:.4f} -> {r['loss_gguf']:.4f}")
  n = sum(r["tokens"] - 1 for r in results)
  loss = [sum(r[k] * (r["tokens"] - 1) for r in results) / n for k in ("loss_checkpoint", "loss_gguf")]
  agree = sum(r["argmax_agreement"] * r["tokens"] for r in results) / sum(r["tokens"] for r in results)
  worst = max(r["max_abs_diff"] for r in results)
  print(f"verify: argmax agreement {agree:.4f}, mean loss {loss[0]:.4f} -> {loss[1]:.4f} "
        f"(delta {loss[1] - loss[0]:+.4f}), max diff {worst:.2e}")
  if args.type not in EXACT_TYPES:
    return 0
  ok = worst <= FLOAT32_TOLERANCE
  print(f"verify: {'PASS' if ok else 'FAIL'} (tolerance {FLOAT32_TOLERANCE:g})")
  return 0 if ok else 1

#!/usr/bin/env python
"""Generate answers for a file of prompts with a checkpoint or a Hugging Face model.

  python tools/generate.py --model RUN_DIR[@STEP]|HF_DIR --input FILE --out FILE
      [--template FILE] [--max_new_tokens 256] [--temperature 0] [--top_p 1.0] [--seed 0]
      [--batch_size 8] [--adapter auto] [--dtype float32|bfloat16] [--tensor 1]

Input: JSONL / JSON / Parquet rows of any adapter's format (ease_jax.data.records), or
plain prompt rows (`prompt` or `messages`, no answer needed). Output: one JSON line per
input row, in input order: id, prompt, response (with any <think> block visible),
response_ids, prompt_tokens, new_tokens, stopped, seconds (the wall time of the row's
batch), category. Temperature 0 is greedy. With the policy-spec template it writes
teacher reasoning traces:

  python tools/generate.py --model TEACHER_HF_DIR --input prompts.jsonl --out traces.jsonl \\
      --template configs/templates/policy_spec.txt --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ease_jax import generate as G  # noqa: E402
from ease_jax.config import (NON_NEGATIVE, POSITIVE, PROBABILITY, SEED, SourceConfig,  # noqa: E402
                             arg)
from ease_jax.data import readers, records  # noqa: E402
from ease_jax.errors import DataError, UserError, run_main  # noqa: E402
from ease_jax.recipe.diagnose import detect_adapter  # noqa: E402

ADAPTERS = ("auto", "prompts", *records.ADAPTERS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="RUN_DIR[@STEP] of a training run, or an HF directory")
  p.add_argument("--input", required=True, help="records or prompts (.jsonl, .json, .parquet)")
  p.add_argument("--out", required=True, help="output JSONL")
  p.add_argument("--template", default=None, help="prompt template file with {prompt}")
  p.add_argument("--max_new_tokens", type=arg(int, POSITIVE), default=256)
  p.add_argument("--temperature", type=arg(float, NON_NEGATIVE), default=0.0, help="0 = greedy")
  p.add_argument("--top_p", type=arg(float, PROBABILITY), default=1.0)
  p.add_argument("--seed", type=arg(int, SEED), default=0)
  p.add_argument("--batch_size", type=arg(int, POSITIVE), default=8)
  p.add_argument("--adapter", default="auto", choices=ADAPTERS,
                 help="input format; 'prompts' = rows with `prompt` or `messages` only; "
                      "'auto' picks by the first row's fields")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="parameter and compute dtype")
  p.add_argument("--tensor", type=arg(int, POSITIVE), default=1, help="tensor-parallel size (mesh.tensor)")
  return p.parse_args(argv)


def _prompt_row(row: dict) -> tuple[list[dict], str]:
  """A plain prompt row -> (messages up to the assistant turn, category)."""
  msgs = row.get("messages")
  if msgs is not None:
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and m.get("role") in records.ROLES and isinstance(m.get("content"), str)
        for m in msgs)
    if not ok:
      raise DataError("expected a non-empty list of {role, content}", field="messages")
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    if msgs[-1]["role"] == "assistant":
      msgs = msgs[:-1]  # a supervised answer is not part of the prompt
    if not msgs or msgs[-1]["role"] not in ("user", "tool"):
      raise DataError("the conversation must end with a user turn", field="messages")
  else:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
      raise DataError("expected a non-empty string", field="prompt")
    msgs = [{"role": "user", "content": prompt.strip()}]
  category = row.get("category")
  return msgs, category if isinstance(category, str) else ""


def read_inputs(path: str, adapter: str) -> list[dict]:
  """Rows of `path` as {id, messages, category}; errors name the file and line."""
  src = SourceConfig(adapter="prompt_response", path=path)
  if adapter == "auto":
    adapter = detect_adapter(path)
  if adapter != "prompts":
    recs = records.load_records(SourceConfig(adapter=adapter, path=path))
    return [{"id": r.id or str(i), "category": r.category,
             "messages": [{"role": role, "content": c} for role, c in r.messages]}
            for i, r in enumerate(recs)]
  out = []
  for i, (loc, row) in enumerate(readers.read_rows(src)):
    try:
      if isinstance(row, DataError):
        raise row
      messages, category = _prompt_row(row)
    except DataError as e:
      raise loc.error(e) from None
    rid = row.get("id")
    out.append({"id": str(i) if rid is None else str(rid), "messages": messages,
                "category": category})
  if not out:
    raise DataError("no rows", path=path)
  return out


def _line(row: dict, g: G.Generation) -> str:
  prompt = next(m["content"] for m in reversed(row["messages"]) if m["role"] in ("user", "tool"))
  return json.dumps({"id": row["id"], "prompt": prompt, "response": g.text,
                     "response_ids": g.ids, "prompt_tokens": g.num_prompt_tokens,
                     "new_tokens": g.num_new_tokens, "stopped": g.stopped,
                     "seconds": round(g.seconds, 4), "category": row["category"]},
                    ensure_ascii=False) + "\n"


def make_generator(args: argparse.Namespace) -> G.Generator:
  import jax

  from ease_jax import sharding
  from ease_jax.config import MeshConfig
  model, cfg, tokenizer = G.load_generation_model(args.model, param_dtype=args.dtype,
                                                  compute_dtype=args.dtype)
  mesh = None
  if jax.device_count() > 1 or args.tensor > 1:
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=args.tensor))
  return G.Generator(model, cfg, tokenizer, mesh=mesh, batch_size=args.batch_size)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  sampling = G.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)
  template = None
  if args.template:
    if not os.path.isfile(args.template):
      raise UserError(f"--template: file not found: {args.template}")
    template = Path(args.template).read_text(encoding="utf-8")
    G.apply_template(template, "")  # checks for {prompt} before any work
  rows = read_inputs(args.input, args.adapter)
  gen = make_generator(args)
  print(f"{len(rows)} prompts from {args.input}; model {args.model} ({gen.model_cfg.family}, "
        f"{gen.model_cfg.num_params() / 1e6:.1f}M params)", file=sys.stderr)
  # Chunks of several batches: lines reach the file as they finish, sorting still pays.
  chunk, start, new_tokens = args.batch_size * 16, time.perf_counter(), 0
  tmp = f"{args.out}.partial"
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  with open(tmp, "w", encoding="utf-8") as f:
    for lo in range(0, len(rows), chunk):
      part = rows[lo:lo + chunk]
      outs = gen.generate_chat([r["messages"] for r in part], sampling, template=template)
      f.writelines(_line(r, g) for r, g in zip(part, outs))
      f.flush()
      new_tokens += sum(g.num_new_tokens + g.stopped for g in outs)
      elapsed = time.perf_counter() - start
      print(f"  {lo + len(part)}/{len(rows)} prompts  {new_tokens} new tokens  "
            f"{new_tokens / elapsed:.1f} tok/s  {elapsed:.1f}s", file=sys.stderr)
  os.replace(tmp, args.out)
  print(f"wrote {len(rows)} lines to {args.out} ({gen.num_compilations} compilations)",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(run_main(main))

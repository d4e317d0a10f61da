#!/usr/bin/env python
"""Generate answers for a file of prompts with a checkpoint or a Hugging Face model.

  ease-generate --model RUN_DIR[@STEP]|HF_DIR --input FILE --out FILE
      [--template FILE] [--max_new_tokens 256] [--temperature 0] [--top_p 1.0] [--seed 0]
      [--batch_size 8] [--adapter auto] [--dtype float32|bfloat16] [--tensor 1]
      [--chunk ROWS] [--fresh] [--coordinator HOST:PORT --num_processes N --process_id I]

Input: JSONL / JSON / Parquet rows of any adapter's format (ease_jax.data.records), or
plain prompt rows (`prompt` or `messages`, no answer needed). Output: one JSON line per
input row, in input order: id, prompt, response (with any <think> block visible),
response_ids, prompt_tokens, new_tokens, stopped, seconds (the wall time of the queue the
row ran in: its chunk's prompts of one length bucket), category. --batch_size is the number
of KV-cache slots: a finished row's slot takes the next prompt (continuous batching). Temperature 0 is greedy. With the policy-spec template it writes
teacher reasoning traces:

  ease-generate --model TEACHER_HF_DIR --input prompts.jsonl --out traces.jsonl \\
      --template configs/templates/policy_spec.txt --dtype bfloat16

Resumable: lines go to OUT.partial a chunk at a time with a progress record OUT.progress.json;
the same command after a crash or kill continues from the last complete chunk (other
settings are refused; --fresh starts over). Several processes (TPU VM workers, detected
automatically, or --coordinator/--num_processes/--process_id as in launch/train.py) generate
together with the model sharded over all their devices; process 0 writes. docs/generation.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ease_jax import distributed
from ease_jax.config import NON_NEGATIVE, POSITIVE, PROBABILITY, SEED, SourceConfig, arg
from ease_jax.data import readers, records
from ease_jax.errors import DataError, UserError
from ease_jax.generation import generate as G
from ease_jax.generation.continuous import ContinuousGenerator
from ease_jax.recipe.diagnose import detect_adapter

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
  p.add_argument("--chunk", type=arg(int, POSITIVE), default=None,
                 help="rows per saved chunk (default 16 batches): a killed run resumes from "
                      "its last complete chunk")
  p.add_argument("--fresh", action="store_true",
                 help="discard an unfinished OUT.partial of other settings and start over")
  distributed.add_args(p)
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


def make_generator(args: argparse.Namespace) -> G.Generator:
  """The model on a mesh over every device of every process (tensor-parallel over
  --tensor, FSDP over the rest, batch rows over the fsdp axis); no mesh on one device."""
  import jax

  from ease_jax import sharding
  from ease_jax.config import MeshConfig
  model, cfg, tokenizer = G.load_generation_model(args.model, param_dtype=args.dtype,
                                                  compute_dtype=args.dtype)
  mesh = None
  if jax.device_count() > 1 or args.tensor > 1:
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=args.tensor))
  return ContinuousGenerator(model, cfg, tokenizer, mesh=mesh, batch_size=args.batch_size)


def _log(message: str) -> None:
  if distributed.is_primary():
    print(message, file=sys.stderr, flush=True)


def generate_file(args: argparse.Namespace, rows: list[dict], gen: G.Generator,
                  sampling: G.SamplingConfig, template: str | None) -> None:
  """Generates every row into args.out in chunks, resuming an unfinished run of the same key."""
  from ease_jax.generation import files as F
  prompts = [gen.render(r["messages"], template) for r in rows]
  settings = F.settings_of(args.model, gen.model_cfg, args.dtype, sampling, template,
                           gen.stop_ids)
  meta = [{"id": r["id"], "category": r["category"],
           "prompt": next(m["content"] for m in reversed(r["messages"])
                          if m["role"] in ("user", "tool"))} for r in rows]
  # Chunks of several batches: lines reach the file as they finish, sorting still pays.
  F.generate_into(args.out, gen, meta, prompts, sampling, settings,
                  chunk=args.chunk or args.batch_size * 16, fresh=args.fresh)


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
  distributed.init_distributed(args)
  import jax
  gen = make_generator(args)
  _log(f"{len(rows)} prompts from {args.input}; model {args.model} ({gen.model_cfg.family}, "
       f"{gen.model_cfg.num_params() / 1e6:.1f}M params); {jax.process_count()} process(es), "
       f"{jax.device_count()} device(s)")
  try:
    generate_file(args, rows, gen, sampling, template)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    distributed.lost_peer(e, "resume the generation from its last complete chunk")
  _log(f"wrote {len(rows)} lines to {args.out} ({gen.num_compilations} compilations)")
  return 0

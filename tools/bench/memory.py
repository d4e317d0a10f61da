#!/usr/bin/env python
"""Memory of the compiled train step by `train.loss_chunk`: XLA's own memory analysis.

  python tools/bench/memory.py [--model qwen2.5-0.5b] [--batch-size 1] [--seq-len 4096]
      [--loss-chunk 0 1024] [--remat on] [--dtype bfloat16]

Compiles (does not run) the train step for rows of one device, from abstract shapes (no
weights are created), once per `--loss-chunk`, and reports what the compiled program needs:
its scratch memory (activations, gradients, the logits), its arguments (parameters and AdamW
moments) and outputs. On the CPU this is XLA:CPU's buffer assignment; a GPU or TPU compile
assigns buffers its own way, so read the difference between the rows, not the absolute
figures, as what the setting saves there. Prints a table and, as the last line, one JSON
object. Compiling a 0.5B model on 2 CPU cores takes a few minutes per row.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

GIB = 2 ** 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="qwen2.5-0.5b", help="a preset (ease_jax/models/presets.py)")
  ap.add_argument("--batch-size", type=int, default=1, help="rows on the device")
  ap.add_argument("--seq-len", type=int, default=4096)
  ap.add_argument("--loss-chunk", type=int, nargs="+", default=[0, 1024],
                  help="train.loss_chunk values to compare (0 = all positions at once)")
  ap.add_argument("--remat", choices=("off", "on"), default="on")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                  help="compute dtype (weights and AdamW moments stay float32)")
  ap.add_argument("--tail-buckets", type=int, default=0,
                  help="train.tail_buckets (default 0, as on GPU/TPU)")
  args = ap.parse_args(argv)
  if args.batch_size < 1 or args.seq_len < 8 or min(args.loss_chunk) < 0:
    ap.error("--batch-size must be >= 1, --seq-len >= 8 and every --loss-chunk >= 0")
  return args


def analyse(args: argparse.Namespace, chunk: int) -> dict:
  """Compiles the step for one `loss_chunk` from abstract state; XLA's memory analysis."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from ease_jax.config import LossConfig, TrainConfig
  from ease_jax.models import Decoder, get_preset
  from ease_jax.train import optim, step as step_lib
  mcfg = get_preset(args.model).replace(compute_dtype=args.dtype, remat=args.remat == "on")
  train = TrainConfig()
  tx = optim.make_optimizer(train, 10)
  graph = {}

  def build():
    graph["def"], state = step_lib.init_state(Decoder(mcfg, rngs=nnx.Rngs(0)), tx, 0)
    return state

  state = jax.eval_shape(build)
  shape = (args.batch_size, args.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32)
           for k in ("tokens", "targets", "segment_ids", "positions", "objective", "span")}
  batch["loss_weight"] = jax.ShapeDtypeStruct(shape, jnp.float32)
  fn = jax.jit(functools.partial(
      step_lib.train_step, graphdef=graph["def"], tx=tx, loss_cfg=LossConfig(), grad_accum=1,
      schedule=optim.make_schedule(train, 10), tail_buckets=args.tail_buckets,
      loss_chunk=chunk))
  compiled, seconds = common.timed(lambda: fn.lower(state, batch).compile())
  mem = compiled.memory_analysis()
  return {"loss_chunk": chunk, "temp_bytes": mem.temp_size_in_bytes,
          "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
          "compile_s": seconds, "params": mcfg.num_params(), "vocab": mcfg.vocab_size}


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  print(f"{args.model}, {args.batch_size} x {args.seq_len} positions on one device, "
        f"{args.dtype} compute, remat {args.remat}; compiling {len(args.loss_chunk)} step(s)",
        flush=True)
  results = []
  for chunk in args.loss_chunk:
    results.append(analyse(args, chunk))
    print(f"  loss_chunk {chunk}: compiled in {results[-1]['compile_s']:.0f} s", flush=True)
  logits = 4 * args.batch_size * args.seq_len * results[0]["vocab"]
  common.print_table(
      ["train.loss_chunk", "scratch GiB", "arguments GiB", "outputs GiB"],
      [[r["loss_chunk"], r["temp_bytes"] / GIB, r["argument_bytes"] / GIB,
        r["output_bytes"] / GIB] for r in results])
  print(f"(the float32 logits of every position: {logits / GIB:.2f} GiB)")
  common.emit_json({"bench": "memory", "machine": common.machine(), "model": args.model,
                    "batch_size": args.batch_size, "seq_len": args.seq_len,
                    "dtype": args.dtype, "remat": args.remat, "tail_buckets": args.tail_buckets,
                    "logits_bytes": logits, "results": results})


if __name__ == "__main__":
  main()

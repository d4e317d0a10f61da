"""Data pipeline throughput on one CPU core and packing efficiency on an EASE-like mix.

  python tools/bench/data.py [--seq-len 4096] [--records 3000] [--batches 60] [--bins 64]

Generates the records (no files needed): a phase-2 style three-way mix with short prompts,
long reasoning targets (think text 150-1500 tokens), short refusals and direct answers, and
renders them with the bundled demo tokenizer's ChatML template. Prints a table and, as the
last line, one JSON object. Feeding need: a TPU v5e chip (197 TFLOP/s bf16 peak) at 50% MFU
training Qwen2.5-0.5B (N ~ 0.5e9, 6N FLOPs per token) consumes
0.5 * 197e12 / (6 * 0.5e9) ~ 32.8k tokens/s.

Then the stalls of a training loop fed by the pipeline (`--step-ms`, 0 skips it): the loop
dispatches a device step, fetches the next batch while it runs, and waits for the previous
step's metrics; a simulated device (a GIL-free wait of step-ms per step) stands in for the
accelerator. The packer hands out rows in rounds of PACKING_BINS, rendering a whole round
first, so without a background thread (`data.prefetch_batches=0`) the device idles while the
loop's own thread renders the next round. Both settings run side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from ease_jax.config import DataConfig, SourceConfig  # noqa: E402
from ease_jax.data import pipeline as pl  # noqa: E402
from ease_jax.tokenizer import ensure_think_tokens, load_tokenizer  # noqa: E402

NEED_TOKENS_PER_S = 0.5 * 197e12 / (6 * 0.5e9)
WORDS = ("the user request asks for help with a plan that could harm people so I should think "
         "about policy safety context intent and offer a safer alternative because answer "
         "question detail step information risk legal public").split()


def _text(rng, lo: int, hi: int) -> str:
  """About `lo`..`hi` tokens of filler text (the demo BPE spends ~1.2 tokens per word)."""
  return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi) / 1.2)))


def write_mix(directory: str, n: int, seed: int = 0) -> tuple[SourceConfig, ...]:
  """Three JSONL sources in EASE proportions: reasoning 40%, refusal 30%, direct 30%."""
  rng = np.random.default_rng(seed)
  rows = {"reasoning": [], "refusal": [], "direct": []}
  for i in range(n):
    kind = rng.choice(list(rows), p=[0.4, 0.3, 0.3])
    row = {"prompt": _text(rng, 15, 300), "target_type": kind}
    if kind == "reasoning":
      row["reasoning"], row["response"] = _text(rng, 150, 1500), _text(rng, 40, 300)
    else:
      row["response"] = _text(rng, 20, 120) if kind == "refusal" else _text(rng, 20, 500)
    rows[kind].append(row)
  srcs = []
  for kind, rs in rows.items():
    path = os.path.join(directory, f"{kind}.jsonl")
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rs)
    srcs.append(SourceConfig(adapter="prompt_response", path=path, weight=len(rs)))
  return tuple(srcs)


def run(sources, tok, seq_len: int, batch_size: int, batches: int) -> dict:
  """Times the full pipeline (render, pack, batch) from the first batch over at least four
  packing rounds; work on rows not yet delivered counts in the time, so this errs low."""
  pipe = pl.Pipeline(DataConfig(train=sources), tok, seq_len, batch_size, seed=0)
  batches = max(batches, math.ceil(4 * pipe.bins / batch_size))
  start = time.perf_counter()
  it = iter(pipe)
  for _ in range(batches):
    next(it)
  secs = time.perf_counter() - start
  it.close()
  st = pipe.stats.as_dict()
  examples = sum(st["examples_by_objective"].values())
  return {"seq_len": seq_len, "bins": pipe.bins, "examples_per_s": examples / secs,
          "tokens_per_s": st["tokens"] / secs, "packing_efficiency": pipe.stats.packing_efficiency,
          "dropped_overlong": st["dropped_overlong"], "batches": batches}


def stalls(sources, tok, seq_len: int, batch_size: int, step_s: float, steps: int,
           prefetch: int) -> dict:
  """The loop's pattern against a simulated device: the wall time of `steps` steps (0 = four
  packing rounds) from the first batch on, against steps * step_s, and the device's idle time."""
  pipe = pl.Pipeline(DataConfig(train=sources, prefetch_batches=prefetch), tok, seq_len,
                     batch_size, seed=0)
  steps = steps or math.ceil(4 * pipe.bins / batch_size)
  it = iter(pipe)
  next(it)  # the first batch waits for the first round with or without the thread
  start = time.perf_counter()
  free = start + step_s  # the device runs the first batch's step
  idle = longest = 0.0
  for _ in range(steps - 1):
    next(it)                                   # fetched while the device runs the last step
    begin = max(time.perf_counter(), free)     # the device starts once it has the batch
    idle, longest = idle + begin - free, max(longest, begin - free)
    prev, free = free, begin + step_s
    time.sleep(max(0.0, prev - time.perf_counter()))  # the previous step's metrics
  time.sleep(max(0.0, free - time.perf_counter()))
  wall = time.perf_counter() - start
  it.close()
  return {"prefetch_batches": pipe.prefetch_batches(), "step_ms": 1000 * step_s,
          "steps": steps, "wall_s": wall, "ideal_s": steps * step_s, "device_idle_s": idle,
          "longest_idle_s": longest}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--seq-len", type=int, default=4096)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--records", type=int, default=3000)
  ap.add_argument("--batches", type=int, default=60)
  ap.add_argument("--bins", type=int, nargs="*", default=[pl.PACKING_BINS])
  ap.add_argument("--step-ms", type=float, default=500,
                  help="simulated device step for the stall comparison (0 = skip it)")
  ap.add_argument("--steps", type=int, default=0,
                  help="steps of the stall comparison (default: four packing rounds)")
  args = ap.parse_args()
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
  tok = load_tokenizer("")
  ensure_think_tokens(tok)
  results = []
  with tempfile.TemporaryDirectory() as d:
    sources = write_mix(d, args.records)
    for bins in args.bins:
      pl.PACKING_BINS = bins
      results.append(run(sources, tok, args.seq_len, args.batch_size, args.batches))
    pl.PACKING_BINS = args.bins[0]
    loop = [stalls(sources, tok, args.seq_len, args.batch_size, args.step_ms / 1000, args.steps,
                   n) for n in (0, -1)] if args.step_ms > 0 else []
  print(f"{'seq_len':>8} {'bins':>5} {'examples/s':>11} {'tokens/s':>10} {'packing':>8} "
        f"{'dropped':>8}")
  for r in results:
    print(f"{r['seq_len']:>8} {r['bins']:>5} {r['examples_per_s']:>11.0f} "
          f"{r['tokens_per_s']:>10.0f} {100 * r['packing_efficiency']:>7.1f}% "
          f"{r['dropped_overlong']:>8}")
  best = results[0]
  print(f"needed to feed one TPU v5e chip training Qwen2.5-0.5B at 50% MFU: "
        f"{NEED_TOKENS_PER_S:,.0f} tokens/s (0.5 * 197e12 / (6 * 0.5e9)); measured "
        f"{best['tokens_per_s']:,.0f} tokens/s on one core "
        f"({best['tokens_per_s'] / NEED_TOKENS_PER_S:.1f}x)")
  if loop:
    print(f"\na training loop on a simulated device ({args.step_ms:.0f} ms per step, "
          f"{loop[0]['steps']} steps from the first batch on):")
    print(f"{'prefetch':>9} {'wall s':>7} {'ideal s':>8} {'device idle s':>14} {'longest':>8}")
    for r in loop:
      print(f"{r['prefetch_batches']:>9} {r['wall_s']:>7.2f} {r['ideal_s']:>8.2f} "
            f"{r['device_idle_s']:>14.2f} {r['longest_idle_s']:>8.2f}")
  print(json.dumps({"bench": "data", "results": results, "need_tokens_per_s": NEED_TOKENS_PER_S,
                    "records": args.records, "batch_size": args.batch_size, "loop": loop}))


if __name__ == "__main__":
  main()

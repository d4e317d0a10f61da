"""Training throughput: ease-jax (packed) against the reference PyTorch recipe (padded), on CPU.

  python tools/bench/train_vs_reference.py                 # the default comparison (minutes)
  python tools/bench/train_vs_reference.py --smoke         # a tiny run that only checks it works

Same model shape, same records, same optimizer settings, one process, the cores it may use:
  (a) reference: transformers Qwen2ForCausalLM in PyTorch (eager, SDPA attention), AdamW with
      global-norm clipping and warmup + cosine, completion-only labels (-100 off the assistant
      turn), every example padded to max_length = the longest example rounded up to 8, or
      --max-length (the reference recipe pads to 8,192). A hand loop doing what transformers'
      Trainer does per step.
  (b) ease-jax: the real data pipeline (render, grain first-fit packing into rows of max_length)
      feeding the real jitted train step (`compile_train_step`), run as the training loop runs
      it: the next batch is fetched while the current step computes; pipeline time counts.
      `--steps-per-call` (default 4) is its `train.steps_per_call` (an opt-in setting of the
      loop, default 1 there): 4 optimizer steps per compiled call, the remainder one by one.
  (c) kernel speed: the ease-jax train step on exactly the padded batches of (a). Same inputs
      and outputs; note that ease-jax's CPU attention skips key tiles that the mask hides
      entirely (later documents' queries, padding queries), while PyTorch's SDPA computes
      every tile of a masked row, so part of (c) is less work, not faster kernels. The same
      holds for the loss tail (`train.tail_buckets`, on in (b) and (c)): the last MLP, LM head
      and loss skip positions without loss, which on padded rows are many.
The three run step by step interleaved in one process, so they see the same machine load.
PyTorch gets as many intra-op threads as XLA:CPU uses (the cores this process may run on), with
OMP_WAIT_POLICY=PASSIVE unless set (spinning OpenMP threads are slow on shared cores).
Both frameworks start from the same random weights (saved by transformers, loaded by
`ease_jax.hf`); the first-step losses on the same batch are printed as a check. Loss: the
plain token mean (`loss.normalize=token`), which is what the reference optimizes. Each round is
one interleaved epoch of all three. Before the timed rounds: compilation with the first step
(ease-jax) and one step (torch), reported separately, then `--warmup-rounds` whole untimed
rounds (the first steps after compiling ran slower while memory was first allocated, ~380 ms
against ~210 ms at bf16). The figures are medians over the timed rounds (ratios are taken within
a round first). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
from dataclasses import dataclass

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# PyTorch's OpenMP threads spin while waiting; on cores shared with other processes that
# spinning made the reference 3-4x slower in our runs, so let them sleep (before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository root on sys.path)
import numpy as np  # noqa: E402
from trainers import JaxTrainer, torch_reference, torch_trainer, wait  # noqa: E402

GOAL_B_OVER_A, GOAL_C = 4.0, 1.0


@dataclass
class Example:
  """A rendered example: token ids (ending with end-of-turn); ids[start:] are supervised."""
  ids: np.ndarray
  start: int

  @property
  def supervised(self) -> int:
    return len(self.ids) - self.start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  # 96 records pack ~94% full (32 packed only ~89%, the last rows half empty), closer to a
  # real data set; a round of all three runs took 1-1.5 minutes here (2 shared cores).
  ap.add_argument("--examples", type=int, default=96, help="records per epoch")
  ap.add_argument("--scale", type=float, default=0.5,
                  help="length scale of the mix (1.0 = tools/bench/data.py lengths)")
  ap.add_argument("--batch-size", type=int, default=2, help="rows per step, padded and packed")
  ap.add_argument("--max-length", type=int, default=None,
                  help="the reference's padding length and ease-jax's row length (default: "
                       "the longest example rounded up to 8, the setting most favourable to "
                       "the reference; the recipe itself pads to 8,192)")
  ap.add_argument("--rounds", type=int, default=2, help="timed interleaved rounds of (a)+(c), (b)")
  ap.add_argument("--warmup-rounds", type=int, default=None,
                  help="untimed rounds first, reported in the JSON, not in the medians "
                       "(default 1; 0 with --smoke)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="compute dtype of both. bfloat16 is the recipe's own setting: the "
                       "reference then holds bfloat16 weights under bf16 autocast (as its "
                       "script does), ease-jax float32 weights with bfloat16 compute")
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv-heads", type=int, default=2)
  ap.add_argument("--intermediate", type=int, default=704)
  ap.add_argument("--steps-per-call", type=int, default=4,
                  help="(b)'s train.steps_per_call: optimizer steps per compiled call (1 = the "
                       "loop's default; 4 maps XLA:CPU's scratch memory once per 4 steps)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--smoke", action="store_true", help="tiny everything: checks that it runs")
  args = ap.parse_args(argv)
  if args.smoke:
    args.examples, args.scale, args.rounds = 4, 0.05, 1
    args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 32, 1, 2, 1, 64
  if args.examples < args.batch_size:
    ap.error("--examples must be at least --batch-size")
  if args.warmup_rounds is None:
    args.warmup_rounds = 0 if args.smoke else 1
  if args.rounds < 1 or args.warmup_rounds < 0 or args.steps_per_call < 1:
    ap.error("--rounds and --steps-per-call must be at least 1 and --warmup-rounds at least 0")
  return args


def render(records, tok) -> list[Example]:
  """The records rendered once by ease-jax's renderer (the reference tokenizes them the same)."""
  from ease_jax.data.render import Renderer
  renderer = Renderer(tok)
  return [Example(r.ids, r.start) for r in map(renderer.render, records)]


def padded_batches(examples: list[Example], batch_size: int, max_len: int) -> list[dict]:
  """Rows padded to max_len, in both layouts: the reference's (input_ids, attention_mask,
  labels) and ease_jax.batch's (tokens, targets, ...). The same positions in both."""
  out = []
  for i in range(0, len(examples) - batch_size + 1, batch_size):
    ids = np.zeros((batch_size, max_len), np.int64)
    labels = np.full((batch_size, max_len), -100, np.int64)
    mask = np.zeros((batch_size, max_len), np.int64)
    for row, ex in enumerate(examples[i:i + batch_size]):
      n = len(ex.ids)
      ids[row, :n], mask[row, :n] = ex.ids, 1
      labels[row, ex.start:n] = ex.ids[ex.start:]
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    weight = np.zeros(ids.shape, np.float32)
    weight[:, :-1] = labels[:, 1:] != -100  # row t predicts token t+1, as in the HF shift
    ease = {"tokens": ids.astype(np.int32), "targets": targets.astype(np.int32),
            "segment_ids": mask.astype(np.int32),
            "positions": np.broadcast_to(np.arange(max_len, dtype=np.int32), ids.shape).copy(),
            "loss_weight": weight, "objective": np.zeros(ids.shape, np.int32),
            "span": np.ones(ids.shape, np.int32)}
    out.append({"torch": {"input_ids": ids, "attention_mask": mask, "labels": labels},
                "ease": ease, "supervised": int(weight.sum())})
  return out


def model_config(args: argparse.Namespace, vocab: int):
  """The shared small Qwen2 shape."""
  from ease_jax.models import DecoderConfig
  return DecoderConfig(family="qwen2", vocab_size=vocab, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_layers=args.layers,
                       num_heads=args.heads, num_kv_heads=args.kv_heads,
                       head_dim=args.hidden // args.heads, rope_theta=1e6,
                       max_position_embeddings=8192, tie_embeddings=True, qkv_bias=True)


def interleaved_epoch(batches: list[dict], torch_step, padded: JaxTrainer, packed: JaxTrainer,
                      pipeline, n_packed: int) -> dict:
  """One epoch of each run, step by step interleaved so all three see the same machine load:
  each padded batch through (a) the torch step and (c) the jax step, and the `n_packed`
  batches of (b) spread evenly among them.

  (b) runs as the training loop does (`ease_jax.train.loop.run_steps`): it dispatches a call
  (`packed.steps_per_call` steps, single steps for the remainder), then fetches the next
  call's batches from the pipeline (render and pack) while that call runs. Each (b) turn
  still waits for its call before the next run's turn, so no two runs overlap; the epoch's
  first fetch, which nothing hides, is timed too, and reported apart with each call's time."""
  t_ref, t_pad, t_pack = common.Timer(), common.Timer(), common.Timer()
  it = iter(pipeline)
  per_call = getattr(packed, "steps_per_call", 1)
  sizes = [per_call] * (n_packed // per_call) + [1] * (n_packed % per_call)
  with t_pack:
    upcoming = list(itertools.islice(it, sizes[0]))
  first_fetch_s, call_s = t_pack.seconds, []
  steps = calls = 0
  for i, b in enumerate(batches):
    with t_ref:
      torch_step(b["torch"])
    with t_pad:
      padded.step(b["ease"])
    while steps < math.ceil((i + 1) * n_packed / len(batches)):
      if len(upcoming) < sizes[calls]:
        raise RuntimeError("the pipeline yielded fewer batches than on its first pass")
      before = t_pack.seconds
      with t_pack:
        metrics = packed.dispatch(upcoming)
        steps, calls = steps + sizes[calls], calls + 1
        upcoming = list(itertools.islice(it, sizes[calls])) if calls < len(sizes) else []
        wait(metrics)
      call_s.append([sizes[calls - 1], t_pack.seconds - before])
  if upcoming or next(it, None) is not None:
    raise RuntimeError("the pipeline yielded more batches than on its first pass")
  return {"reference_s": t_ref.seconds, "ease_padded_s": t_pad.seconds,
          "ease_packed_s": t_pack.seconds, "ease_packed_first_fetch_s": first_fetch_s,
          "ease_packed_calls": call_s}


def setup(args: argparse.Namespace, directory: str) -> dict:
  """Records, tokenizer, max_length, batches and both frameworks' models."""
  import torch
  from ease_jax.config import Config, DataConfig, LossConfig, TrainConfig
  from ease_jax.data import pipeline as pl
  from ease_jax.data.records import load_records
  from ease_jax.tokenizer import ensure_think_tokens, load_tokenizer
  torch.set_num_threads(common.cores())  # XLA:CPU's thread pool spans the same cores
  tok = load_tokenizer("")
  ensure_think_tokens(tok)
  sources = common.write_sources(directory, common.ease_mix(args.examples, args.seed, args.scale))
  examples = render(load_records(sources[0]), tok)
  longest = 8 * math.ceil(max(len(e.ids) for e in examples) / 8)
  if args.max_length is not None and args.max_length < longest:
    raise SystemExit(f"--max-length {args.max_length} is shorter than the longest example "
                     f"({longest} tokens, rounded up to 8)")
  max_len = args.max_length or longest
  train = TrainConfig(batch_size=args.batch_size, seq_len=max_len, seed=args.seed)
  cfg = Config(data=DataConfig(train=sources), train=train, loss=LossConfig(normalize="token"))
  make_pipeline = lambda: pl.Pipeline(cfg.data, tok, max_len, args.batch_size, args.seed,
                                      num_epochs=1)
  first = make_pipeline()
  packed_batches, pipeline_s = common.timed(lambda: sum(1 for _ in iter(first)))
  batches = padded_batches(examples, args.batch_size, max_len)
  mcfg = model_config(args, len(tok))
  return {"cfg": cfg, "mcfg": mcfg, "examples": examples[:len(batches) * args.batch_size],
          "max_len": max_len, "batches": batches, "make_pipeline": make_pipeline,
          "packed_batches": packed_batches, "pipeline_s": pipeline_s,
          "torch_model": torch_reference(mcfg, os.path.join(directory, "model"), args.seed,
                                         args.dtype)}


def run_rounds(args: argparse.Namespace, s: dict, directory: str) -> dict:
  """Compile (timed with its first step) and one warm-up step each, `warmup_rounds` untimed
  interleaved epochs, then `rounds` timed ones of (a), (b), (c)."""
  model_dir = os.path.join(directory, "model")
  epochs = args.warmup_rounds + args.rounds
  padded_steps = epochs * len(s["batches"]) + 1  # the schedules cover every step run
  torch_step = torch_trainer(s["torch_model"], s["cfg"].train, padded_steps)
  padded = JaxTrainer(model_dir, s["cfg"], padded_steps, s["batches"][0]["ease"], args.dtype)
  packed = JaxTrainer(model_dir, s["cfg"], epochs * s["packed_batches"] + 1 + args.steps_per_call,
                      s["batches"][0]["ease"], args.dtype, args.steps_per_call)
  first = s["batches"][0]
  warm_torch_loss, warm_torch_s = common.timed(lambda: torch_step(first["torch"]))
  rounds = []
  for _ in range(epochs):
    pipe = s["make_pipeline"]()
    r = interleaved_epoch(s["batches"], torch_step, padded, packed, pipe, s["packed_batches"])
    r["load_avg"] = common.load_average()
    rounds.append(r)
    stats = pipe.stats
  return {"per_round": rounds[args.warmup_rounds:], "packed_stats": stats,
          "warmup_rounds": rounds[:args.warmup_rounds],
          "compile_s": {"ease_padded": padded.compile_s, "ease_packed": packed.compile_s},
          "warmup_step_s": {"reference": warm_torch_s},
          "first_step_loss": {"reference": warm_torch_loss, "ease_padded": padded.first_loss}}


def summarize(args: argparse.Namespace, s: dict, r: dict) -> dict:
  """Medians over rounds, tokens/s and the ratios (per round, then the median)."""
  rounds = r["per_round"]
  med = lambda key: float(np.median([x[key] for x in rounds]))
  supervised = sum(e.supervised for e in s["examples"])
  stats = r["packed_stats"]
  epoch = {k: med(k + "_s") for k in ("reference", "ease_packed", "ease_padded")}
  mcfg = s["mcfg"]
  return {
      "bench": "train_vs_reference", "machine": common.machine(),
      "torch_threads": common.cores(), "xla_cpu_threads": common.cores(),
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
      "model": {"hidden": mcfg.hidden_size, "layers": mcfg.num_layers, "heads": mcfg.num_heads,
                "kv_heads": mcfg.num_kv_heads, "head_dim": mcfg.head_dim,
                "intermediate": mcfg.intermediate_size, "vocab": mcfg.vocab_size,
                "params": mcfg.num_params()},
      "examples": len(s["examples"]), "scale": args.scale, "max_length": s["max_len"],
      "batch_size": args.batch_size, "rounds": args.rounds, "smoke": args.smoke,
      "dtype": args.dtype, "steps_per_call": args.steps_per_call,
      "mean_example_tokens": float(np.mean([len(e.ids) for e in s["examples"]])),
      "supervised_tokens_per_epoch": supervised,
      "steps_per_epoch": {"reference": len(s["batches"]), "ease_packed": s["packed_batches"]},
      "packing_efficiency": stats.packing_efficiency,
      "packed_supervised_tokens": stats.supervised_tokens,
      "pipeline_only_s": s["pipeline_s"],
      "epoch_s": epoch, "ease_packed_detail": packed_detail(rounds),
      "supervised_tokens_per_s": {k: supervised / v for k, v in epoch.items()},
      "ratio_b_over_a": float(np.median([x["reference_s"] / x["ease_packed_s"] for x in rounds])),
      "ratio_c_jax_over_torch": float(np.median([x["reference_s"] / x["ease_padded_s"]
                                                 for x in rounds])),
      "goals": {"b_over_a": GOAL_B_OVER_A, "c": GOAL_C},
      "compile_s": r["compile_s"], "warmup_step_s": r["warmup_step_s"],
      "first_step_loss": r["first_step_loss"], "per_round": rounds,
      "warmup_rounds": r["warmup_rounds"]}


def packed_detail(rounds: list[dict]) -> dict:
  """Where (b)'s epoch went (medians over rounds): the first fetch, which nothing hides, and
  milliseconds per step in its calls of several steps and in its single steps."""
  def per_step(r: dict, multi: bool) -> float | None:
    calls = [(n, sec) for n, sec in r["ease_packed_calls"] if (n > 1) == multi]
    return 1000 * sum(sec for _, sec in calls) / sum(n for n, _ in calls) if calls else None
  detail = {"first_fetch_s": float(np.median([r["ease_packed_first_fetch_s"] for r in rounds]))}
  for key, multi in (("ms_per_step_in_multi_step_calls", True), ("ms_per_single_step", False)):
    values = [v for v in (per_step(r, multi) for r in rounds) if v is not None]
    detail[key] = float(np.median(values)) if values else None
  return detail


def report(res: dict) -> None:
  """The human table; the JSON line follows it."""
  m, sup, ep = res["model"], res["supervised_tokens_per_s"], res["epoch_s"]
  print(f"model: qwen2 shape, hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads "
        f"({m['kv_heads']} kv), vocab {m['vocab']}, {m['params']:,} params, "
        f"{res['dtype']} compute")
  print(f"data: {res['examples']} examples (mean {res['mean_example_tokens']:.0f} tokens), "
        f"max_length {res['max_length']} (reference pads to it; ease-jax packs rows of it, "
        f"{100 * res['packing_efficiency']:.1f}% full), batch {res['batch_size']} rows, "
        f"{res['supervised_tokens_per_epoch']:,} supervised tokens per epoch")
  print(f"threads: torch {res['torch_threads']} (OMP_WAIT_POLICY={res['omp_wait_policy']}) = "
        f"XLA:CPU {res['xla_cpu_threads']} "
        f"({res['machine']['cpu']}); load avg per round: "
        f"{[x['load_avg'] for x in res['per_round']]}")
  steps = res["steps_per_epoch"]
  common.print_table(
      ["run", "steps/epoch", "epoch s", "supervised tok/s"],
      [["(a) reference torch, padded", steps["reference"], ep["reference"], sup["reference"]],
       [f"(b) ease-jax, packed, {res['steps_per_call']}/call", steps["ease_packed"],
        ep["ease_packed"], sup["ease_packed"]],
       ["(c) ease-jax, same padded batches", steps["reference"], ep["ease_padded"],
        sup["ease_padded"]]])
  d = res["ease_packed_detail"]
  parts = [f"first fetch {d['first_fetch_s']:.2f} s (render and pack, not hidden)"]
  if d["ms_per_step_in_multi_step_calls"] is not None:
    parts.append(f"{d['ms_per_step_in_multi_step_calls']:.0f} ms per step in calls of "
                 f"{res['steps_per_call']}")
  if d["ms_per_single_step"] is not None:
    parts.append(f"{d['ms_per_single_step']:.0f} ms per single step")
  print("(b) in detail: " + "; ".join(parts))
  print(f"b/a = {res['ratio_b_over_a']:.2f} (goal >= {GOAL_B_OVER_A}); c = jax/torch on the same "
        f"padded batches = {res['ratio_c_jax_over_torch']:.2f} (goal >= {GOAL_C})")
  c, w, lo = res["compile_s"], res["warmup_step_s"], res["first_step_loss"]
  print(f"not in the epochs: compile + first step {c['ease_padded']:.1f} s (padded) / "
        f"{c['ease_packed']:.1f} s (packed); warm-up step torch {w['reference']:.2f} s; "
        f"pipeline alone {res['pipeline_only_s']:.2f} s per epoch (in (b), overlapped with "
        f"its steps)")
  print(f"first-step loss on the same batch: torch {lo['reference']:.5f}, "
        f"jax {lo['ease_padded']:.5f}")


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  with tempfile.TemporaryDirectory() as d:
    s = setup(args, d)
    r = run_rounds(args, s, d)
  res = summarize(args, s, r)
  report(res)
  common.emit_json(res)
  return res


if __name__ == "__main__":
  main()

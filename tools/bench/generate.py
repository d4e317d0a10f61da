#!/usr/bin/env python
"""Generation throughput: ease-jax KV-cache decoding versus transformers `generate` on CPU.

  python tools/bench/generate.py [--shapes tiny small] [--batch 8] [--new-tokens 128]
      [--repeats 3] [--threads 0]

One random Qwen2 model (transformers, saved as safetensors, loaded by ease-jax: the same
weights), the same batch of prompts of mixed lengths (left-padded for transformers), greedy,
no stop token (both run all `--new-tokens` steps). Times the best of `--repeats` runs after
a warm-up (ease-jax's one compilation is reported separately). Prints a table and, as the
last line, one JSON object. Goal: ease-jax / transformers tokens/s >= 2.

`tiny` (the preset the demo trains, 0.6M parameters) measures per-step overhead, where
transformers' Python loop dominates; `small` (12.6M) is bound by batch-8 matmuls on
weights streamed from memory, where XLA:CPU and PyTorch are closer.

The length mix (`--mix-shapes`, default `small`): `--mix-rows` prompts of which 80% stop
before `--mix-short` tokens and 20% run to `--mix-long` (stop ids picked from the model's own
greedy outputs), generated in batches of `--batch` by transformers `generate`, by ease-jax's
fixed batches (`Generator`) and by continuous batching over `--batch` slots
(`ContinuousGenerator`). Goal: continuous / transformers >= 3.

On an accelerator, `--roofline PRESET` (no transformers) measures ease-jax alone on a random
model of a preset's shape in bfloat16, greedy, no stop token:

  python tools/bench/generate.py --roofline qwen2.5-1.5b --batch 64 --prompt-len 512 512 \
      --new-tokens 256

prefill: one compiled call with max_new_tokens=1 (the prompt's forward and one token); MFU =
forward FLOPs (`DecoderConfig.flops_per_token / 3` per prompt token) / time / the device's peak
bf16 FLOP/s (`ease_jax.train.metrics`). decode: (time at --new-tokens - time at 1) / (new tokens - 1)
per step; roofline fraction = (bytes of every weight + the KV cache up to each step's context,
averaged over the steps) / step time / the device's HBM bandwidth (HBM_BYTES_PER_S).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# Spinning OpenMP threads make torch many times slower on shared cores; both sides are
# measured with passive waiting (set OMP_WAIT_POLICY yourself to override).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

SHAPES = {  # Qwen2 shapes: `tiny` is the preset; `small` is a ~20M-parameter model
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=2),
}


# HBM bandwidth per device in bytes/s (published specifications), matched by substring of the
# lower-cased device_kind, most specific first.
HBM_BYTES_PER_S: tuple[tuple[str, float], ...] = (
    ("h200", 4.8e12), ("h100 pcie", 2.0e12), ("h100", 3.35e12), ("a100", 2.039e12),
    ("v6 lite", 1.64e12), ("v6e", 1.64e12), ("v5 lite", 819e9), ("v5e", 819e9),
    ("v5p", 2.765e12), ("tpu v5", 2.765e12), ("tpu v4", 1.2e12),
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", nargs="*", default=["tiny", "small"], choices=sorted(SHAPES))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 60), metavar=("MIN", "MAX"))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
  p.add_argument("--mix-shapes", nargs="*", default=["small"], choices=sorted(SHAPES),
                 help="shapes of the length-mix run (none: skip it)")
  p.add_argument("--mix-rows", type=int, default=40)
  p.add_argument("--mix-short", type=int, default=20, help="short rows stop before this step")
  p.add_argument("--mix-long", type=int, default=256, help="long rows run this many tokens")
  p.add_argument("--roofline", default=None, metavar="PRESET",
                 help="ease-jax alone on a preset's shape in bfloat16: prefill MFU and decode "
                      "as a fraction of the HBM roofline (accelerators)")
  p.add_argument("--dtype", default="bfloat16", help="--roofline: parameter and compute dtype")
  p.add_argument("--decoder", default="fixed", choices=["fixed", "continuous"],
                 help="--roofline: the fixed-batch Generator or continuous batching (the "
                      "tools' decoder; with no stop token every slot stays busy)")
  # OMP_WAIT_POLICY is reported in the JSON line with the thread count.
  return p.parse_args(argv)


def make_model(shape: str, directory: str):
  """A random transformers Qwen2 model saved to `directory`, in eval mode."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(**SHAPES[shape], max_position_embeddings=4096,
                                 tie_word_embeddings=True)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  with torch.no_grad():  # spread-out weights, so greedy decoding does not loop on one token
    for name, param in model.named_parameters():
      if not name.endswith("norm.weight"):
        param.normal_(0.0, 0.05)
  model.save_pretrained(directory)
  return model


def bench_transformers(model, prompts: list[list[int]], new_tokens: int, repeats: int):
  import torch
  T = max(map(len, prompts))
  ids = np.zeros((len(prompts), T), np.int64)
  mask = np.zeros_like(ids)
  for r, p in enumerate(prompts):  # left padding, as transformers expects for decoder-only
    ids[r, T - len(p):], mask[r, T - len(p):] = p, 1
  ids, mask = torch.tensor(ids), torch.tensor(mask)
  kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0)
  with torch.inference_mode():
    model.generate(ids, attention_mask=mask, **{**kwargs, "max_new_tokens": 4,
                                                "min_new_tokens": 4})  # warm-up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      out = model.generate(ids, attention_mask=mask, **kwargs)
      times.append(time.perf_counter() - start)
  return min(times), out[:, T:].numpy()


def bench_ease(directory: str, prompts: list[list[int]], new_tokens: int, repeats: int):
  from ease_jax.generation import generate as G
  from ease_jax.hf import load_pretrained
  model, cfg = load_pretrained(directory)
  gen = G.Generator(model, cfg, None, stop_ids=[], batch_size=len(prompts))
  sampling = G.SamplingConfig(max_new_tokens=new_tokens)
  start = time.perf_counter()
  gen.generate(prompts, sampling)
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    outs = gen.generate(prompts, sampling)
    times.append(time.perf_counter() - start)
  return min(times), first - min(times), np.array([g.ids for g in outs]), gen.num_compilations


def pick_mix(directory: str, vocab: int, args: argparse.Namespace):
  """A recipe-like length mix: `--mix-rows` prompts, 80% stopping within `--mix-short`
  tokens, 20% running to `--mix-long`; stop ids taken from greedy outputs of the model
  (computed once with ease-jax), so both generators stop at the same places."""
  from ease_jax.generation import generate as G
  from ease_jax.generation.continuous import ContinuousGenerator
  from ease_jax.hf import load_pretrained
  rng = np.random.default_rng(1)
  n_long = max(1, round(args.mix_rows * 0.2))
  n_short = args.mix_rows - n_long
  pool = [rng.integers(1, vocab, rng.integers(args.prompt_len[0], args.prompt_len[1] + 1)).tolist()
          for _ in range(args.mix_rows * 4)]
  model, cfg = load_pretrained(directory)
  gen = ContinuousGenerator(model, cfg, None, stop_ids=[], batch_size=args.batch)
  free = [g.ids for g in gen.generate(pool, G.SamplingConfig(max_new_tokens=args.mix_long))]
  stops, shorts = set(), []
  for i, ids in enumerate(free):
    t = int(rng.integers(2, args.mix_short))
    if len(shorts) < n_short and ids[t] not in ids[:t]:
      stops.add(ids[t])
      shorts.append(i)
  longs = [i for i, ids in enumerate(free) if i not in shorts and not stops & set(ids)][:n_long]
  if len(shorts) < n_short or len(longs) < n_long:
    raise SystemExit(f"could not build the length mix ({len(shorts)} short, {len(longs)} long "
                     f"rows); try a larger vocabulary or fewer rows")
  order = rng.permutation(shorts + longs)
  return [pool[i] for i in order], sorted(stops)


def bench_mix_transformers(model, prompts, stops, args) -> tuple[float, list[list[int]]]:
  """transformers `generate` over the mix in batches of --batch rows (input order)."""
  import torch
  kwargs = dict(max_new_tokens=args.mix_long, do_sample=False, eos_token_id=stops,
                pad_token_id=0)
  best, outs = float("inf"), []
  for _ in range(args.repeats):
    start, outs = time.perf_counter(), []
    for lo in range(0, len(prompts), args.batch):
      part = prompts[lo:lo + args.batch]
      T = max(map(len, part))
      ids, mask = np.zeros((len(part), T), np.int64), np.zeros((len(part), T), np.int64)
      for r, p in enumerate(part):
        ids[r, T - len(p):], mask[r, T - len(p):] = p, 1
      with torch.inference_mode():
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
      for row in out[:, T:].tolist():  # up to and including the first stop id
        end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
        outs.append(row[:end])
    best = min(best, time.perf_counter() - start)
  return best, outs


def bench_mix_ease(directory, prompts, stops, args, continuous: bool):
  from ease_jax.generation import generate as G
  from ease_jax.generation.continuous import ContinuousGenerator
  from ease_jax.hf import load_pretrained
  model, cfg = load_pretrained(directory)
  cls = ContinuousGenerator if continuous else G.Generator
  gen = cls(model, cfg, None, stop_ids=stops, batch_size=args.batch)
  sampling = G.SamplingConfig(max_new_tokens=args.mix_long)
  gen.generate(prompts, sampling)  # compiles
  best = float("inf")
  for _ in range(args.repeats):
    start = time.perf_counter()
    outs = gen.generate(prompts, sampling)
    best = min(best, time.perf_counter() - start)
  return best, [g.ids + ([g.stop_id] if g.stopped else []) for g in outs]


def run_mix(shape: str, args: argparse.Namespace) -> dict:
  """The length mix on one random model: transformers, ease-jax fixed batches, continuous."""
  with tempfile.TemporaryDirectory() as d:
    hf_model = make_model(shape, d)
    prompts, stops = pick_mix(d, SHAPES[shape]["vocab_size"], args)
    hf_s, hf_out = bench_mix_transformers(hf_model, prompts, stops, args)
    fixed_s, fixed_out = bench_mix_ease(d, prompts, stops, args, continuous=False)
    cont_s, cont_out = bench_mix_ease(d, prompts, stops, args, continuous=True)
  tokens = sum(map(len, cont_out))
  lengths = sorted(map(len, cont_out))
  return {"shape": shape, "rows": len(prompts), "stop_ids": len(stops), "new_tokens": tokens,
          "new_tokens_median": lengths[len(lengths) // 2], "new_tokens_max": lengths[-1],
          "transformers_tok_s": round(tokens / hf_s, 1),
          "ease_jax_fixed_tok_s": round(tokens / fixed_s, 1),
          "ease_jax_continuous_tok_s": round(tokens / cont_s, 1),
          "ratio_fixed": round(hf_s / fixed_s, 2), "ratio_continuous": round(hf_s / cont_s, 2),
          "same_tokens_transformers": float(np.mean([a == b for a, b in zip(hf_out, cont_out)])),
          "same_tokens_fixed": float(np.mean([a == b for a, b in zip(fixed_out, cont_out)]))}


def run_shape(shape: str, args: argparse.Namespace) -> dict:
  """Both generators on one random model of `shape`; returns the figures."""
  import torch
  rng = np.random.default_rng(0)
  V = SHAPES[shape]["vocab_size"]
  prompts = [rng.integers(1, V, rng.integers(args.prompt_len[0], args.prompt_len[1] + 1)).tolist()
             for _ in range(args.batch)]
  with tempfile.TemporaryDirectory() as d:
    hf_model = make_model(shape, d)
    params = sum(p.numel() for p in hf_model.parameters())
    hf_s, hf_out = bench_transformers(hf_model, prompts, args.new_tokens, args.repeats)
    jx_s, compile_s, jx_out, compiles = bench_ease(d, prompts, args.new_tokens, args.repeats)
  tokens = args.batch * args.new_tokens
  return {"shape": shape, "params": params, "prompt_lengths": [len(p) for p in prompts],
          "transformers_s": round(hf_s, 4), "ease_jax_s": round(jx_s, 4),
          "transformers_tok_s": round(tokens / hf_s, 1), "ease_jax_tok_s": round(tokens / jx_s, 1),
          "ratio": round(hf_s / jx_s, 2), "ease_jax_compile_s": round(compile_s, 2),
          "ease_jax_compilations": compiles, "torch_threads": torch.get_num_threads(),
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
          "greedy_rows_identical": float(np.mean([np.array_equal(a, b)
                                                  for a, b in zip(hf_out, jx_out)]))}


def _timed_generate(gen, prompts, sampling, repeats: int) -> float:
  gen.generate(prompts, sampling)  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    gen.generate(prompts, sampling)
    times.append(time.perf_counter() - start)
  return min(times)


def roofline(args: argparse.Namespace) -> dict:
  """Prefill MFU and decode roofline fraction of ease-jax on a random `--roofline` preset."""
  import jax
  from flax import nnx

  from ease_jax.generation import generate as G
  from ease_jax.train import metrics
  from ease_jax.generation.continuous import ContinuousGenerator
  from ease_jax.models import Decoder, get_preset
  cfg = get_preset(args.roofline).replace(param_dtype=args.dtype, compute_dtype=args.dtype)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  T = args.prompt_len[1]
  prompts = [rng.integers(1, cfg.vocab_size, rng.integers(args.prompt_len[0], T + 1)).tolist()
             for _ in range(args.batch)]
  cls = ContinuousGenerator if args.decoder == "continuous" else G.Generator
  gen = cls(model, cfg, None, stop_ids=[], batch_size=args.batch, buckets=(T,))
  M = args.new_tokens
  prefill_s = _timed_generate(gen, prompts, G.SamplingConfig(max_new_tokens=1), args.repeats)
  total_s = _timed_generate(gen, prompts, G.SamplingConfig(max_new_tokens=M), args.repeats)
  step_s = (total_s - prefill_s) / (M - 1)
  kind = jax.devices()[0].device_kind
  width = 2 if args.dtype == "bfloat16" else np.dtype(args.dtype).itemsize
  lengths = np.array([len(p) for p in prompts])
  kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * width
  kv_bytes = float(np.mean([(lengths + t).sum() for t in range(1, M)])) * kv_per_token
  step_bytes = cfg.num_params() * width + kv_bytes
  bandwidth = next((b for k, b in HBM_BYTES_PER_S if k in kind.lower()), None)
  prompt_tokens = int(lengths.sum())
  prefill_flops = sum(cfg.flops_per_token(n) / 3 * n for n in lengths)
  peak = metrics.peak_flops_per_device(kind)
  result = {"bench": "generate_roofline", "preset": args.roofline, "dtype": args.dtype,
            "decoder": args.decoder,
            "device": kind, "devices": jax.device_count(), "batch": args.batch,
            "prompt_tokens": prompt_tokens, "new_tokens": M, "prefill_s": round(prefill_s, 5),
            "prefill_tok_s": round(prompt_tokens / prefill_s, 1),
            "prefill_mfu": None if peak is None else round(prefill_flops / prefill_s / peak, 4),
            "decode_step_s": round(step_s, 6), "decode_tok_s": round(args.batch / step_s, 1),
            "decode_bytes_per_step": step_bytes, "hbm_bytes_per_s": bandwidth,
            "decode_roofline_fraction": None if bandwidth is None else round(
                step_bytes / step_s / bandwidth, 4)}
  print(f"{args.roofline} ({cfg.num_params() / 1e9:.2f}B, {args.dtype}, {args.decoder}) on "
        f"{kind}: prefill "
        f"{result['prefill_tok_s']} tok/s, MFU {result['prefill_mfu']}; decode batch "
        f"{args.batch} {result['decode_tok_s']} tok/s, {step_s * 1e3:.2f} ms/step, "
        f"{step_bytes / 1e9:.2f} GB/step, roofline fraction {result['decode_roofline_fraction']}")
  print(json.dumps(result))
  return result


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.roofline:
    return roofline(args)
  import torch
  if args.threads:
    torch.set_num_threads(args.threads)
  rows = [run_shape(shape, args) for shape in args.shapes]
  print(f"generation: random Qwen2, batch {args.batch}, {args.new_tokens} new tokens, greedy, "
        f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); best of "
        f"{args.repeats}")
  print(f"{'shape':8}{'params':>9}{'transformers tok/s':>20}{'ease-jax tok/s':>16}{'ratio':>8}"
        f"{'compile s':>11}{'same tokens':>13}")
  for r in rows:
    print(f"{r['shape']:8}{r['params'] / 1e6:8.1f}M{r['transformers_tok_s']:20.1f}"
          f"{r['ease_jax_tok_s']:16.1f}{r['ratio']:7.2f}x{r['ease_jax_compile_s']:11.1f}"
          f"{r['greedy_rows_identical']:13.0%}")
  mix = [run_mix(shape, args) for shape in args.mix_shapes]
  if mix:
    print(f"length mix: {args.mix_rows} rows, 80% stop before {args.mix_short} tokens, 20% run "
          f"to {args.mix_long}; {args.batch} rows per batch / slots; greedy")
    print(f"{'shape':8}{'tokens':>8}{'transformers':>14}{'fixed':>10}{'continuous':>12}"
          f"{'ratio fixed':>13}{'ratio cont.':>13}{'same tokens':>13}")
    for r in mix:
      print(f"{r['shape']:8}{r['new_tokens']:8d}{r['transformers_tok_s']:14.1f}"
            f"{r['ease_jax_fixed_tok_s']:10.1f}{r['ease_jax_continuous_tok_s']:12.1f}"
            f"{r['ratio_fixed']:12.2f}x{r['ratio_continuous']:12.2f}x"
            f"{r['same_tokens_transformers']:13.0%}")
  result = {"bench": "generate", "batch": args.batch, "new_tokens": args.new_tokens,
            "cpu_count": os.cpu_count(), "goal_ratio": 2.0, "results": rows,
            "min_ratio": min(r["ratio"] for r in rows) if rows else None,
            "mix_goal_ratio": 3.0, "mix": mix}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()

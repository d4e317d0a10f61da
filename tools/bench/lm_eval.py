#!/usr/bin/env python
"""lm-eval throughput: the `ease_jax` backend versus lm-eval's own `hf` backend, side by side.

  python tools/bench/lm_eval.py [--shape tiny|small] [--mc-docs 64] [--gen-docs 16]
      [--max-gen-toks 32] [--batch 8] [--threads 0]

One random Qwen2 model exported by ease-jax (float32) over the bundled demo tokenizer, and
two local tasks written to a temporary directory: a 4-way multiple-choice task (log-likelihood
requests) and a greedy generate_until task with a stop string. Each backend runs both tasks
twice through `lm_eval.simple_evaluate` in this one process; the second run is timed (the
first includes ease-jax's compilations, reported separately). Prints a table and, as the last
line, one JSON object, with the largest log-likelihood difference and whether the generations
are identical as a check that both did the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as tools/bench/generate.py
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This script's directory goes last on the path: first, it would shadow the lm_eval package.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import numpy as np  # noqa: E402

from common import WORDS, machine  # noqa: E402

SHAPES = {  # the shapes of tools/bench/generate.py
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=2),
}
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
{body}metadata:
  version: 1.0
"""
MC_BODY = """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_BODY = """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
"""


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  p.add_argument("--mc-docs", type=int, default=64)
  p.add_argument("--gen-docs", type=int, default=16)
  p.add_argument("--max-gen-toks", type=int, default=32)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
  return p.parse_args(argv)


def _words(rng: np.random.Generator, lo: int, hi: int) -> str:
  return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))


def write_tasks(directory: str, args: argparse.Namespace) -> None:
  """The two benchmark tasks (YAML + jsonl) in `directory`."""
  rng = np.random.default_rng(0)
  mc = [{"question": _words(rng, 10, 60),
         "choices": [" " + _words(rng, 1, 12) for _ in range(4)], "answer": 0}
        for _ in range(args.mc_docs)]
  gen = [{"prompt": _words(rng, 10, 60), "target": " the"} for _ in range(args.gen_docs)]
  for name, docs, body in (("bench_mc", mc, MC_BODY),
                           ("bench_gen", gen, GEN_BODY.replace("{max_gen_toks}",
                                                               str(args.max_gen_toks)))):
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as f:
      f.write(TASK.format(name=name, path=path, body=body))


def export_model(shape: str, directory: str) -> tuple[str, int]:
  """A random Qwen2 of `shape` over the demo tokenizer, exported by ease-jax; (dir, params)."""
  import torch
  import transformers

  from ease_jax import export
  from ease_jax.hf import load_pretrained
  from ease_jax.tokenizer import load_tokenizer
  tok = load_tokenizer()
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      **SHAPES[shape], vocab_size=len(tok), max_position_embeddings=2048,
      tie_word_embeddings=True)).eval()
  with torch.no_grad():  # spread-out weights, so greedy decoding does not loop on one token
    for name, param in model.named_parameters():
      if not name.endswith("norm.weight"):
        param.normal_(0.0, 0.05)
  model.save_pretrained(os.path.join(directory, "src"))
  ours, cfg = load_pretrained(os.path.join(directory, "src"))
  out = export.save_pretrained(ours, cfg, os.path.join(directory, "model"), tokenizer=tok,
                               dtype="float32")
  return str(out), cfg.num_params()


def run_backend(name: str, model_args: dict, include: str) -> tuple[dict, float, float]:
  """(results of the timed run, first run's seconds, second run's seconds)."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  times, results = [], None
  for _ in range(2):
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=name, model_args=model_args,
                                      tasks=["bench_mc", "bench_gen"],
                                      task_manager=TaskManager(include_path=include),
                                      log_samples=True, bootstrap_iters=0)
    times.append(time.perf_counter() - start)
  return results, times[0], times[1]


def _resps(results: dict, task: str) -> list:
  return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def main(argv=None) -> dict:
  args = parse_args(argv)
  import torch

  import ease_jax.lm_eval  # noqa: F401  (registers the backend)
  if args.threads:
    torch.set_num_threads(args.threads)
  with tempfile.TemporaryDirectory() as d:
    model_dir, params = export_model(args.shape, d)
    write_tasks(d, args)
    hf, hf_first, hf_s = run_backend("hf", {"pretrained": model_dir, "dtype": "float32",
                                            "device": "cpu", "batch_size": args.batch}, d)
    ej, ej_first, ej_s = run_backend("ease_jax", {"pretrained": model_dir,
                                                  "batch_size": args.batch}, d)
  lls = [(a[0][0], b[0][0]) for da, db in zip(_resps(hf, "bench_mc"), _resps(ej, "bench_mc"))
         for a, b in zip(da, db)]
  rel = max(abs(b - a) / max(1.0, abs(a)) for a, b in lls)
  same_gen = _resps(hf, "bench_gen") == _resps(ej, "bench_gen")
  requests = args.mc_docs * 4 + args.gen_docs
  row = {"shape": args.shape, "params": params, "mc_requests": args.mc_docs * 4,
         "gen_requests": args.gen_docs, "max_gen_toks": args.max_gen_toks, "batch": args.batch,
         "hf_s": round(hf_s, 2), "ease_jax_s": round(ej_s, 2),
         "hf_req_s": round(requests / hf_s, 1), "ease_jax_req_s": round(requests / ej_s, 1),
         "ratio": round(hf_s / ej_s, 2), "hf_first_s": round(hf_first, 2),
         "ease_jax_first_s": round(ej_first, 2), "max_rel_loglik_diff": float(f"{rel:.2e}"),
         "generations_identical": same_gen, "torch_threads": torch.get_num_threads()}
  print(f"lm-eval, random Qwen2 {args.shape} ({params / 1e6:.1f}M), {row['mc_requests']} "
        f"log-likelihood + {args.gen_docs} generate_until requests ({args.max_gen_toks} tokens), "
        f"batch {args.batch}; second of two runs")
  print(f"{'backend':10}{'seconds':>9}{'requests/s':>12}{'first run s':>13}")
  print(f"{'hf':10}{hf_s:9.2f}{row['hf_req_s']:12.1f}{hf_first:13.2f}")
  print(f"{'ease_jax':10}{ej_s:9.2f}{row['ease_jax_req_s']:12.1f}{ej_first:13.2f}")
  print(f"ratio hf/ease_jax {row['ratio']:.2f}x; max relative log-likelihood difference "
        f"{rel:.1e}; generations identical: {same_gen}")
  result = {"bench": "lm_eval", **row, "machine": machine()}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()

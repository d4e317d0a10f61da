#!/usr/bin/env python
"""lm-eval throughput: the `ease_jax` backend versus lm-eval's own `hf` backend, side by side.

  python tools/bench/lm_eval.py [--shape tiny|small] [--mc-docs 64] [--gen-docs 16]
      [--max-gen-toks 32] [--batch 8] [--threads 0]

One random Qwen2 model exported by ease-jax (float32) over the bundled demo tokenizer, and
two local tasks written to a temporary directory: a 4-way multiple-choice task (log-likelihood
requests) and a greedy generate_until task with a stop string. Each backend is built once and
runs both tasks twice through `lm_eval.simple_evaluate` in this one process. Reported: the
wall time of each whole run (the first includes ease-jax's compilations; both include
lm-eval's own task loading) and, for the second run, the time spent inside the backend's
`loglikelihood` and `generate_until`. Prints a table and, as the last line, one JSON object,
with the largest log-likelihood difference and whether the generations are identical, as a
check that both backends did the same work.
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

from common import WORDS, load_average, machine  # noqa: E402

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

  from ease_jax.hf import save as export
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


class Timed:
  """Wraps an lm-eval LM: the wall time spent inside its request methods, per method."""

  METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")

  def __init__(self, lm):
    self.seconds = dict.fromkeys(self.METHODS, 0.0)
    for name in self.METHODS:
      setattr(lm, name, self._timed(name, getattr(lm, name)))
    self.lm = lm

  def _timed(self, name, fn):
    def run(*args, **kwargs):
      start = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        self.seconds[name] += time.perf_counter() - start
    return run


def run_backend(name: str, model_args: dict, include: str) -> dict:
  """Builds the backend once, runs both tasks twice; the figures of both runs."""
  import lm_eval
  from lm_eval.api.registry import get_model
  from lm_eval.tasks import TaskManager
  start = time.perf_counter()
  timed = Timed(get_model(name)(**model_args))
  out = {"load_s": time.perf_counter() - start, "runs": []}
  for _ in range(2):
    timed.seconds = dict.fromkeys(Timed.METHODS, 0.0)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=timed.lm, tasks=["bench_mc", "bench_gen"],
                                      task_manager=TaskManager(include_path=include),
                                      log_samples=True, bootstrap_iters=0)
    out["runs"].append({"total_s": time.perf_counter() - start,
                        "loglikelihood_s": timed.seconds["loglikelihood"],
                        "generate_until_s": timed.seconds["generate_until"]})
    out["results"] = results
  return out


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
    runs = {"hf": run_backend("hf", {"pretrained": model_dir, "dtype": "float32",
                                     "device": "cpu", "batch_size": args.batch}, d),
            "ease_jax": run_backend("ease_jax", {"pretrained": model_dir,
                                                 "batch_size": args.batch}, d)}
  hf, ej = runs["hf"]["results"], runs["ease_jax"]["results"]
  lls = [(a[0][0], b[0][0]) for da, db in zip(_resps(hf, "bench_mc"), _resps(ej, "bench_mc"))
         for a, b in zip(da, db)]
  rel = max(abs(b - a) / max(1.0, abs(a)) for a, b in lls)
  same_gen = _resps(hf, "bench_gen") == _resps(ej, "bench_gen")
  mc_requests = args.mc_docs * 4
  table = {}
  for name, r in runs.items():
    first, second = r["runs"]
    table[name] = {"load_s": round(r["load_s"], 2), "first_total_s": round(first["total_s"], 2),
                   "total_s": round(second["total_s"], 2),
                   "loglikelihood_s": round(second["loglikelihood_s"], 3),
                   "generate_until_s": round(second["generate_until_s"], 3),
                   "loglikelihood_req_s": round(mc_requests / second["loglikelihood_s"], 1)}
  print(f"lm-eval, random Qwen2 {args.shape} ({params / 1e6:.1f}M), {mc_requests} "
        f"log-likelihood + {args.gen_docs} generate_until requests (up to {args.max_gen_toks} "
        f"tokens), batch {args.batch}; times of the second run on the same backend object")
  print(f"{'backend':10}{'load s':>8}{'1st run s':>11}{'2nd run s':>11}{'loglik s':>10}"
        f"{'loglik req/s':>14}{'generate s':>12}")
  for name, t in table.items():
    print(f"{name:10}{t['load_s']:8.2f}{t['first_total_s']:11.2f}{t['total_s']:11.2f}"
          f"{t['loglikelihood_s']:10.3f}{t['loglikelihood_req_s']:14.1f}{t['generate_until_s']:12.3f}")
  print(f"max relative log-likelihood difference {rel:.1e}; generations identical: {same_gen}")
  result = {"bench": "lm_eval", "shape": args.shape, "params": params,
            "mc_requests": mc_requests, "gen_requests": args.gen_docs,
            "max_gen_toks": args.max_gen_toks, "batch": args.batch, **table,
            "loglikelihood_ratio": round(table["hf"]["loglikelihood_s"]
                                         / table["ease_jax"]["loglikelihood_s"], 2),
            "generate_ratio": round(table["hf"]["generate_until_s"]
                                    / table["ease_jax"]["generate_until_s"], 2),
            "max_rel_loglik_diff": float(f"{rel:.2e}"), "generations_identical": same_gen,
            "torch_threads": torch.get_num_threads(), "load_average": load_average(),
            "machine": machine()}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()

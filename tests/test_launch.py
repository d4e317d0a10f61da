"""launch/train.py (errors, distributed flags, two processes) and launch/tpu_vm.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ease_jax.config import load_config
from ease_jax.data.pipeline import Pipeline
from ease_jax.train import loop
from xla_env import xla_flags

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "launch/train.py", "--config", "configs/demo.yaml"]  # one training run
# Steps 1-2 run as one call (train.steps_per_call=2: batches stacked across processes), 3 alone.
MULTI = ["train.batch_size=4", "train.seq_len=128", "train.steps=3", "train.log_every=1",
         "train.steps_per_call=2", "checkpoint.every=100", "data.max_dropped_fraction=1",
         "data.eval=[{name: eval, adapter: prompt_response, path: data/demo/eval.jsonl, max_rows: 9}]",
         # Generation at the end, rows split over both processes' devices.
         "behavior.file=data/demo/eval.jsonl", "behavior.max_new_tokens=4", "behavior.batch_size=8"]


def run(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(), **(env or {}))
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_bad_override_exits_2_with_one_line_error(tmp_path):
  """The real process: exit 2, one `error:` line, no traceback (the other config errors run
  through the same main in-process: tests/test_reliability.py)."""
  proc = run([*TRAIN, "model.attention=cudnn", f"run_dir={tmp_path}"])
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert "model.attention=cudnn needs NVIDIA GPUs" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_incomplete_distributed_flags_are_a_user_error(tmp_path):
  proc = run([*TRAIN, "--num_processes", "2", f"run_dir={tmp_path}"])
  assert proc.returncode == 2 and "--coordinator" in proc.stderr, proc.stderr[-2000:]


def test_default_config_is_the_demo():
  cfg = load_config(REPO / "configs" / "demo.yaml")
  assert cfg.model.init_from == "scratch:tiny" and cfg.data.train and cfg.data.eval


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-1.5b", "llama3.2-1b"])
def test_real_model_configs_have_the_reference_recipe(name):
  p1 = load_config(REPO / "configs" / f"{name}_phase1.yaml")
  p2 = load_config(REPO / "configs" / f"{name}_phase2.yaml")
  for cfg in (p1, p2):
    t = cfg.train
    assert (t.lr, t.epochs, t.warmup_ratio, t.weight_decay, t.clip_norm, t.seed) == (
        1e-5, 2, 0.03, 0.01, 1.0, 42)
    # The reference's loss (plain token mean) and about its 32 examples per step in tokens
    # (packed rows: 8 x 4,096 tokens; docs/recipe.md).
    assert (cfg.loss.normalize, t.batch_size, t.seq_len) == ("token", 8, 4096)
    assert cfg.model.compute_dtype == "bfloat16" and cfg.model.init_from.split(":")[0] in ("hf", "ckpt")
    path = REPO / "configs" / f"{name}_phase{1 if cfg is p1 else 2}.yaml"
    header = [l for l in path.read_text().splitlines() if l.startswith("#")]
    assert any(f"python launch/train.py --config configs/{path.name}" in l for l in header)
  assert p2.model.init_from == f"ckpt:{p1.run_dir}"
  assert sorted(s.target_type for s in p2.data.train) == ["direct", "reasoning", "refusal"]


class _BothShards:
  """What two processes feed together, from one process: shard 0's rows, then shard 1's."""

  def __init__(self, cfg, tokenizer, split, batch):
    self.parts = [Pipeline(cfg.data, tokenizer, seq_len=cfg.train.seq_len, batch_size=batch // 2,
                           seed=cfg.train.seed, split=split, shard_index=i, shard_count=2)
                  for i in range(2)]

  def __iter__(self):
    return _Zip([iter(p) for p in self.parts])

  def __getattr__(self, name):  # records, sources, render, ...: each part holds every record
    return getattr(self.parts[0], name)


class _Zip:
  def __init__(self, its):
    self.its = its

  def __next__(self):
    batches = [next(it) for it in self.its]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return [it.get_state() for it in self.its]

  def close(self):
    for it in self.its:
      it.close()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, monkeypatch, free_port):
  procs = [subprocess.Popen(
      [*TRAIN, "--coordinator", f"127.0.0.1:{free_port}", "--num_processes", "2", "--process_id",
       str(i), f"run_dir={tmp_path / 'multi'}", *MULTI], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
      for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
  assert "2 process(es)" in outs[0]
  assert sorted(os.listdir(tmp_path / "multi" / "checkpoints" / "3" / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

  # One process over the same global batches: the union of both processes' data shards.
  monkeypatch.chdir(REPO)
  original = loop.make_pipeline
  monkeypatch.setattr(loop, "make_pipeline", lambda cfg, tok, split, batch: (
      _BothShards(cfg, tok, split, batch) if split == "train" else original(cfg, tok, split, batch)))
  loop.train(load_config(REPO / "configs" / "demo.yaml", [f"run_dir={tmp_path / 'one'}", *MULTI]))

  multi, one = ([json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("multi", "one"))
  assert [m["step"] for m in multi] == [m["step"] for m in one] == [1, 2, 3]
  for key in ("loss/total", "loss/reasoning", "loss/direct", "grad_norm", "param_norm"):
    # loss/<objective> is absent on a step whose batch holds none of it: absent in both.
    assert [key in m for m in multi] == [key in m for m in one], key
    np.testing.assert_allclose([m.get(key, 0) for m in multi], [m.get(key, 0) for m in one],
                               rtol=2e-5, err_msg=key)
  # Eval sums over the same records however they are split and packed.
  np.testing.assert_allclose(multi[-1]["eval/loss/total"], one[-1]["eval/loss/total"], rtol=2e-5)
  # The same generations on one process as on two (whose report process 0 writes).
  # (wall-clock seconds per prompt differ from run to run: everything else must be equal)
  behavior = {k: v for k, v in one[-1].items()
              if k.startswith("behavior/") and not k.endswith("seconds_per_prompt")}
  assert "behavior/overall/mean_new_tokens" in behavior
  assert {k: multi[-1].get(k) for k in behavior} == pytest.approx(behavior)
  multi_report, one_report = (json.loads((tmp_path / d / "behavior" / "3" / "report.json").read_text())
                              for d in ("multi", "one"))
  untimed = lambda classes: {c: {k: v for k, v in s.items() if k != "seconds_per_prompt"}
                             for c, s in classes.items()}
  assert untimed(multi_report["classes"]) == untimed(one_report["classes"])


@pytest.mark.slow
def test_tpu_vm_script_runs_the_command_on_all_workers(tmp_path):
  fake = tmp_path / "gcloud"
  fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\n")
  fake.chmod(0o755)
  env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "EASE_REPO": "https://example.com/e.git"}
  proc = run(["bash", "launch/tpu_vm.sh", "my-tpu", "us-central2-b", "--setup", "--",
              "--config", "configs/qwen2.5-0.5b_phase1.yaml", "train.steps=5"], env=env)
  assert proc.returncode == 0, proc.stderr
  args = (tmp_path / "args").read_text()
  assert "compute tpus tpu-vm ssh my-tpu --zone us-central2-b --worker=all" in args
  assert "git clone -q https://example.com/e.git" in args and "pip install" in args
  assert "python3 launch/train.py --config configs/qwen2.5-0.5b_phase1.yaml train.steps=5" in args
  assert run(["bash", "launch/tpu_vm.sh"]).returncode == 2

"""The benchmark scripts at their smallest sizes (no timing assertions), and their helpers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "tools" / "bench"
_PATH = list(sys.path)
sys.path.insert(0, str(BENCH))  # the scripts are not a package

import accelerator  # noqa: E402
import common  # noqa: E402
import train_vs_reference as tvr  # noqa: E402

pytestmark = pytest.mark.bench  # the benchmark scripts' smoke tests: runs with --full

sys.path[:] = _PATH  # so tools/bench/data.py cannot shadow anything for the other tests


def _run(script: str, *args: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
  proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                        text=True, timeout=600, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ease_mix_lengths_and_kinds():
  rows = common.ease_mix(300, seed=1)
  kinds = [r["target_type"] for r in rows]
  assert set(kinds) == set(common.KINDS)
  assert all(("reasoning" in r) == (r["target_type"] == "reasoning") for r in rows)
  think = [len(r["reasoning"].split()) for r in rows if "reasoning" in r]
  direct = [len(r["response"].split()) for r in rows if r["target_type"] == "refusal"]
  assert np.mean(think) > 3 * np.mean(direct)  # long reasoning, short direct answers
  short = common.ease_mix(300, seed=1, scale=0.1)
  assert np.mean([len(r["prompt"]) for r in short]) < np.mean([len(r["prompt"]) for r in rows])


def test_padded_batches_match_reference_labels():
  ex = [tvr.Example(np.arange(3, 13, dtype=np.int32), 6), tvr.Example(np.arange(20, 25), 2)]
  (b,) = tvr.padded_batches(ex, batch_size=2, max_len=16)
  t, e = b["torch"], b["ease"]
  assert (t["attention_mask"].sum(1) == [10, 5]).all()
  # HF shifts labels inside the model: position t is trained on labels[t + 1].
  shifted = t["labels"][:, 1:] != -100
  assert (e["loss_weight"][:, :-1] == shifted).all() and e["loss_weight"][:, -1].sum() == 0
  assert (e["targets"][:, :-1][shifted] == t["labels"][:, 1:][shifted]).all()
  assert b["supervised"] == sum(x.supervised for x in ex) == 10 - 6 + 5 - 2


def test_packed_batch_layout():
  b = accelerator.packed_batch(3, 512, vocab=100)
  seg, pos = b["segment_ids"], b["positions"]
  assert (seg > 0).all() and b["tokens"].max() < 100
  starts = np.diff(seg, axis=1, prepend=0) != 0
  assert (pos[starts] == 0).all() and (np.diff(pos, axis=1)[~starts[:, 1:]] == 1).all()
  assert 0 < b["loss_weight"].mean() < 1


class _FakeStep:
  """Records the order of calls into one shared log; `step` waits, `dispatch` does not."""

  def __init__(self, name: str, log: list, steps_per_call: int = 1):
    self.name, self.log, self.steps_per_call = name, log, steps_per_call

  def __call__(self, batch):  # the torch step
    self.log.append((self.name, batch))

  def step(self, batch):
    self.log.append((self.name, batch))

  def dispatch(self, batch):
    self.log.append((self.name + " dispatch", batch))
    log = self.log

    class _Loss:
      def __float__(self):
        log.append(("wait", batch))
        return 0.0
    return {"loss/total": _Loss()}


class _Pipeline:
  def __init__(self, items: list, log: list):
    self.items, self.log = items, log

  def __iter__(self):
    for x in self.items:
      self.log.append(("fetch", x))
      yield x


def test_packed_run_fetches_the_next_batch_while_its_step_runs():
  """(b) as the training loop runs: dispatch call k, fetch call k+1's batches, then wait for
  call k; no call of (b) is still running when (a) or (c) starts, and every batch is used
  once. With 2 steps per call, 3 batches run as a call of 2 and a single step."""
  log: list = []
  padded = [{"torch": f"t{i}", "ease": f"e{i}"} for i in range(4)]
  tvr.interleaved_epoch(padded, _FakeStep("a", log), _FakeStep("c", log), _FakeStep("b", log),
                        _Pipeline(["p0", "p1"], log), n_packed=2)
  assert log == [("fetch", "p0"),
                 ("a", "t0"), ("c", "e0"),
                 ("b dispatch", ["p0"]), ("fetch", "p1"), ("wait", ["p0"]),
                 ("a", "t1"), ("c", "e1"), ("a", "t2"), ("c", "e2"),
                 ("b dispatch", ["p1"]), ("wait", ["p1"]),
                 ("a", "t3"), ("c", "e3")]
  log.clear()
  r = tvr.interleaved_epoch(padded, _FakeStep("a", log), _FakeStep("c", log),
                            _FakeStep("b", log, steps_per_call=2),
                            _Pipeline(["p0", "p1", "p2"], log), n_packed=3)
  assert log == [("fetch", "p0"), ("fetch", "p1"),
                 ("a", "t0"), ("c", "e0"),
                 ("b dispatch", ["p0", "p1"]), ("fetch", "p2"), ("wait", ["p0", "p1"]),
                 ("a", "t1"), ("c", "e1"), ("a", "t2"), ("c", "e2"),
                 ("b dispatch", ["p2"]), ("wait", ["p2"]),
                 ("a", "t3"), ("c", "e3")]
  # (b)'s epoch in parts: its first fetch and each call (steps, seconds), summing to it.
  assert [n for n, _ in r["ease_packed_calls"]] == [2, 1]
  parts = r["ease_packed_first_fetch_s"] + sum(sec for _, sec in r["ease_packed_calls"])
  assert math.isclose(parts, r["ease_packed_s"], rel_tol=1e-9)
  rounds = [{"ease_packed_first_fetch_s": f, "ease_packed_calls": [[2, 0.2 * f], [1, 0.3 * f]]}
            for f in (1.0, 2.0, 3.0)]
  assert tvr.packed_detail(rounds) == pytest.approx(
      {"first_fetch_s": 2.0, "ms_per_step_in_multi_step_calls": 200.0, "ms_per_single_step": 600.0})
  with pytest.raises(RuntimeError, match="fewer batches"):
    tvr.interleaved_epoch(padded, _FakeStep("a", []), _FakeStep("c", []), _FakeStep("b", []),
                          _Pipeline(["p0"], []), n_packed=2)
  with pytest.raises(RuntimeError, match="more batches"):
    tvr.interleaved_epoch(padded, _FakeStep("a", []), _FakeStep("c", []), _FakeStep("b", []),
                          _Pipeline(["p0", "p1", "p2"], []), n_packed=2)


def test_is_oom():
  assert accelerator.is_oom("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
  assert not accelerator.is_oom(ValueError("shape mismatch"))


def test_trace_summary_counts_gpu_streams_by_kernel_class():
  """The --profile summary: kernels on the device's streams, classed by name; derived
  op lines of the same plane and host events are not counted twice."""
  meta = [("process_name", 1, None, "/device:GPU:0"), ("process_name", 2, None, "/host:CPU"),
          ("thread_name", 1, 7, "Stream #13(Compute)"), ("thread_name", 1, 8, "XLA Ops")]
  events = [{"ph": "M", "name": k, "pid": p, "tid": t, "args": {"name": n}} for k, p, t, n in meta]
  events += [{"ph": "X", "name": n, "pid": p, "tid": t, "dur": d} for n, p, t, d in [
      ("sm90_xmma_gemm_bf16bf16_bf16f32", 1, 7, 3000), ("cudnn_generated_fort_native_sdpa", 1, 7, 1000),
      ("loop_multiply_fusion", 1, 7, 500), ("dot.1", 1, 8, 3000), ("PjitFunction", 2, 1, 9000)]]
  out = accelerator.summarize_trace(events, steps=2)
  assert out["counted"] == "streams" and out["device_ms_per_step"] == 2.25
  assert out["ms_per_step_by_class"] == {"attention": 0.5, "fusion": 0.25, "matmul": 1.5}
  assert out["top_ms_per_step"][0] == ["sm90_xmma_gemm_bf16bf16_bf16f32", 1.5]
  assert accelerator.kernel_class("triton_gemm_dot_12") == "matmul"
  assert accelerator.kernel_class("memcpy") == "other"


def test_train_vs_reference_smoke():
  res = _run("train_vs_reference.py", "--smoke")
  assert res["bench"] == "train_vs_reference" and res["smoke"]
  # Same weights, same padded batch: the two frameworks compute the same first loss.
  loss = res["first_step_loss"]
  assert math.isclose(loss["reference"], loss["ease_padded"], rel_tol=1e-4), loss
  assert res["packed_supervised_tokens"] == res["supervised_tokens_per_epoch"]
  assert res["steps_per_epoch"]["ease_packed"] <= res["steps_per_epoch"]["reference"]
  assert all(v > 0 for v in res["epoch_s"].values())
  assert res["ratio_b_over_a"] > 0 and res["ratio_c_jax_over_torch"] > 0


def test_train_vs_reference_smoke_bfloat16():
  """The recipe's precision: bf16 torch weights under autocast, ease-jax bf16 compute."""
  res = _run("train_vs_reference.py", "--smoke", "--dtype", "bfloat16", "--warmup-rounds", "1")
  assert res["dtype"] == "bfloat16" and len(res["warmup_rounds"]) == 1
  loss = res["first_step_loss"]
  assert math.isclose(loss["reference"], loss["ease_padded"], rel_tol=2e-2), loss


def test_accelerator_smoke():
  res = _run("accelerator.py", "--smoke", "--remat", "on")
  (r,) = res["results"]
  assert "error" not in r, r
  assert r["remat"] and math.isfinite(r["loss"]) and r["step_s"] > 0
  assert r["mfu"] is None  # no peak FLOP/s is known for a CPU


def _fake_gpu(monkeypatch, outcomes):
  """accelerator.main against a fake NVIDIA GPU whose configurations end as `outcomes`."""
  device = {"platform": "gpu", "device_kind": "NVIDIA H200", "devices": 1, "jax": "x",
            "platform_version": "cuda 13000"}
  monkeypatch.setattr(accelerator, "probe", lambda: device)
  runs = iter(outcomes)
  monkeypatch.setattr(accelerator, "run_child", lambda spec, timeout: next(runs))


def test_accelerator_stops_after_two_failures_in_a_row(monkeypatch):
  """A breakage that is not out-of-memory would repeat: the run stops, the rest is skipped."""
  ok = {"step_s": 1.0, "tokens_per_s_per_device": 1.0, "mfu": 0.4, "batch_per_device": 4}
  _fake_gpu(monkeypatch, [ok, {"error": "out of memory", "oom": True}, {"error": "boom"},
                          {"error": "boom"}])
  out = accelerator.main([])
  assert len(out["results"]) == 4 and len(out["skipped"]) == 4  # 2 x 2 x 2 configurations
  assert [(r["attention"], r["model"]) for r in out["results"]][:2] == [
      ("cudnn", "qwen2.5-1.5b"), ("cudnn", "qwen2.5-1.5b")]


def test_accelerator_starts_nothing_without_min_config_time(monkeypatch):
  _fake_gpu(monkeypatch, [])
  out = accelerator.main(["--budget-s", "10", "--min-config-s", "60"])
  assert out["results"] == [] and len(out["skipped"]) == 8


def test_accelerator_refuses_cpu_without_smoke():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(BENCH / "accelerator.py")], capture_output=True,
                        text=True, timeout=120, env=env, cwd=REPO)
  assert proc.returncode == 2 and "--smoke" in proc.stderr


def test_data_smoke():
  res = _run("data.py", "--records", "200", "--seq-len", "512", "--batch-size", "4",
             "--batches", "2", "--step-ms", "5", "--steps", "40")
  (r,) = res["results"]
  assert r["tokens_per_s"] > 0 and 0 < r["packing_efficiency"] <= 1
  off, on = res["loop"]
  assert (off["prefetch_batches"], on["prefetch_batches"]) == (0, 32)
  assert all(x["wall_s"] >= x["ideal_s"] and x["device_idle_s"] >= 0 for x in res["loop"])


def test_generate_smoke():
  res = _run("generate.py", "--shapes", "tiny", "--batch", "2", "--new-tokens", "4",
             "--repeats", "1", "--mix-shapes", "small", "--mix-rows", "5", "--mix-long", "12",
             "--mix-short", "6")
  (r,) = res["results"]
  assert r["greedy_rows_identical"] == 1.0 and r["ratio"] > 0
  (m,) = res["mix"]
  assert m["same_tokens_transformers"] == m["same_tokens_fixed"] == 1.0
  assert m["new_tokens_max"] == 12 and m["ratio_continuous"] > 0


def test_memory_smoke():
  """tools/bench/memory.py at the tiny preset: pieces of the loss need less scratch memory."""
  res = _run("memory.py", "--model", "tiny", "--seq-len", "256", "--batch-size", "2",
             "--loss-chunk", "0", "64", "--dtype", "float32", "--remat", "off")
  whole, pieces = res["results"]
  assert (whole["loss_chunk"], pieces["loss_chunk"]) == (0, 64)
  assert pieces["temp_bytes"] < whole["temp_bytes"]
  assert pieces["argument_bytes"] == whole["argument_bytes"] > 0


@pytest.mark.parametrize("script", ["train_vs_reference.py", "accelerator.py", "data.py",
                                    "generate.py", "memory.py"])
def test_help_names_the_command(script):
  proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True,
                        text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 0 and f"tools/bench/{script}" in proc.stdout


@pytest.mark.parametrize("platform,version,want", [
    ("gpu", "cuda 13000", ["cudnn", "xla"]), ("tpu", "PJRT C API", ["splash", "xla"]),
    ("gpu", "rocm 60000", ["xla"])])
def test_accelerator_runs_each_attention_where_it_applies(platform, version, want):
  """cudnn only on NVIDIA GPUs, splash only on TPUs, in the default order (the device's own
  kernel first)."""
  device = {"platform": platform, "platform_version": version}
  specs = accelerator.configs(accelerator.parse_args([]), device)
  assert list(dict.fromkeys(s["attention"] for s in specs)) == want


def test_accelerator_refuses_attention_that_runs_nowhere_here(monkeypatch, capsys):
  _fake_gpu(monkeypatch, [])
  with pytest.raises(SystemExit) as exit_info:
    accelerator.main(["--attention", "splash"])
  assert exit_info.value.code == 2 and "splash TPUs" in capsys.readouterr().err

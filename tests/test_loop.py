"""The training loop: exact resume, metrics files, the NaN guard, epochs -> steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ease_jax.train import metrics
from ease_jax.init_from import load_run_tokenizer
from ease_jax.config import load_config
from ease_jax.train import loop

REPO = Path(__file__).resolve().parents[1]
# Small enough for seconds per run on CPU, large enough that all objectives appear.
# One step per call (the loop's default; demo.yaml sets 5): the reference the grouped runs meet.
TINY = ["train.batch_size=4", "train.seq_len=256", "train.steps=6", "train.log_every=1",
        "train.steps_per_call=1",
        "train.warmup_ratio=0.2", "checkpoint.every=100", "data.max_dropped_fraction=1",
        "data.eval=[{name: eval, adapter: prompt_response, path: data/demo/eval.jsonl, max_rows: 8}]"]
TIMING = ("tokens_per_sec", "tokens_per_sec_per_device", "mfu")
REQUIRED_TAGS = ("loss/total", "loss/reasoning", "loss/refusal", "loss/direct", "loss/gate",
                 "lr", "grad_norm", "param_norm", "tokens_per_sec", "tokens_per_sec_per_device",
                 "padding_fraction", "eval/loss/total")


def tiny_config(run_dir: Path, *extra: str):
  """The demo config shrunk for tests, and the overrides that make it."""
  overrides = [f"run_dir={run_dir}", *TINY, *extra]
  return load_config(REPO / "configs" / "demo.yaml", overrides), overrides


def read_jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def final_params(run_dir: Path, step: int) -> list[np.ndarray]:
  tree = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "params")
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, monkeypatch_module):
  """6 steps in one go (shared by the resume and metrics-file tests)."""
  run_dir = tmp_path_factory.mktemp("straight")
  cfg, _ = tiny_config(run_dir)
  result = loop.train(cfg)
  return run_dir, result


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(REPO)  # configs name data/demo/... relative to the repository
    yield mp


@pytest.mark.slow
def test_resume_in_a_new_process_equals_an_uninterrupted_run(straight_run, tmp_path):
  run_dir, result = straight_run
  assert result.step == 6
  cfg, overrides = tiny_config(tmp_path)
  stopped = loop.train(cfg, stop_at=3)  # as if preempted after step 3
  assert stopped.step == 3 and sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3]
  proc = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/demo.yaml",
                         *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming from step 3 of 6" in proc.stdout

  for a, b in zip(final_params(run_dir, 6), final_params(tmp_path, 6), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  straight, resumed = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(tmp_path / "metrics.jsonl")
  assert [m["step"] for m in resumed] == [m["step"] for m in straight] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(straight, resumed):
    a, b = ({k: v for k, v in m.items() if k not in TIMING} for m in (a, b))
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-5, err_msg=str(a))


def test_several_steps_per_call_equal_one_per_call(straight_run, tmp_path):
  """train.steps_per_call=2, stopped after step 3 and resumed: steps 1-2 and 4-5 run as one
  call each, 3 and 6 alone (a boundary or the end comes first). The same parameters and
  per-step metrics as the one-step-per-call run."""
  run_dir, _ = straight_run
  cfg, _ = tiny_config(tmp_path, "train.steps_per_call=2")
  calls = []
  several = loop._call_steps

  def counting(run, step, last):
    calls.append(several(run, step, last))
    return calls[-1]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, "_call_steps", counting)
    assert loop.train(cfg, stop_at=3).step == 3
    assert loop.train(cfg).step == 6
  assert calls == [2, 1, 2, 1]
  # atol: Adam's normalised update amplifies the float reordering between the two programs in
  # parameters whose gradients are near zero (1.3e-6 seen with the suite's compile flags).
  for a, b in zip(final_params(run_dir, 6), final_params(tmp_path, 6), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6)
  straight, grouped = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(tmp_path / "metrics.jsonl")
  assert [m["step"] for m in grouped] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(straight, grouped):
    a, b = ({k: v for k, v in m.items() if k not in TIMING} for m in (a, b))
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-5, err_msg=str(a))


def test_metrics_jsonl_tensorboard_and_config_are_written(straight_run):
  run_dir, _ = straight_run
  records = read_jsonl(run_dir / "metrics.jsonl")
  keys = set().union(*records)
  missing = [t for t in REQUIRED_TAGS if t not in keys]
  assert not missing, f"metrics.jsonl lacks {missing}; has {sorted(keys)}"
  assert "eval/loss/total" in records[-1] and 0 < records[-1]["lr"] <= 3e-3
  assert "mfu" not in keys  # CPU: no known peak, so no made-up MFU

  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
  acc.Reload()
  tags = acc.Tags()
  missing = [t for t in REQUIRED_TAGS if t not in tags["scalars"]]
  assert not missing, f"TensorBoard lacks {missing}"
  assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4, 5, 6]
  assert any("config" in t for t in tags["tensors"])  # the resolved config as text
  assert load_config(run_dir / "config.yaml") == load_config(
      REPO / "configs" / "demo.yaml", tiny_config(run_dir)[1])


def test_nonfinite_loss_stops_naming_step_and_checkpoint(monkeypatch_module, tmp_path):
  # A huge constant lr blows the parameters up at step 1 (finite, norm ~1e13); step 2's
  # loss is not finite.
  cfg, _ = tiny_config(tmp_path, "train.lr=1.0e+10", "train.warmup_ratio=0", "checkpoint.every=1",
                       "data.eval=[]",
                       "data.train=[{adapter: star, path: data/demo/implant.jsonl}]")
  with pytest.raises(loop.NonFiniteLossError) as err:
    loop.train(cfg)
  message = str(err.value)
  assert "loss became nan" in message and "at step 2" in message, message
  assert "newest checkpoint is step 1" in message and str(tmp_path / "checkpoints") in message
  # It says what resuming would do and what the user can do instead, not "last good".
  assert "param_norm 7.9" in message and "may already have been diverging" in message, message
  for fix in ("lower train.lr (now 1e+10)", f"model.init_from=ckpt:{tmp_path}@STEP", "--fresh"):
    assert fix in message, (fix, message)


def test_parameters_whose_norm_overflows_are_never_saved(monkeypatch_module, tmp_path):
  # lr 1e30: step 1's parameters are finite, each below float32's max, but their norm is inf.
  cfg, _ = tiny_config(tmp_path, "train.lr=1.0e+30", "train.warmup_ratio=0", "checkpoint.every=1",
                       "data.eval=[]", "train.skip_nonfinite_steps=true",
                       "data.train=[{adapter: star, path: data/demo/implant.jsonl}]")
  with pytest.raises(loop.NonFiniteLossError, match="the parameter norm became inf at step 1"):
    loop.train(cfg)
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_divergence_under_skipping_stops_after_consecutive_skips(monkeypatch_module, tmp_path):
  """The issue's lr=1e10 run with skipping: every step after 1 is skipped; the run stops
  (exit 1 from launch/train.py) once more than 3 in a row were, saving nothing after them."""
  cfg, _ = tiny_config(tmp_path, "train.lr=1.0e+10", "train.warmup_ratio=0", "train.steps=8",
                       "checkpoint.every=2", "data.eval=[]", "train.skip_nonfinite_steps=true",
                       "data.train=[{adapter: star, path: data/demo/implant.jsonl}]")
  with pytest.raises(loop.NonFiniteLossError) as err:
    loop.train(cfg)
  assert "at step 5" in str(err.value) and "4 steps in a row" in str(err.value), str(err.value)
  assert "train.max_consecutive_skipped_steps=3" in str(err.value)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]
  # A total bound as well: 2 skipped in all is more than max_skipped_steps=1.
  cfg, _ = tiny_config(tmp_path / "total", "train.lr=1.0e+10", "train.warmup_ratio=0",
                       "train.steps=4", "data.eval=[]", "train.skip_nonfinite_steps=true",
                       "train.max_skipped_steps=1",
                       "data.train=[{adapter: star, path: data/demo/implant.jsonl}]")
  with pytest.raises(loop.NonFiniteLossError, match="more than train.max_skipped_steps=1"):
    loop.train(cfg)


def test_skip_nonfinite_steps_counts_and_continues(monkeypatch_module, tmp_path):
  cfg, _ = tiny_config(tmp_path, "train.lr=1.0e+10", "train.warmup_ratio=0", "train.steps=3",
                       "train.skip_nonfinite_steps=true", "data.eval=[]",
                       "data.train=[{adapter: star, path: data/demo/implant.jsonl}]")
  result = loop.train(cfg)
  assert result.step == 3 and result.skipped_steps == 2
  last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
  assert last["skipped_steps"] == 2 and all(np.isfinite(p).all() for p in final_params(tmp_path, 3))


def test_steps_derived_from_epochs(monkeypatch_module, tmp_path):
  cfg, _ = tiny_config(tmp_path, "train.steps=0", "train.epochs=2")
  data = loop.make_pipeline(cfg, load_run_tokenizer(cfg), "train", 4)
  per_epoch = data.num_batches_per_epoch()
  assert per_epoch > 1 and loop.total_steps(cfg, data) == 2 * per_epoch


def test_peak_flops_table_and_mfu():
  assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
  assert metrics.peak_flops_per_device("TPU v5p") == 459e12
  assert metrics.peak_flops_per_device("TPU v4") == 275e12
  assert metrics.peak_flops_per_device("TPU v6 lite") == 918e12
  assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
  assert metrics.peak_flops_per_device("NVIDIA H200") == 989e12
  assert metrics.peak_flops_per_device("cpu") is None
  assert metrics.mfu(1e9, 1e5, 4, 1e14) == pytest.approx(0.25)

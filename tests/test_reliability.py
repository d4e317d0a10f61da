"""Fault injection: kills, preemption, damaged checkpoints, NaN, bad configs, unsafe inputs.

RELIABILITY.md lists every fault tried here with its result and command.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ease_jax.cli import train as train_cli
from ease_jax.train import checkpoint
from ease_jax.config import CheckpointConfig, load_config
from ease_jax.errors import UserError
from ease_jax.train import loop
from tests.test_checkpoint import FakeIterator, assert_trees_equal, tiny_state
from xla_env import xla_flags

REPO = Path(__file__).resolve().parents[1]
# The tiny run: 8 steps, a checkpoint every 2 (keep 2), no eval, metrics every step.
RUN = ["--config", "configs/demo.yaml", "train.steps=8", "train.seq_len=256",
       "train.batch_size=4", "checkpoint.every=2", "train.log_every=1", "data.eval=[]",
       "data.max_dropped_fraction=1"]  # seq_len 256 drops the longest traces: fast, not a loss
TIMING = ("tokens_per_sec", "tokens_per_sec_per_device", "mfu")

# launch/train.py with two test-only slowdowns, so a kill can land where it is meant to:
# each step waits for its data (`SLOW_STEP` s), and orbax waits `SLOW_COMMIT` s before it
# renames a fully written <step>.orbax-checkpoint-tmp-* directory to <step>.
WRAPPER = """
import asyncio, os, runpy, sys, time
from orbax.checkpoint._src.path import atomicity
from ease_jax.train import loop
step_delay, commit_delay = float(os.environ["SLOW_STEP"]), float(os.environ["SLOW_COMMIT"])
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def slow_finalize(self, *a, **k):
  if self._final_path.name.isdigit():  # the step directory, not each item inside it
    await asyncio.sleep(commit_delay)
  return await finalize(self, *a, **k)
atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
to_global = loop.to_global
def slow_to_global(*a, **k):
  time.sleep(step_delay)
  return to_global(*a, **k)
loop.to_global = slow_to_global
sys.argv = ["launch/train.py", *sys.argv[1:]]
runpy.run_path("launch/train.py", run_name="__main__")
"""


def _env(**extra: str) -> dict:
  """The run's environment: the suite's compilation cache (tests/conftest.py) is inherited."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), SLOW_STEP="0.25",
             SLOW_COMMIT="1.0")
  env.update(extra)
  env["XLA_FLAGS"] = xla_flags()
  return env


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", WRAPPER, *RUN, f"run_dir={run_dir}", *extra],
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, cond, timeout: float = 120) -> bool:
  """Polls `cond()` until true (-> True) or until the process ends (-> False)."""
  end = time.time() + timeout
  while time.time() < end:
    if cond():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.01)
  raise AssertionError("timed out waiting for the training process")


def logged_steps(run_dir: Path) -> list[int]:
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    return []
  steps = []
  for line in path.read_text().splitlines():
    try:
      steps.append(json.loads(line)["step"])
    except ValueError:
      pass  # a line being written
  return steps


def read_metrics(run_dir: Path) -> list[dict]:
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
          for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_params(run_dir: Path) -> list[np.ndarray]:
  import orbax.checkpoint as ocp
  tree = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / "8" / "params")
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


@pytest.mark.slow
def test_kill_anywhere_then_rerun_equals_an_uninterrupted_run(tmp_path):
  """SIGTERM (checkpoint and exit 143), SIGKILL during an async checkpoint write, SIGKILL at
  a random moment, then the same command to the end: params and metrics as if never stopped."""
  rng = random.Random(int(os.environ.get("EASE_FAULT_SEED", "0")))
  ref, run = tmp_path / "ref", tmp_path / "run"
  code, out = finish(start(ref))  # also fills the compilation cache for the rest
  assert code == 0, out[-3000:]

  # 1. Preemption notice: SIGTERM after a few steps -> checkpoint of the last step, exit 143.
  proc = start(run)
  assert wait_for(proc, lambda: len(logged_steps(run)) >= 2)
  proc.send_signal(signal.SIGTERM)
  code, out = finish(proc)
  assert code == 143, out[-3000:]
  stopped = int(out.split("stopped by SIGTERM after step ")[1].split("/")[0])
  assert (run / "checkpoints" / str(stopped) / "commit_success.txt").exists(), out[-2000:]
  assert 2 <= stopped < 8 and "Traceback" not in out

  # 2. SIGKILL while an async checkpoint is being written (its tmp directory exists).
  proc = start(run)
  tmp_dirs = lambda: [p for p in (run / "checkpoints").iterdir() if checkpoint.TMP_MARK in p.name]
  assert wait_for(proc, lambda: bool(tmp_dirs())), finish(proc)[1][-3000:]
  proc.kill()
  proc.wait()
  assert tmp_dirs(), "the kill should have left an unfinished checkpoint write behind"
  assert not any(checkpoint.TMP_MARK in str(s) for s in
                 checkpoint.Checkpointer(run, CheckpointConfig()).all_steps())

  # 3. SIGKILL at a random moment after the restart has taken a step.
  proc = start(run)
  resumed = max(logged_steps(run) or [0])
  if wait_for(proc, lambda: max(logged_steps(run) or [0]) > resumed):
    time.sleep(rng.uniform(0, 1.5))
    proc.kill()
  proc.wait()

  # 4. The same command again, to the end.
  code, out = finish(start(run))
  assert code == 0, out[-3000:]
  for a, b in zip(final_params(ref), final_params(run), strict=True):
    np.testing.assert_array_equal(a, b)
  straight, resumed = read_metrics(ref), read_metrics(run)
  assert [m["step"] for m in straight] == [m["step"] for m in resumed] == list(range(1, 9))
  for a, b in zip(straight, resumed):
    assert a.keys() == b.keys(), (a, b)
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-6, err_msg=str(a))

  # 5. Every checkpoint of the run damaged: a one-line error that names --fresh, no traceback;
  #    --fresh then starts over and keeps the old files.
  for step_dir in (run / "checkpoints").iterdir():
    shutil.rmtree(step_dir / "params")
  env = _env(SLOW_STEP="0", SLOW_COMMIT="0")
  proc = subprocess.run([sys.executable, "launch/train.py", *RUN, f"run_dir={run}"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "can be restored" in proc.stderr and "--fresh" in proc.stderr, proc.stderr


def _damage_truncate(step_dir: Path) -> None:
  biggest = max((p for p in (step_dir / "params").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(biggest.stat().st_size // 2)


def _damage_flip_one_bit(step_dir: Path) -> None:
  biggest = max((p for p in (step_dir / "params").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0x01
  biggest.write_bytes(bytes(data))


def _damage_data_state(step_dir: Path) -> None:
  (step_dir / "data" / "process_0-of-1.json").write_text("{not json")


def _damage_empty_dir(step_dir: Path) -> None:
  shutil.rmtree(step_dir)
  step_dir.mkdir()


def _saved_steps(tmp_path: Path, steps=(2, 4)):
  cfg, state = tiny_state()
  ckpt = checkpoint.Checkpointer(tmp_path, CheckpointConfig(every=1, keep=5))
  for s in steps:
    ckpt.save(s, state.replace(step=state.step + s), FakeIterator(s), cfg)
  ckpt.close()
  return cfg, state


def _edit_json(path: Path, change) -> None:
  obj = json.loads(path.read_text())
  change(obj)
  path.write_text(json.dumps(obj))


def _damage_iterator_position(step_dir: Path) -> None:
  """Another valid position: without a checksum this resumed silently at the wrong data."""
  _edit_json(step_dir / "data" / "process_0-of-1.json", lambda s: s.update(position=0))


def _damage_no_meta_and_flip(step_dir: Path) -> None:
  """Deleting meta/ used to turn verification off, so the flipped bit restored unnoticed."""
  shutil.rmtree(step_dir / "meta")
  _damage_flip_one_bit(step_dir)


def _damage_meta_counter(step_dir: Path) -> None:
  _edit_json(step_dir / "meta" / "metadata", lambda m: m["counters"].update(skipped_steps=3))


def _damage_meta_checksum_dropped(step_dir: Path) -> None:
  """An edit that drops a checksum and recomputes meta's own: still not trusted."""
  from ease_jax.train import ckpt_verify

  def drop(m):
    del m["checksums"]["data"], m["sha256"]
    m["sha256"] = ckpt_verify.json_sha256(m)
  _edit_json(step_dir / "meta" / "metadata", drop)


def _damage_model_config(step_dir: Path) -> None:
  _edit_json(step_dir / "model_config" / "metadata", lambda c: c.update(num_layers=2))


@pytest.mark.parametrize("damage, words", [
    (_damage_truncate, ""), (_damage_flip_one_bit, "checksum mismatch"),
    (_damage_data_state, "JSONDecodeError"), (_damage_empty_dir, "meta is missing"),
    (_damage_iterator_position, "process_0-of-1.json does not match its checksum"),
    (_damage_no_meta_and_flip, "meta is missing"),
    (_damage_meta_counter, "meta: its checksum does not match"),
    (_damage_meta_checksum_dropped, "no checksum for data"),
    (_damage_model_config, "model_config: does not match")])
def test_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, damage, words):
  cfg, state = _saved_steps(tmp_path)
  damage(tmp_path / "checkpoints" / "4")
  ckpt = checkpoint.Checkpointer(tmp_path, CheckpointConfig(every=1, keep=5))
  it = FakeIterator()
  restored = ckpt.restore_latest(state, it)
  assert restored.step == 2 and it.position == 2
  assert_trees_equal(restored.state, state.replace(step=state.step + 2))
  (problem,) = restored.problems
  assert "checkpoint step 4 is damaged" in problem and words in problem, problem
  assert (tmp_path / checkpoint.DAMAGED_DIR / "4").is_dir() and ckpt.all_steps() == [2]
  assert ckpt.save(4, state, FakeIterator(4), cfg)  # training can write step 4 again
  ckpt.close()


def test_every_step_damaged_is_an_error_not_a_fresh_start(tmp_path):
  _, state = _saved_steps(tmp_path)
  for s in (2, 4):
    _damage_truncate(tmp_path / "checkpoints" / str(s))
  ckpt = checkpoint.Checkpointer(tmp_path, CheckpointConfig())
  with pytest.raises(checkpoint.CheckpointError, match=r"step 4: .*step 2: .*--fresh"):
    ckpt.restore_latest(state, FakeIterator())
  assert ckpt.all_steps() == [2, 4]  # nothing moved: the cause may be a changed config
  ckpt.close()


def test_unfinished_write_is_never_a_step_and_is_cleaned_up(tmp_path):
  _, state = _saved_steps(tmp_path)
  ckpts = tmp_path / "checkpoints"
  (ckpts / "4").rename(ckpts / "6.orbax-checkpoint-tmp-1234")  # complete files, no rename
  assert checkpoint.unfinished_writes(ckpts) == ["6.orbax-checkpoint-tmp-1234"]
  ckpt = checkpoint.Checkpointer(tmp_path, CheckpointConfig())
  assert ckpt.restore_latest(state, FakeIterator()).step == 2
  ckpt.wait()
  ckpt.close()
  assert checkpoint.unfinished_writes(ckpts) == []


def test_nonfinite_state_is_never_saved(tmp_path):
  cfg, state = tiny_state()
  bad = state.replace(opt_state=jax.tree.map(lambda x: x * np.nan if x.dtype == np.float32 else x,
                                             state.opt_state))
  ckpt = checkpoint.Checkpointer(tmp_path, CheckpointConfig(every=1))
  with pytest.raises(checkpoint.NonFiniteStateError, match="NaN/Inf in .*opt_state"):
    ckpt.save(1, bad, FakeIterator(), cfg)
  ckpt.close()
  assert ckpt.all_steps() == [] and checkpoint.unfinished_writes(tmp_path / "checkpoints") == []


def test_set_aside_moves_checkpoints_and_metrics(tmp_path):
  _saved_steps(tmp_path, steps=(2,))
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  dest = checkpoint.set_aside(tmp_path)
  assert dest.name.startswith("previous-") and sorted(os.listdir(dest)) == [
      "checkpoints", "metrics.jsonl"]
  assert not (tmp_path / "checkpoints").exists() and checkpoint.set_aside(tmp_path) is None


@pytest.fixture
def in_repo(monkeypatch):
  monkeypatch.chdir(REPO)


def tiny(run_dir: Path, *extra: str):
  return load_config(REPO / "configs" / "demo.yaml", [
      f"run_dir={run_dir}", "train.batch_size=4", "train.seq_len=256", "train.steps=4",
      "train.log_every=1", "checkpoint.every=2", "data.eval=[]",
      "data.train=[{adapter: star, path: data/demo/implant.jsonl}]",
      "data.max_dropped_fraction=1", *extra])


@pytest.mark.slow
def test_nan_batch_is_skipped_counted_and_the_count_survives_resume(in_repo, tmp_path,
                                                                   monkeypatch):
  """A NaN loss weight in step 2's batch: skipped under skip_nonfinite_steps, the count is
  checkpointed with step 2 and still there after resuming; no checkpoint is non-finite."""
  calls = {"n": 0}
  to_global = loop.to_global

  def poisoned(local, mesh):
    calls["n"] += 1
    if calls["n"] == 2:
      local = dict(local, loss_weight=np.full_like(local["loss_weight"], np.nan))
    return to_global(local, mesh)

  monkeypatch.setattr(loop, "to_global", poisoned)
  cfg = tiny(tmp_path, "train.skip_nonfinite_steps=true")
  first = loop.train(cfg, stop_at=2)
  assert (first.step, first.skipped_steps) == (2, 1)
  second = loop.train(cfg)  # resumes at step 2; no more NaN batches
  assert (second.step, second.skipped_steps) == (4, 1)
  metrics = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["skipped_steps"] for m in metrics] == [0, 1, 1, 1]

  # Without skipping: the run stops naming the step and the last good checkpoint.
  calls["n"] = -2  # poison step 4 of a fresh run
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 4.*checkpoint is step 2"):
    loop.train(tiny(tmp_path / "stop"))
  assert checkpoint.Checkpointer(tmp_path / "stop", CheckpointConfig()).all_steps() == [2]


def test_fresh_starts_over_and_keeps_the_old_run(in_repo, tmp_path):
  cfg = tiny(tmp_path, "train.steps=2")
  loop.train(cfg)
  again = loop.train(cfg, fresh=True)
  assert again.step == 2
  (old,) = tmp_path.glob("previous-*")
  assert (old / "checkpoints" / "2").is_dir() and (tmp_path / "checkpoints" / "2").is_dir()
  assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
          ] == [1, 2]


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
  from ease_jax.train.metrics import MetricsWriter
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  MetricsWriter(tmp_path, resume_step=2, enabled=True).close()
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


# ---------------------------------------------------------------- configs, end to end

def _launch(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(devices))
  return subprocess.run([sys.executable, "launch/train.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, words", [
    (["train.stepz=3"], ["unknown config key 'train.stepz'", "did you mean 'train.steps'"]),
    (["train.batch_size=eight"], ["train.batch_size: expected int"]),
    (["train.batch_size=-4"], ["train.batch_size", "a positive number"]),
    (["train.seq_len=-128"], ["train.seq_len", "an integer >= 8"]),
    (["checkpoint.every=0"], ["checkpoint.every", "a positive number"]),
    (["mesh.fsdp=0"], ["mesh.fsdp", "-1"]),
    (["data.train.0.weight=heavy"], ["data.train[0].weight: expected float"]),
    (["train.lr"], ["not of the form key.sub=value"]),
    (["model.init_from=hf:/nonexistent"], ["/nonexistent"]),
    (["model.init_from=scratch:huge"], ["unknown model preset"]),
    (["model.attention=cudnn"], ["model.attention=cudnn needs NVIDIA GPUs"]),
    (["model.attention=splash"], ["model.attention=splash needs TPUs"]),
    (["mesh.data=3"], ["mesh.data", "does not divide the 1 devices"]),
    (["mesh.fsdp=3", "mesh.data=1"], ["= 3, but there are 1 devices", "-1"]),
])
def test_config_errors_are_one_line_with_the_key_and_no_traceback(args, words, in_repo, tmp_path,
                                                                  capsys):
  """The training command's main, in this process (one device): exit 2 and one `error:` line
  naming the key; an exception escaping main would fail the test. tests/test_launch.py runs
  one such error through the real `launch/train.py` process."""
  code = train_cli.main(["--config", "configs/demo.yaml", f"run_dir={tmp_path}", *args])
  lines = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
  for w in words:
    assert w in lines[0], (w, lines[0])


@pytest.mark.slow
def test_batch_that_does_not_divide_the_mesh_names_the_fix(tmp_path):
  proc = _launch("--config", "configs/demo.yaml", f"run_dir={tmp_path}", "train.batch_size=6",
                 devices=4)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "train.batch_size=6" in proc.stderr and "multiple of 4" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_unsafe_yaml_config_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "pwned"
  cfg = tmp_path / "evil.yaml"
  cfg.write_text(f"run_dir: !!python/object/apply:os.system ['touch {marker}']\n")
  proc = _launch("--config", str(cfg))
  assert proc.returncode == 2 and "not valid YAML" in proc.stderr and not marker.exists()


# ---------------------------------------------------------------- safe loading

def test_pickle_weights_are_never_loaded(tmp_path):
  from ease_jax import hf
  (tmp_path / "config.json").write_text(json.dumps({
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 64,
      "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
      "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
      "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}))
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  import pickle
  (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
  with pytest.raises(UserError, match="pickle .bin weights are not loaded"):
    hf.load_pretrained(tmp_path)
  assert not marker.exists()


def test_tokenizer_with_custom_code_is_not_executed(tmp_path):
  from ease_jax.tokenizer import demo_tokenizer_path, load_tokenizer
  shutil.copytree(demo_tokenizer_path(), tmp_path / "tok")
  marker = tmp_path / "pwned"
  (tmp_path / "tok" / "evil_tokenizer.py").write_text(
      f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
      "from transformers import PreTrainedTokenizerFast\n"
      "class EvilTokenizer(PreTrainedTokenizerFast):\n  pass\n")
  cfg_path = tmp_path / "tok" / "tokenizer_config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
  cfg["tokenizer_class"] = "EvilTokenizer"
  cfg_path.write_text(json.dumps(cfg))
  try:
    tok = load_tokenizer(str(tmp_path / "tok"))
  except UserError:
    tok = None  # refusing is fine too; running the code is not
  assert not marker.exists()
  assert tok is None or type(tok).__name__ != "EvilTokenizer"


def test_no_trust_remote_code_anywhere():
  offenders = []
  for path in [*REPO.glob("ease_jax/**/*.py"), *REPO.glob("tools/**/*.py"),
               *REPO.glob("launch/*.py")]:
    text = path.read_text(encoding="utf-8")
    if "trust_remote_code=True" in text or "torch.load(" in text or "pickle.load" in text:
      offenders.append(str(path.relative_to(REPO)))
  assert not offenders, offenders

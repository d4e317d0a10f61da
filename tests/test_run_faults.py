"""Operator faults around a run: a second run on the same run_dir, stale locks, a full disk,
a read-only run_dir, a FIFO as data, a broken chat template, damaged checkpoints' noise.

Each ends in one `error:` line naming the path and the cause (exit 2), or a warning.
RELIABILITY.md lists them.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ease_jax.train import runlock
from ease_jax.config import load_config
from ease_jax.train import loop
from xla_env import xla_flags

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/demo.yaml", "train.steps=4", "train.seq_len=256",
        "train.batch_size=4", "checkpoint.every=2", "data.eval=[]", "train.steps_per_call=1",
        "data.train=[{adapter: star, path: data/demo/implant.jsonl}]",
        "data.max_dropped_fraction=1"]  # seq_len 256 drops the longest traces, on purpose
HOLD = "import sys, time; from ease_jax.train import runlock; runlock.RunDirLock(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(600)"


def _env(**extra: str) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1), PYTHONPATH=str(REPO),
              **extra)


def launch(*args: str, code: str | None = None, timeout: int = 240,
           **popen: object) -> subprocess.CompletedProcess:
  """launch/train.py (or `code` run as it, for fault injection) with `args`."""
  cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "launch/train.py", *args]
  return subprocess.run(cmd, cwd=REPO, env=popen.pop("env", _env()), capture_output=True,
                        text=True, timeout=timeout, **popen)


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
  # (TINY's seq_len 256 drops rows on purpose: the start-up data warning is expected)
  lines = [l for l in proc.stderr.strip().splitlines() if not l.startswith("warning: data.")]
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
      proc.returncode, proc.stderr[-3000:])
  for w in words:
    assert w in lines[0], (w, lines[0])
  return lines[0]


def hold_lock(run_dir: Path) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


# ---------------------------------------------------------------- one run per run_dir

def test_second_lock_on_a_run_dir_is_refused_naming_the_holder(tmp_path):
  first = runlock.RunDirLock(tmp_path).acquire()
  with pytest.raises(runlock.RunDirLocked) as e:
    runlock.RunDirLock(tmp_path).acquire()
  assert str(tmp_path) in str(e.value) and f"pid {os.getpid()}" in str(e.value)
  assert f"host {socket.gethostname()}" in str(e.value)
  first.release()
  again = runlock.RunDirLock(tmp_path).acquire()  # a clean release leaves nothing stale
  assert again.warnings == []
  again.release()


@pytest.mark.slow
def test_stale_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path):
  holder = hold_lock(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  lock = runlock.RunDirLock(tmp_path).acquire()
  (warning,) = lock.warnings
  assert "no longer running" in warning and f"pid {holder.pid}" in warning, warning
  lock.release()


@pytest.mark.slow
def test_train_on_a_locked_run_dir_stops_before_touching_it(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  holder = hold_lock(tmp_path)
  try:
    with pytest.raises(runlock.RunDirLocked, match=f"pid {holder.pid}"):
      loop.train(load_config(REPO / "configs" / "demo.yaml", [f"run_dir={tmp_path}"]))
    assert sorted(os.listdir(tmp_path)) == [".lock"]  # no config.yaml, tokenizer, checkpoints
  finally:
    holder.kill()
    holder.wait()


@pytest.mark.slow
def test_second_launch_on_a_run_dir_in_use_exits_2(tmp_path):
  holder = hold_lock(tmp_path / "run")
  try:
    proc = launch(*TINY, f"run_dir={tmp_path / 'run'}")
  finally:
    holder.kill()
    holder.wait()
  one_error_line(proc, f"run_dir {tmp_path / 'run'} is in use", f"pid {holder.pid}",
                 f"host {socket.gethostname()}")


# ---------------------------------------------------------------- paths that cannot work

@pytest.mark.slow
def test_read_only_run_dir_is_one_line(tmp_path):
  """chmod does not stop root: as root the run_dir is on a read-only tmpfs instead."""
  ro = tmp_path / "ro"
  ro.mkdir()
  mounted = os.geteuid() == 0
  if mounted and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)],
                                capture_output=True).returncode:
    pytest.skip("as root a read-only directory needs mount")
  if not mounted:
    ro.chmod(0o555)
  try:
    proc = launch(*TINY, f"run_dir={ro / 'run'}")
  finally:
    if not mounted:
      ro.chmod(0o755)
    else:
      subprocess.run(["umount", str(ro)], check=True)
  line = one_error_line(proc, f"run_dir {ro / 'run'}: cannot write there")
  assert "Read-only file system" in line or "Permission denied" in line, line


@pytest.mark.slow
def test_fifo_as_data_path_is_refused_not_read(tmp_path):
  fifo = tmp_path / "rows.jsonl"
  os.mkfifo(fifo)
  proc = launch(*TINY[:-1], f"data.train=[{{adapter: star, path: {fifo}}}]",
                f"run_dir={tmp_path / 'run'}", timeout=120)  # reading it would block forever
  one_error_line(proc, str(fifo), "not a regular file")


@pytest.mark.slow
def test_broken_chat_template_is_one_line(tmp_path):
  template = tmp_path / "chat.jinja"
  template.write_text("{% for m in messages %}{{ m.content }\n{% endfor %}")
  proc = launch(*TINY, f"data.chat_template={template}", f"run_dir={tmp_path / 'run'}")
  one_error_line(proc, str(template), "does not parse")


# ---------------------------------------------------------------- disk full

ENOSPC_WRAPPER = textwrap.dedent("""
    import errno, os, runpy, sys
    import grain.checkpoint as grain_ckpt
    def no_space(self, directory, *a, **k):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    grain_ckpt.CheckpointHandler.save = no_space
    sys.argv = ["launch/train.py", *sys.argv[1:]]
    runpy.run_path("launch/train.py", run_name="__main__")
    """)


def _assert_disk_full_error(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
  one_error_line(proc, "checkpoint step 2 could not be written", str(run_dir / "checkpoints"),
                 os.strerror(errno.ENOSPC))
  assert "checkpoint saved" not in proc.stdout, proc.stdout


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint_is_one_line(tmp_path):
  """The writer raises ENOSPC: one line, exit 2, and "checkpoint saved" never printed."""
  proc = launch(*TINY, f"run_dir={tmp_path}", code=ENOSPC_WRAPPER)
  _assert_disk_full_error(proc, tmp_path)


@pytest.mark.slow
def test_disk_full_on_a_real_small_file_system(tmp_path):
  """A 3 MB tmpfs (root only; elsewhere the injected test above covers it)."""
  mount = tmp_path / "small"
  mount.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs",
                                          str(mount)], capture_output=True).returncode:
    pytest.skip("needs root and mount to make a small file system")
  try:
    proc = launch(*TINY, f"run_dir={mount / 'run'}")
    _assert_disk_full_error(proc, mount / "run")
  finally:
    subprocess.run(["umount", str(mount)], check=True)


# ---------------------------------------------------------------- damaged checkpoints

@pytest.mark.slow
def test_every_checkpoint_damaged_prints_no_library_tracebacks(tmp_path):
  """Unreadable OCDBT manifests: tensorstore's late callbacks into orbax's closed event loop
  printed "Event loop is closed" tracebacks around the one useful line (hundreds on a
  bigger model)."""
  done = launch(*TINY, f"run_dir={tmp_path}")
  assert done.returncode == 0, done.stderr[-3000:]
  for manifest in (tmp_path / "checkpoints").rglob("manifest.ocdbt"):
    manifest.write_bytes(b"not a manifest" * 4)
  proc = launch(*TINY, f"run_dir={tmp_path}")
  one_error_line(proc, f"no checkpoint under {tmp_path / 'checkpoints'} can be restored",
                 "DATA_LOSS", "--fresh")

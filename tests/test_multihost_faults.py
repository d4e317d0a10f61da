"""A two-process run (jax.distributed on 127.0.0.1, gloo) losing one process.

SIGTERM to one process only (a host's maintenance event): both checkpoint the same step
and exit 143. SIGKILL of one process: the other stops within a bounded time instead of
waiting in a collective: exit 3 with one line when a collective fails first, or JAX ends it
(SIGABRT) when the coordinator misses the dead process's heartbeats first. Restarting both then resumes to parameters
bit-equal to an uninterrupted two-process run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.test_reliability import RUN, WRAPPER, logged_steps
from xla_env import xla_flags

pytestmark = pytest.mark.slow  # two processes, killed and restarted: runs with --full

REPO = Path(__file__).resolve().parents[1]
RUN_FLAGS = [*RUN, "train.steps_per_call=1",
             "data.train=[{adapter: star, path: data/demo/implant.jsonl}]"]
BOUND_S = 90  # the survivor of a SIGKILL must be gone within this (heartbeat 10 s)


def _port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def start_pair(run_dir: Path, slow_step: float = 0.4) -> list[subprocess.Popen]:
  """Both processes of one run (the test wrapper: each step waits `slow_step` s)."""
  port = _port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags(1),
             SLOW_STEP=str(slow_step), SLOW_COMMIT="0")
  return [subprocess.Popen(
      [sys.executable, "-c", WRAPPER, *RUN_FLAGS, f"run_dir={run_dir}", "--coordinator",
       f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i),
       "--heartbeat_timeout", "10"], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]


def final_params(run_dir: Path) -> list[np.ndarray]:
  """Step 8's parameters (saved from two processes' devices) read onto this one device."""
  ckptr = ocp.StandardCheckpointer()
  path = run_dir / "checkpoints" / "8" / "params"
  meta = ckptr.metadata(path)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        getattr(meta, "item_metadata", meta))
  return [np.asarray(x) for x in jax.tree.leaves(ckptr.restore(path, target))]


def wait_all(procs: list[subprocess.Popen], timeout: float = 400) -> list[tuple[int, str]]:
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  return [(p.returncode, out) for p, out in zip(procs, outs)]


def wait_for_step(procs: list[subprocess.Popen], run_dir: Path, after: int,
                  timeout: float = 400) -> None:
  end = time.time() + timeout
  while max(logged_steps(run_dir) or [0]) <= after:
    assert time.time() < end and all(p.poll() is None for p in procs), "the run ended early"
    time.sleep(0.05)


def test_losing_one_of_two_processes_then_restarting_both(tmp_path):
  ref, run = tmp_path / "ref", tmp_path / "run"
  results = wait_all(start_pair(ref, slow_step=0))
  assert [c for c, _ in results] == [0, 0], "\n".join(o[-2000:] for _, o in results)

  # 1. SIGTERM to process 1 only: both save the same step and exit 143.
  procs = start_pair(run)
  wait_for_step(procs, run, 0)
  procs[1].send_signal(signal.SIGTERM)
  (c0, o0), (c1, o1) = wait_all(procs)
  assert (c0, c1) == (143, 143), (o0[-2000:], o1[-2000:])
  stopped = int(o0.split("stopped by SIGTERM after step ")[1].split("/")[0])
  assert sorted(os.listdir(run / "checkpoints" / str(stopped) / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

  # 2. SIGKILL of process 1 after the restart took a step: process 0 stops within BOUND_S.
  procs = start_pair(run)
  wait_for_step(procs, run, stopped)
  procs[1].kill()
  killed_at = time.time()
  (c0, o0), _ = wait_all(procs, timeout=BOUND_S + 60)
  took = time.time() - killed_at
  assert took < BOUND_S and "Traceback" not in o0, (took, o0[-3000:])
  if c0 == 3:  # a collective failed first: our one line
    lines = [l for l in o0.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "another process of this run" in lines[0], o0[-3000:]
  else:  # the coordinator missed process 1's heartbeats first: JAX ends the process
    assert c0 == -signal.SIGABRT and "another task died" in o0, (c0, o0[-3000:])

  # 3. Both again, to the end: the same parameters as the uninterrupted run.
  results = wait_all(start_pair(run, slow_step=0))
  assert [c for c, _ in results] == [0, 0], "\n".join(o[-2000:] for _, o in results)
  for a, b in zip(final_params(ref), final_params(run), strict=True):
    np.testing.assert_array_equal(a, b)

"""Shared test helpers: fake-device subprocesses and tiny HF reference models; what runs.

`python -m pytest` runs the fast part of the suite: the tests that stay in the pytest process.
Tests marked `slow` (they start other processes: command lines, two-process runs, kills and
restarts, fake devices; or load the real SmolLM2 model) and `bench` (benchmark smoke tests)
are deselected from that default run; `--full` runs them too (CI runs `python -m pytest
--full`), and so does choosing tests: naming files or tests (`python -m pytest
tests/test_multihost_faults.py`), `-k WORDS` or `-m MARKERS` (`-m slow`: only those).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from xla_env import set_for_this_process, xla_flags

set_for_this_process()  # before any test module imports jax

REPO = Path(__file__).resolve().parents[1]
LONG = ("slow", "bench")  # the markers `--full` adds to the run


def pytest_addoption(parser: pytest.Parser) -> None:
  parser.addoption("--full", action="store_true",
                   help="also run the tests marked slow (they start other processes, or load "
                        "the real model) and bench (benchmark smoke tests): the whole suite, as CI")


def pytest_configure(config: pytest.Config) -> None:
  for name, what in (("slow", "starts other processes, or loads the real model"),
                     ("bench", "a benchmark script's smoke test")):
    config.addinivalue_line("markers", f"{name}: {what}; runs with --full")
  _share_compilations(config)


def _share_compilations(config: pytest.Config) -> None:
  """One persistent XLA compilation cache for the whole run: the pytest workers and every
  process a test starts (they inherit the environment), so a program compiled once (the demo
  model's train step, say, in a run and again in its restarts) is loaded, not recompiled. Only
  programs that took at least 0.5 s to compile are stored: storing the many tiny ones (eager
  ops) cost more than it saved (tests/test_model.py took twice as long with every program
  stored; tests/test_loop.py 69 s instead of 88 s with this bound). The process that made the
  directory removes it at the end; a JAX_COMPILATION_CACHE_DIR set by the caller is used as is
  and kept. The size bound turns on JAX's file lock, which the two workers need to read and
  write the directory safely at the same time."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  path = tempfile.mkdtemp(prefix="ease-jax-test-xla-cache-")
  config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
  os.environ.update(JAX_COMPILATION_CACHE_DIR=path,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                    JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  """In the default run (no --full, no paths, no -k or -m selection), deselects the long
  tests: not skips, so pytest reports them as deselected and the summary says how many."""
  chosen = (config.args_source != pytest.Config.ArgsSource.TESTPATHS
            or config.getoption("keyword") or config.getoption("markexpr"))
  if config.getoption("--full") or chosen:
    return
  long = [i for i in items if any(i.get_closest_marker(m) for m in LONG)]
  if long:
    config.hook.pytest_deselected(items=long)
    keep = set(map(id, items)) - set(map(id, long))
    items[:] = [i for i in items if id(i) in keep]


def run_with_devices(code: str, n: int = 8, timeout: int = 600, env: dict | None = None) -> str:
  """Runs `code` in a fresh Python with `n` fake CPU devices; returns stdout, raises on failure."""
  full_env = dict(os.environ, XLA_FLAGS=xla_flags(n),
                  JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **(env or {}))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, timeout=timeout, env=full_env, cwd=REPO)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc.stdout


@pytest.fixture
def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on (for jax.distributed's coordinator)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.fixture
def fake_devices():
  """The `run_with_devices` helper, as a fixture."""
  return run_with_devices


@pytest.fixture(autouse=True)
def _processes_only_in_slow_tests(request: pytest.FixtureRequest, monkeypatch) -> None:
  """Keeps the default run in-process: a test that starts another process (a command line,
  a second JAX process, fake devices) fails here unless it is marked slow or bench."""
  if any(request.node.get_closest_marker(m) for m in LONG):
    return

  def refuse(self, *args, **kwargs):
    cmd = args[0] if args else kwargs.get("args")
    raise AssertionError(f"{request.node.nodeid} starts a process ({str(cmd)[:80]}): mark it "
                         "@pytest.mark.slow (the default run stays in-process)")

  monkeypatch.setattr(subprocess.Popen, "__init__", refuse)

"""Shared test helpers: fake-device subprocesses and tiny HF reference models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from xla_env import set_for_this_process, xla_flags

set_for_this_process()  # before any test module imports jax

REPO = Path(__file__).resolve().parents[1]


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

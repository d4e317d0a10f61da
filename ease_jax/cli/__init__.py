"""The package's commands (console scripts in pyproject.toml; `tools/*.py` are thin wrappers).

Each command imports its module only when run, so `--help` stays fast, and a user's mistake
(`UserError`) ends as one `error: ...` line and exit code 2 (`errors.run_main`).
"""

from __future__ import annotations

import importlib
from typing import Callable

from ease_jax.errors import run_main


def _command(module: str) -> Callable[[], int]:
  def run() -> int:
    return run_main(importlib.import_module(f"ease_jax.cli.{module}").main)
  run.__doc__ = f"The `ease_jax.cli.{module}` command."
  return run


build_mix = _command("build_mix")
compare = _command("compare")
diagnose = _command("diagnose")
evaluate = _command("evaluate")
export_hf = _command("export_hf")
generate = _command("generate")
inspect_data = _command("inspect_data")
make_baselines = _command("make_baselines")
select_teacher = _command("select_teacher")
train = _command("train")
write_traces = _command("write_traces")

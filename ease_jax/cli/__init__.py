"""The package's commands (console scripts in pyproject.toml; `tools/*.py` are thin wrappers).

`run_NAME` runs the command of the module `ease_jax.cli.NAME`.

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


run_build_mix = _command("build_mix")
run_check_edge = _command("check_edge")
run_compare = _command("compare")
run_diagnose = _command("diagnose")
run_evaluate = _command("evaluate")
run_export_gguf = _command("export_gguf")
run_export_hf = _command("export_hf")
run_generate = _command("generate")
run_inspect_data = _command("inspect_data")
run_make_baselines = _command("make_baselines")
run_select_teacher = _command("select_teacher")
run_train = _command("train")
run_write_traces = _command("write_traces")

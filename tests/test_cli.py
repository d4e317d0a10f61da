"""Every console command in pyproject.toml names a runner that exists, over a module with a
`main`, and its tools/ or launch/ script runs the same `main`."""

import importlib
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
CLI = {name: target for name, target in SCRIPTS.items() if target.startswith("ease_jax.cli:")}


def test_the_recipe_commands_are_declared():
  assert {"ease-train", "ease-generate", "ease-evaluate", "ease-diagnose", "ease-export"} <= set(CLI)


@pytest.mark.parametrize("name", sorted(CLI))
def test_command_runs_the_module_main_its_script_runs(name):
  module_path, attr = CLI[name].split(":")
  runner = getattr(importlib.import_module(module_path), attr)
  assert callable(runner)
  module = attr.removeprefix("run_")
  main = importlib.import_module(f"ease_jax.cli.{module}").main
  script = REPO / ("launch" if module == "train" else "tools") / f"{module}.py"
  text = script.read_text()
  assert f"from ease_jax.cli.{module} import main" in text, script  # a thin wrapper, same code
  assert callable(main)

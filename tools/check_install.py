#!/usr/bin/env python
"""Checks an installation: every module imports; every tool and console command answers --help.

  python tools/check_install.py

Run it after `pip install -e .` (the base install, no extras): a module or tool that needs a
package missing from the project's declared dependencies fails here, naming the module or the
tool and the import that failed. Exit 0 when everything passes, 1 otherwise.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import shutil
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout
  sys.path.insert(0, str(ROOT))

import ease_jax  # noqa: E402  (after the path set-up above)

# Subpackages that need an optional extra: (package, the library it needs, the extra).
# They are checked when that library is installed and listed as skipped otherwise.
OPTIONAL = (("ease_jax.lm_eval", "lm_eval", "eval"),)


def optional_skips() -> list[tuple[str, str]]:
  """(package, extra) for each optional subpackage whose library is not installed."""
  return [(pkg, extra) for pkg, lib, extra in OPTIONAL if importlib.util.find_spec(lib) is None]


def package_modules() -> list[str]:
  """Every module and subpackage of ease_jax that this installation should import."""
  skipped = tuple(pkg for pkg, _ in optional_skips())
  names = ["ease_jax"]
  for info in pkgutil.walk_packages(ease_jax.__path__, prefix="ease_jax.",
                                    onerror=lambda name: None):
    if not any(info.name == pkg or info.name.startswith(pkg + ".") for pkg in skipped):
      names.append(info.name)
  return sorted(names)


def tool_scripts() -> list[Path]:
  """The command-line entry points: launch/train.py and every script under tools/."""
  scripts = [ROOT / "launch" / "train.py"]
  scripts += sorted(p for p in (ROOT / "tools").rglob("*.py")
                    if p.name not in ("__init__.py", "common.py") and p.name != Path(__file__).name)
  return scripts


def check_imports() -> list[str]:
  """Imports each module; returns one failure line per module that does not import."""
  failures = []
  for name in package_modules():
    try:
      importlib.import_module(name)
    except Exception as e:  # any import-time failure is what this check reports
      last = traceback.format_exception_only(type(e), e)[-1].strip()
      failures.append(f"import {name}: {last}")
  return failures


def is_helper_module(path: Path) -> bool:
  """A module under tools/ that other tools import, with no command line of its own."""
  return "__main__" not in path.read_text()


def _answers_help(cmd: list[str], name: str, timeout: float) -> str | None:
  """Runs `cmd --help`; None when it exits 0, else one failure line naming `name`."""
  proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=timeout,
                        cwd=ROOT)
  if proc.returncode == 0:
    return None
  tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
  return f"{name} --help: exit {proc.returncode}: {tail}"


def _all_answer_help(commands: list[tuple[list[str], str]], timeout: float) -> list[str]:
  """Runs every command's --help, as many at once as there are cores (each is a separate
  Python that imports the package); returns the failure lines in the commands' order."""
  with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    results = pool.map(lambda c: _answers_help(c[0], c[1], timeout), commands)
    return [line for line in results if line is not None]


def check_help(timeout: float = 300) -> list[str]:
  """Runs every tool with --help; returns one failure line per tool that does not exit 0."""
  return _all_answer_help([([sys.executable, str(s)], str(s.relative_to(ROOT)))
                           for s in tool_scripts() if not is_helper_module(s)], timeout)


def console_commands() -> list[str]:
  """The installed distribution's console scripts (pyproject.toml [project.scripts]), less
  those of optional extras that are not installed."""
  skipped = tuple(pkg for pkg, _ in optional_skips())
  eps = importlib.metadata.distribution("ease-jax").entry_points
  return sorted(ep.name for ep in eps if ep.group == "console_scripts"
                and not any(ep.value.startswith(pkg) for pkg in skipped))


def check_commands(timeout: float = 300) -> list[str]:
  """Runs every console command with --help; one failure line per command that fails."""
  failures, found = [], []
  for name in console_commands():
    exe = shutil.which(name)
    if exe is None:
      failures.append(f"{name}: not on PATH (is the package installed in this environment?)")
    else:
      found.append(([exe], name))
  return failures + _all_answer_help(found, timeout)


def main() -> int:
  modules, tools = package_modules(), [s for s in tool_scripts() if not is_helper_module(s)]
  failures = check_imports() + check_help() + check_commands()
  for line in failures:
    print(f"FAIL {line}", file=sys.stderr)
  for pkg, extra in optional_skips():
    print(f"skipped {pkg}: the optional extra [{extra}] is not installed")
  print(f"{len(modules)} modules imported, {len(tools)} tools and {len(console_commands())} "
        f"commands answered --help: "
        f"{'all passed' if not failures else f'{len(failures)} failed'}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())

#!/usr/bin/env python3
"""`python tools/select_teacher.py ARGS` runs the `ease-select-teacher` command (ease_jax/cli/select_teacher.py)."""

import sys

from ease_jax.cli.select_teacher import main, parse_args  # noqa: F401
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(main))

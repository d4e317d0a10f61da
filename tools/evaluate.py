#!/usr/bin/env python3
"""`python tools/evaluate.py ARGS` runs the `ease-evaluate` command (ease_jax/cli/evaluate.py)."""

import sys

from ease_jax.cli.evaluate import main, parse_args  # noqa: F401
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(main))

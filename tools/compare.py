#!/usr/bin/env python3
"""`python tools/compare.py ARGS` runs the `ease-compare` command (ease_jax/cli/compare.py)."""

import sys

from ease_jax.cli.compare import main, parse_args  # noqa: F401
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(main))

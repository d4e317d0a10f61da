#!/usr/bin/env python3
"""`python tools/check_edge.py ARGS` runs the `ease-check-edge` command (ease_jax/cli/check_edge.py)."""

import sys

from ease_jax.cli.check_edge import main, parse_args  # noqa: F401
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(main))

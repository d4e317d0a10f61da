#!/usr/bin/env python3
"""`python tools/generate.py ARGS` runs the `ease-generate` command (ease_jax/cli/generate.py)."""

import sys

from ease_jax.cli.generate import main, parse_args  # noqa: F401
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(main))

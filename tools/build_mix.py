#!/usr/bin/env python3
"""`python tools/build_mix.py ARGS` runs the `ease-build-mix` command (ease_jax/cli/build_mix.py)."""

import sys

from ease_jax.cli.build_mix import main, parse_args  # noqa: F401
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(main))

#!/usr/bin/env python3
"""`python tools/make_baselines.py ARGS` runs the `ease-make-baselines` command (ease_jax/cli/make_baselines.py)."""

import sys

from ease_jax.cli.make_baselines import main  # noqa: F401
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(main))

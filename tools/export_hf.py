#!/usr/bin/env python3
"""`python tools/export_hf.py ARGS` runs the `ease-export` command (ease_jax/cli/export_hf.py)."""

import sys

from ease_jax.cli.export_hf import main, parse_args  # noqa: F401
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(main))

#!/usr/bin/env python3
"""`python tools/diagnose.py ARGS` runs the `ease-diagnose` command (ease_jax/cli/diagnose.py)."""

import sys

from ease_jax.cli.diagnose import main, parse_args  # noqa: F401
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(main))

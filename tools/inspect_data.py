#!/usr/bin/env python3
"""`python tools/inspect_data.py ARGS` runs the `ease-inspect-data` command (ease_jax/cli/inspect_data.py)."""

import sys

from ease_jax.cli.inspect_data import main  # noqa: F401
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(main))

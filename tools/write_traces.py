#!/usr/bin/env python3
"""`python tools/write_traces.py ARGS` runs the `ease-write-traces` command (ease_jax/cli/write_traces.py)."""

import sys

from ease_jax.cli.write_traces import main, parse_args  # noqa: F401
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(main))

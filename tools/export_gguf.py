#!/usr/bin/env python3
"""`python tools/export_gguf.py ARGS` runs the `ease-export-gguf` command (ease_jax/cli/export_gguf.py)."""

import sys

from ease_jax.cli.export_gguf import main, parse_args  # noqa: F401
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(main))

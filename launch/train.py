#!/usr/bin/env python3
"""`python launch/train.py ARGS` runs the `ease-train` command (ease_jax/cli/train.py)."""

import sys

from ease_jax.cli.train import main, parse_args  # noqa: F401

if __name__ == "__main__":
  sys.exit(main())

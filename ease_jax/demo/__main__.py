"""`python -m ease_jax.demo RUN_DIR`: rewrites the README's demo block from that run's report."""

import sys
from pathlib import Path

from ease_jax.demo.run import update_readme
from ease_jax.errors import run_main

if __name__ == "__main__":
  sys.exit(run_main(lambda: update_readme(Path(sys.argv[1]), Path(__file__).parents[2] / "README.md")
                    or 0))

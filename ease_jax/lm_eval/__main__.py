"""`python -m ease_jax.lm_eval ARGS`: lm-eval's command line with the `ease_jax` model registered.

Takes exactly lm-eval's arguments, e.g.
`python -m ease_jax.lm_eval --model ease_jax --model_args pretrained=RUN_DIR,batch_size=8 --tasks T`.
"""

from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

import ease_jax.lm_eval  # noqa: F401  (registers the model)
from ease_jax.errors import run_main


def _cli() -> int:
  cli_evaluate()
  return 0


def main() -> int:
  """Runs lm-eval's CLI; a user error in the backend's arguments prints one line, exit 2."""
  return run_main(_cli)


if __name__ == "__main__":
  sys.exit(main())

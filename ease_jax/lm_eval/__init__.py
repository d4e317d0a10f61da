"""lm-evaluation-harness on ease-jax models: the `ease_jax` model backend and a Python entry.

Importing this package registers the model name `ease_jax` with lm-eval (it needs the
`eval` extra: `pip install 'ease-jax[eval]'`). lm-eval 0.4.x finds models only in its own
registry, so the stock `lm_eval` command does not see it; `python -m ease_jax.lm_eval ...`
(or the `ease-jax-lm-eval` command) is lm-eval's command line with the backend registered.
"""

from __future__ import annotations

from typing import Any

try:
  import lm_eval
  from lm_eval.tasks import TaskManager
except ImportError as e:  # the optional extra is missing
  raise ImportError("ease_jax.lm_eval needs lm-evaluation-harness: pip install 'ease-jax[eval]'"
                    ) from e

from ease_jax.lm_eval.backend import EaseJaxLM

__all__ = ["EaseJaxLM", "evaluate"]


def evaluate(pretrained: str, tasks: list[str], *, include_path: str | None = None,
             model_args: dict[str, Any] | None = None, **kwargs: Any) -> dict:
  """lm-eval's `simple_evaluate` on RUN_DIR[@STEP] / an HF directory with the ease_jax backend.

  `include_path` adds a directory of task YAMLs; `model_args` are the backend's arguments
  (dtype, batch_size, ...); other keyword arguments go to `simple_evaluate` (num_fewshot,
  limit, apply_chat_template, ...). Returns lm-eval's results dict.
  """
  task_manager = TaskManager(include_path=include_path) if include_path else None
  return lm_eval.simple_evaluate(model="ease_jax",
                                 model_args={"pretrained": pretrained, **(model_args or {})},
                                 tasks=tasks, task_manager=task_manager, **kwargs)

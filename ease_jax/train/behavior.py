"""Selective-reasoning evaluation inside training: generate on `behavior.file` with the
current parameters every `behavior.every` steps; scalars go to TensorBoard and
metrics.jsonl (`behavior/<class>/<metric>`), the full report to RUN_DIR/behavior/<step>/.
On a mesh over several processes (a multi-host TPU slice) every process takes part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
from flax import nnx

from ease_jax import sharding
from ease_jax.config import Config
from ease_jax.generation import generate as G
from ease_jax.recipe import evaluate as E

METRICS = ("reasoning_rate", "refusal_rate", "mean_new_tokens", "mean_think_tokens")


def due(cfg: Config, step: int, total_steps: int) -> bool:
  """Whether the behaviour evaluation runs after `step`."""
  b = cfg.behavior
  return bool(b.file) and (step == total_steps or bool(b.every and step % b.every == 0))


def make(cfg: Config, graphdef: nnx.GraphDef, params: Any, model_cfg: Any, tokenizer: Any,
         mesh: Any, run_dir: Path) -> Callable[[int, Any], dict[str, float]] | None:
  """A function (step, params) -> scalars, or None when `behavior.file` is not set."""
  if not cfg.behavior.file:
    return None

  items = E.read_eval_file(cfg.behavior.file)  # bad files fail before the first step
  dp = sharding.data_parallel(mesh)
  batch = -(-cfg.behavior.batch_size // dp) * dp
  generator = G.Generator(nnx.merge(graphdef, params), model_cfg, tokenizer, mesh=mesh,
                          batch_size=batch)
  sampling = G.SamplingConfig(max_new_tokens=cfg.behavior.max_new_tokens)

  def run(step: int, new_params: Any) -> dict[str, float]:
    generator.update_params(new_params)
    # All processes run each generation batch together (its rows split over the mesh) and
    # all read every row's result; process 0 writes the report.
    report, rows = E.evaluate(generator, items, sampling)
    if jax.process_index() == 0:
      E.write_report(report, run_dir / "behavior" / str(step), rows, title=f"step {step}")
    groups = {**report["classes"], "overall": report["overall"]}
    return {f"behavior/{name}/{k}": float(stats[k]) for name, stats in groups.items()
            for k in METRICS}

  return run


def summary(scalars: dict[str, float]) -> str:
  """'benign 0.00, harmful 0.00, ...': the reasoning rate per class, for the progress line."""
  return ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in scalars.items()
                   if k.startswith("behavior/") and k.endswith("/reasoning_rate"))

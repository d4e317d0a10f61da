"""Orbax checkpoints: params, optimizer state, step, RNG and the data-iterator state.

Layout: ``RUN_DIR/checkpoints/<step>/`` with four Orbax items:

  params        the model parameters (nnx.State), on their own so phase 2 and
                export can read them without the optimizer state
  train         the rest of the train state (step, optimizer state, RNG)
  data          the grain iterator state, one JSON file per process
                (grain's own Orbax handler: each host resumes its own shard)
  model_config  the DecoderConfig as JSON, so a checkpoint rebuilds its model

Saves are asynchronous (device arrays are copied, then written in the
background). Restores place every array with the shardings of the target
state, so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp

from ease_jax.config import CheckpointConfig
from ease_jax.errors import UserError
from ease_jax.models import DecoderConfig

ITEMS = ("params", "train", "data", "model_config")


class _IteratorState:
  """Adapts an iterator with get_state()/set_state() (JSON-able state) to grain's handler."""

  def __init__(self, iterator: Any):
    self.iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:  # called by grain's handler after restoring
    pass


def _split(state: Any) -> tuple[Any, Any]:
  """TrainState -> (params, the rest with params=None)."""
  return state.params, _replace(state, params=None)


def _replace(state: Any, **changes: Any) -> Any:
  if hasattr(state, "_replace"):  # NamedTuple
    return state._replace(**changes)
  return dataclasses.replace(state, **changes)


def abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of a pytree of arrays (the restore target)."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def with_shardings(tree: Any, shardings: Any) -> Any:
  """Restore target: `tree`'s shapes and dtypes placed on `shardings` (a matching pytree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def model_config_to_json(cfg: DecoderConfig) -> dict:
  return dataclasses.asdict(cfg)


def model_config_from_json(d: dict) -> DecoderConfig:
  """Inverse of `model_config_to_json` (JSON turns tuples into lists)."""
  d = dict(d)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
  return DecoderConfig(**d)


def _manager(directory: Path, cfg: CheckpointConfig | None = None):
  """A manager that saves with `cfg`'s policy, or (cfg None) one that only reads."""
  if cfg is None:
    options = ocp.CheckpointManagerOptions(create=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                           enable_async_checkpointing=cfg.async_save)
  return ocp.CheckpointManager(directory.absolute(), options=options, item_names=ITEMS)


class Checkpointer:
  """Saves every `cfg.every` steps (and when forced), keeps `cfg.keep`, restores the latest."""

  def __init__(self, run_dir: str | Path, cfg: CheckpointConfig):
    self.directory = Path(run_dir) / "checkpoints"
    self.every = cfg.every
    self._mgr = _manager(self.directory, cfg)

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, state: Any, data_iter: Any, model_cfg: DecoderConfig,
           force: bool = False) -> bool:
    """Starts an async save when `step` is due (or `force`); returns whether it saved."""
    if not (force or step % self.every == 0) or step in self._mgr.all_steps():
      return False  # not due, or already saved (the final save right after a periodic one)
    params, rest = _split(state)
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(rest),
        data=grain_ckpt.CheckpointSave(_IteratorState(data_iter)),
        model_config=ocp.args.JsonSave(model_config_to_json(model_cfg)))
    return self._mgr.save(step, args=args, force=True)  # the interval is decided above

  def restore(self, step: int, target_state: Any, data_iter: Any) -> Any:
    """Restores `step` onto the shardings of `target_state`; sets the iterator's state in place."""
    params, rest = _split(target_state)
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(params)),
        train=ocp.args.StandardRestore(abstract(rest)),
        data=grain_ckpt.CheckpointRestore(_IteratorState(data_iter)))
    restored = self._mgr.restore(step, args=args)
    return _replace(restored["train"], params=restored["params"])

  def wait(self) -> None:
    """Blocks until pending async saves are committed."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()


def parse_ckpt_spec(spec: str) -> tuple[Path, int | None]:
  """'RUN_DIR[@STEP]' -> (RUN_DIR, STEP or None for the latest)."""
  run_dir, sep, step = spec.rpartition("@") if "@" in spec else (spec, "", "")
  if sep and not step.isdigit():
    raise UserError(f"ckpt:{spec}: the step after '@' must be an integer, got {step!r}")
  return Path(run_dir), int(step) if sep else None


def _resolve_step(run_dir: Path, step: int | None) -> tuple[Any, int]:
  directory = run_dir / "checkpoints"
  if not directory.is_dir():
    raise UserError(f"no checkpoints under {directory} (is {run_dir} a training run_dir?)")
  mgr = _manager(directory)
  steps = list(mgr.all_steps())
  if not steps:
    raise UserError(f"{directory}: no finished checkpoint")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise UserError(f"{directory}: no checkpoint at step {step}; available: {sorted(steps)}")
  return mgr, step


def read_model_config(run_dir: str | Path, step: int | None = None) -> tuple[DecoderConfig, int]:
  """The DecoderConfig stored with a checkpoint (latest when `step` is None) and its step."""
  mgr, step = _resolve_step(Path(run_dir), step)
  meta = mgr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
  return model_config_from_json(meta["model_config"]), step


def restore_params(run_dir: str | Path, step: int, target_params: Any) -> Any:
  """Only the parameters of a checkpoint, placed with `target_params`' shardings."""
  mgr, step = _resolve_step(Path(run_dir), step)
  args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract(target_params)))
  return mgr.restore(step, args=args)["params"]


def load_model(run_dir: str | Path, step: int | None = None, mesh: Any = None,
               **numerics: Any) -> tuple[Any, DecoderConfig, int]:
  """A checkpoint's model (parameters only) on `mesh` (default: the first device).

  `numerics` override DecoderConfig fields such as compute_dtype or remat.
  """
  from flax import nnx

  from ease_jax import sharding
  from ease_jax.config import MeshConfig
  from ease_jax.models import Decoder

  model_cfg, step = read_model_config(run_dir, step)
  model_cfg = model_cfg.replace(**numerics)
  mesh = mesh or sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0))),
                                     nnx.Param, ...)
  target = with_shardings(params, sharding.param_shardings(mesh, params))
  return nnx.merge(graphdef, restore_params(run_dir, step, target), rest), model_cfg, step

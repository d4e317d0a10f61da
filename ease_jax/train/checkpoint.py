"""Orbax checkpoints: params, optimizer state, step, RNG and the data-iterator state.

Layout: ``RUN_DIR/checkpoints/<step>/`` with four Orbax items:

  params        the model parameters (nnx.State), on their own so phase 2 and
                export can read them without the optimizer state
  train         the rest of the train state (step, optimizer state, RNG)
  data          the grain iterator state, one JSON file per process
                (grain's own Orbax handler: each host resumes its own shard)
  model_config  the DecoderConfig as JSON, so a checkpoint rebuilds its model
  meta          JSON: checksums of every other item and of itself (ckpt_verify: checked
                on restore; a step without them is not trusted) and loop counters that
                must survive a resume (skipped non-finite steps)

Saves are asynchronous (device arrays are copied, then written in the
background). Orbax writes a step to ``<step>.orbax-checkpoint-tmp-*`` and renames
it to ``<step>`` only when every item is written, so a save cut short by a kill
is never listed as a step; such leftovers are deleted when the next run starts.
A state holding NaN/Inf is never saved. Restores place every array with the
shardings of the target state, so a checkpoint written on one mesh restores
onto another. `restore_latest` falls back to the newest step that restores and
verifies, and moves the damaged newer steps aside, naming what was wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ease_jax import sharding
from ease_jax.config import CheckpointConfig, MeshConfig
from ease_jax.errors import UserError
from ease_jax.models import Decoder, DecoderConfig
from ease_jax.train import ckpt_errors
from ease_jax.train import ckpt_verify as verify

ITEMS = ("params", "train", "data", "model_config", "meta")
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a step still being written
DAMAGED_DIR = "checkpoints.damaged"  # under RUN_DIR: steps that failed to restore


class CheckpointError(UserError):
  """No checkpoint of the run can be restored; the message lists each step's problem."""


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (disk full, permissions): names the step and cause."""


class NonFiniteStateError(RuntimeError):
  """The state to save holds NaN/Inf (never written)."""


class _IteratorState:
  """Adapts an iterator with get_state()/set_state() (JSON-able state) to grain's handler.

  Saving: the state is taken once, when the save starts (the iterator moves on while the
  save is written) and checksummed. Restoring: the bytes read are kept for verification.
  """

  def __init__(self, iterator: Any, snapshot: bool = False):
    self.iterator = iterator
    self.state = json.dumps(iterator.get_state()).encode() if snapshot else None

  def get_state(self) -> bytes:
    return self.state

  def set_state(self, state: bytes) -> None:
    self.state = state
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


def _require_meta(step_dir: Path) -> None:
  """ValueError when a step has no `meta` item: without checksums it is not trusted."""
  if not (step_dir / "meta").is_dir():
    raise ValueError(f"{step_dir.name}/meta is missing: no checksums to verify the step with "
                     "(a step that cannot be verified is not trusted)")


def _all_processes(flag: bool) -> bool:
  """`flag` and-ed over processes, so every host takes the same branch."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.asarray(flag)).all())


def _unique(path: Path) -> Path:
  n, out = 1, path
  while out.exists():
    out, n = path.with_name(f"{path.name}-{n}"), n + 1
  return out


def unfinished_writes(directory: Path) -> list[str]:
  """Names of step directories whose write was cut short (orbax never lists them)."""
  if not directory.is_dir():
    return []
  return sorted(p.name for p in directory.iterdir() if TMP_MARK in p.name)


def set_aside(run_dir: str | Path) -> Path | None:
  """Moves a run's checkpoints and metrics into RUN_DIR/previous-<time>/ (for --fresh)."""
  run_dir = Path(run_dir)
  names = [n for n in ("checkpoints", "metrics.jsonl", "tensorboard") if (run_dir / n).exists()]
  if not names:
    return None
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  dest = _unique(run_dir / f"previous-{stamp}")
  if jax.process_index() == 0:
    dest.mkdir(parents=True)
    for n in names:
      (run_dir / n).rename(dest / n)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ease_jax.train.checkpoint.set_aside")
  return dest


@dataclasses.dataclass
class Restored:
  """What `Checkpointer.restore_latest` found."""
  state: Any
  step: int
  meta: dict
  problems: list[str]  # one line per damaged newer step that was set aside


def _manager(directory: Path, cfg: CheckpointConfig | None = None):
  """A manager that saves with `cfg`'s policy, or (cfg None) one that only reads."""
  if cfg is None:
    options = ocp.CheckpointManagerOptions(create=False)
  else:
    # cleanup_tmp_directories: a write cut short by a kill leaves <step>.orbax-checkpoint-tmp-*
    # behind; orbax never lists it as a step, and this deletes it when the next run starts.
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                           enable_async_checkpointing=cfg.async_save,
                                           cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory.absolute(), options=options, item_names=ITEMS)


class Checkpointer:
  """Saves every `cfg.every` steps (and when forced), keeps `cfg.keep`, restores the latest."""

  def __init__(self, run_dir: str | Path, cfg: CheckpointConfig):
    self.directory = Path(run_dir) / "checkpoints"
    self.every = cfg.every
    self._mgr = _manager(self.directory, cfg)
    self._pending: list[int] = []  # saved steps whose write is not yet known to be committed

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, state: Any, data_iter: Any, model_cfg: DecoderConfig,
           force: bool = False, counters: dict[str, int] | None = None) -> bool:
    """Starts an async save when `step` is due (or `force`); returns whether it saved.

    Raises NonFiniteStateError (and writes nothing) when the state holds NaN/Inf.
    `counters` (e.g. skipped_steps) are stored in the meta item and come back on restore.
    """
    if not (force or step % self.every == 0) or step in self._mgr.all_steps():
      return False  # not due, or already saved (the final save right after a periodic one)
    params, rest = _split(state)
    sums_p, bad_p = verify.fingerprint(params)
    sums_r, bad_r = verify.fingerprint(rest)
    if bad_p or bad_r:
      raise NonFiniteStateError(f"the train state at step {step} holds NaN/Inf in "
                                f"{(bad_p + bad_r)[0]}; it was not saved")
    data, model_json = _IteratorState(data_iter, snapshot=True), model_config_to_json(model_cfg)
    meta = verify.seal({"checksums": {"params": sums_p, "train": sums_r,
                                      "data": verify.data_checksums(data.state),
                                      "model_config": verify.json_sha256(model_json)},
                        "counters": dict(counters or {})})
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(rest),
        data=grain_ckpt.CheckpointSave(data), model_config=ocp.args.JsonSave(model_json),
        meta=ocp.args.JsonSave(meta))
    with self._write_errors(step):
      saved = self._mgr.save(step, args=args, force=True)  # the interval is decided above
    if saved:
      self._pending.append(step)
    return saved

  @contextlib.contextmanager
  def _write_errors(self, step: int | None = None) -> Iterator[None]:
    """A failed write (raised by orbax now or at the next save/wait) -> CheckpointWriteError."""
    try:
      yield
    except Exception as e:  # orbax re-raises the background writer's error, whatever it is
      step = self._pending[0] if self._pending else step
      raise CheckpointWriteError(
          f"checkpoint step {step} could not be written to {self.directory} "
          f"({ckpt_errors.write_cause(e)}); the steps before it are intact") from None

  def committed(self, wait: bool = False) -> list[int]:
    """Saved steps whose write has committed since the last call (`wait`: block for them).

    Raises CheckpointWriteError when a background write failed (e.g. the disk is full).
    """
    if not self._pending or (not wait and self._mgr.is_saving_in_progress()):
      return []
    with self._write_errors():
      self._mgr.wait_until_finished()
    done, self._pending = self._pending, []
    return done

  def restore(self, step: int, target_state: Any, data_iter: Any) -> tuple[Any, dict]:
    """Restores and verifies `step` onto the shardings of `target_state`; sets the
    iterator's state in place. Returns (state, meta)."""
    params, rest = _split(target_state)
    data = _IteratorState(data_iter)
    _require_meta(self.directory / str(step))
    restored = self._mgr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(params)),
        train=ocp.args.StandardRestore(abstract(rest)), data=grain_ckpt.CheckpointRestore(data),
        model_config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    meta = verify.open_meta(restored["meta"])
    sums = meta["checksums"]
    verify.verify_arrays("params", restored["params"], sums["params"])
    verify.verify_arrays("train", restored["train"], sums["train"])
    verify.verify_data(sums["data"], data.state)
    verify.verify_model_config(sums["model_config"], restored["model_config"])
    return _replace(restored["train"], params=restored["params"]), meta

  def restore_latest(self, target_state: Any, data_iter: Any) -> Restored | None:
    """The newest step that restores and verifies, or None when there is no step.

    Newer steps that fail are moved to RUN_DIR/checkpoints.damaged/ (so training can save
    those steps again) and named in `problems`. When every step fails, nothing is moved
    and CheckpointError lists why: the usual cause is a changed model or data config.
    """
    problems: list[tuple[int, str]] = []
    for step in sorted(self._mgr.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, target_state, data_iter)
        ok, why = True, ""
      except Exception as e:  # any library error on damaged files means: this step is unusable
        ok, why = False, ckpt_errors.describe(e)
      if not _all_processes(ok):
        problems.append((step, why or "failed to restore on another process"))
        continue
      return Restored(state, step, meta, self._set_aside_damaged(problems))
    if problems:
      lines = "; ".join(f"step {s}: {why}" for s, why in problems)
      raise CheckpointError(
          f"no checkpoint under {self.directory} can be restored ({lines}). If the model, "
          f"tokenizer or data config changed, use a new run_dir; to start this run over, pass "
          f"--fresh (moves the old checkpoints aside) or delete {self.directory}")
    return None

  def _set_aside_damaged(self, problems: list[tuple[int, str]]) -> list[str]:
    lines = []
    for step, why in problems:
      dest = _unique(self.directory.parent / DAMAGED_DIR / str(step))
      if jax.process_index() == 0:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(dest))
      lines.append(f"checkpoint step {step} is damaged ({why}); moved to {dest}")
    if problems:
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ease_jax.train.checkpoint.set_aside_damaged")
      self._mgr.reload()
    return lines

  def wait(self) -> None:
    """Blocks until pending async saves are committed."""
    with self._write_errors():
      self._mgr.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
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
  step_dir = Path(run_dir) / "checkpoints" / str(step)
  try:
    _require_meta(step_dir)
    items = mgr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore(),
                                                      meta=ocp.args.JsonRestore()))
    sums = verify.open_meta(items["meta"])["checksums"]
    verify.verify_model_config(sums["model_config"], items["model_config"])
  except Exception as e:  # damaged files surface as many library errors; name the step
    raise UserError(f"{step_dir}: the checkpoint cannot be read ({ckpt_errors.describe(e)}); pick another "
                    f"step with RUN_DIR@STEP") from None
  return model_config_from_json(items["model_config"]), step


def restore_params(run_dir: str | Path, step: int, target_params: Any) -> Any:
  """Only the parameters of a checkpoint, placed with `target_params`' shardings."""
  mgr, step = _resolve_step(Path(run_dir), step)
  step_dir = Path(run_dir) / "checkpoints" / str(step)
  try:
    _require_meta(step_dir)
    restored = mgr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(target_params)), meta=ocp.args.JsonRestore()))
    sums = verify.open_meta(restored["meta"])["checksums"]
    verify.verify_arrays("params", restored["params"], sums["params"])
  except Exception as e:  # damaged files surface as many library errors; name the step
    raise UserError(f"{step_dir}: the checkpoint cannot be read ({ckpt_errors.describe(e)}); pick another "
                    f"step with RUN_DIR@STEP") from None
  return restored["params"]


def load_model(run_dir: str | Path, step: int | None = None, mesh: Any = None,
               **numerics: Any) -> tuple[Any, DecoderConfig, int]:
  """A checkpoint's model (parameters only) on `mesh` (default: the first device).

  `numerics` override DecoderConfig fields such as compute_dtype or remat. A stored
  attention kernel that does not run here (cudnn off NVIDIA GPUs, splash off TPUs: a run
  trained on a GPU, exported or evaluated on a CPU) becomes xla, which computes the same.
  """
  from flax import nnx


  model_cfg, step = read_model_config(run_dir, step)
  if "attention" not in numerics and not sharding.attention_runs_here(model_cfg.attention):
    numerics = {**numerics, "attention": "xla"}
  model_cfg = model_cfg.replace(**numerics)
  mesh = mesh or sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0))),
                                     nnx.Param, ...)
  target = with_shardings(params, sharding.param_shardings(mesh, params))
  return nnx.merge(graphdef, restore_params(run_dir, step, target), rest), model_cfg, step

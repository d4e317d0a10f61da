"""The training loop: set up, resume, step, log one step behind, evaluate, checkpoint.

The host dispatches step N and only then reads step N-1's metrics, so it never
waits for the device except at evaluation and checkpoint steps (where it must:
a checkpoint is only written after its step's loss was seen to be finite). With
train.steps_per_call=K a "step" here is a call of K steps between boundaries.

Preemption: SIGTERM (and a first Ctrl-C) sets a flag that the loop checks between
steps; it then saves a checkpoint, waits for it to be written, and returns with
`TrainResult.stopped_by` set (launch/train.py exits 128 + the signal number). On
several processes the JAX preemption service picks the step at which all save.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ease_jax import batch as batch_lib
from ease_jax import config as config_lib
from ease_jax import init_from as init
from ease_jax import sharding
from ease_jax.config import Config
from ease_jax.console import get_logger
from ease_jax.data import report as data_report
from ease_jax.data.pipeline import Pipeline
from ease_jax.errors import ConfigError, DataError
from ease_jax.models import DecoderConfig
from ease_jax.train import behavior, checkpoint, optim, runlock
from ease_jax.train import loss as loss_lib
from ease_jax.train import step as step_lib
from ease_jax.train.checkpoint import Checkpointer

# NonFiniteLossError is re-exported: launch/train.py catches loop.NonFiniteLossError.
from ease_jax.train.logger import Logger, NonFiniteLossError, present_losses  # noqa: F401
from ease_jax.train.signals import StopSignals

log = get_logger(__name__)
StepFn = Callable[[step_lib.TrainState, dict], tuple]  # (state, batch) -> (state, metrics)
EvalFn = Callable[[step_lib.TrainState, dict], dict]  # (state, batch) -> eval sums
BehaviorFn = Callable[[int, Any], dict[str, float]]  # (step, params) -> generation metrics


@dataclasses.dataclass
class TrainResult:
  """What a finished (or stopped) run leaves behind."""
  run_dir: Path
  step: int
  total_steps: int
  last_metrics: dict[str, float]
  skipped_steps: int = 0
  is_primary: bool = True
  stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal ended the run early

  def summary(self) -> str:
    if self.stopped_by:
      return (f"stopped by {self.stopped_by} after step {self.step}/{self.total_steps}; "
              f"checkpoint step {self.step} is in {self.run_dir / 'checkpoints'}; run the "
              f"same command again to resume")
    loss = self.last_metrics.get("loss/total")
    lines = [f"finished step {self.step}/{self.total_steps}"
             + (f", loss {loss:.4f}" if loss is not None else "")
             + (f", {self.skipped_steps} non-finite steps skipped" if self.skipped_steps else "")]
    lines += [f"  {line}" for line in where_lines(self.run_dir)]
    return "\n".join(lines)


def where_lines(run_dir: Path) -> list[str]:
  """Where a run writes its outputs (printed at the start and the end)."""
  return [f"run dir:     {run_dir}", f"checkpoints: {run_dir / 'checkpoints'}",
          f"metrics:     {run_dir / 'metrics.jsonl'}",
          f"tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}"]


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built once by `setup`."""
  cfg: Config
  run_dir: Path
  mesh: Mesh
  model_cfg: DecoderConfig
  state: step_lib.TrainState
  train_fn: StepFn  # one step
  train_calls: StepFn | None  # train.steps_per_call steps per call (None when that is 1)
  eval_fn: EvalFn | None  # None without eval data
  train_data: Pipeline
  eval_data: Pipeline | None
  data_iter: Iterator[dict[str, np.ndarray]]
  ckpt: Checkpointer
  total_steps: int
  start_step: int
  skipped_steps: int = 0  # non-finite steps skipped before start_step (from the checkpoint)
  notes: tuple[str, ...] = ()  # what resuming had to work around, printed at the start
  behavior: BehaviorFn | None = None  # generation-based eval (behavior.file), if configured
  data_report: data_report.DataReport | None = None  # rows read/bad/overlong/kept per source


def per_process_batch(cfg: Config, mesh: Any) -> int:
  """train.batch_size split over processes, checked against the data-parallel devices."""
  B, procs = cfg.train.batch_size, jax.process_count()
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if B % dp or B % procs:
    unit = math.lcm(dp, procs)
    raise ConfigError(f"train.batch_size={B} must be a multiple of the data-parallel devices "
                      f"(mesh.data x mesh.fsdp = {dp}) and of the {procs} process(es); set "
                      f"train.batch_size to a multiple of {unit} (e.g. "
                      f"{max(unit, B // unit * unit)}) or change the mesh")
  return B // procs


def make_pipeline(cfg: Config, tokenizer: Any, split: str, batch: int) -> Pipeline:
  return Pipeline(cfg.data, tokenizer, seq_len=cfg.train.seq_len, batch_size=batch,
                  seed=cfg.train.seed, split=split, shard_index=jax.process_index(),
                  shard_count=jax.process_count())


def total_steps(cfg: Config, data: Pipeline) -> int:
  """train.steps, or train.epochs x the (estimated) batches per epoch, agreed by all hosts."""
  if cfg.train.steps:
    return cfg.train.steps
  n = math.ceil(cfg.train.epochs * data.num_batches_per_epoch())
  if jax.process_count() > 1:  # the estimate is per shard; every host must run the same steps
    n = int(multihost_utils.broadcast_one_to_all(np.int64(n)))
  if n <= 0:
    raise DataError("data.train yields no batches (every example dropped?); check the sources")
  return n


def place(tree: Any, shardings: Any) -> Any:
  """Puts a pytree on `shardings`, from host-identical local arrays or from global ones."""
  def one(x, s):
    if jax.process_count() > 1 and getattr(x, "is_fully_addressable", True):
      return sharding.put(x, s)
    return jax.device_put(x, s)
  return jax.tree.map(one, tree, shardings)


def to_global(local: dict[str, np.ndarray], mesh: Any,
              stacked: bool = False) -> dict[str, jax.Array]:
  """Per-process numpy rows -> one global batch split over (data, fsdp); `stacked`: the
  batches of several steps, [steps, B, T]."""
  s = sharding.batch_sharding(mesh, stacked)
  return {k: jax.make_array_from_process_local_data(s, v) for k, v in local.items()}


def _prepare_run_dir(cfg: Config, tokenizer: Any) -> Path:
  run_dir = Path(cfg.run_dir)
  if jax.process_index() == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_lib.dump_yaml(cfg), encoding="utf-8")
    tokenizer.save_pretrained(str(run_dir / init.TOKENIZER_DIR))  # for phase 2 and export
  return run_dir


def _resume(ckpt: Checkpointer, state: Any, data_iter: Any) -> tuple[Any, int, int, list[str]]:
  """(state, start step, skipped steps so far, problems) from the newest usable checkpoint."""
  restored = ckpt.restore_latest(state, data_iter)
  if restored is None:
    return state, 0, 0, []
  skipped = int(restored.meta.get("counters", {}).get("skipped_steps", 0))
  return restored.state, restored.step, skipped, restored.problems


def setup(cfg: Config, fresh: bool = False) -> Run:
  """Tokenizer, data, model, optimizer, compiled steps; restores the latest usable checkpoint.

  `fresh` first moves an existing run's checkpoints and metrics to RUN_DIR/previous-<time>/.
  """
  mesh = sharding.make_mesh(cfg.mesh)
  batch = per_process_batch(cfg, mesh)
  tokenizer = init.load_run_tokenizer(cfg)
  run_dir = _prepare_run_dir(cfg, tokenizer)
  notes = []
  if fresh and (moved := checkpoint.set_aside(run_dir)):
    notes.append(f"--fresh: moved the previous checkpoints and metrics to {moved}")
  train_data = make_pipeline(cfg, tokenizer, "train", batch)
  eval_data = make_pipeline(cfg, tokenizer, "eval", batch) if cfg.data.eval else None
  # Before anything is trained: a source that loses too much, or an empty split, stops here.
  report = data_report.check(cfg, [p for p in (train_data, eval_data) if p is not None])
  steps = total_steps(cfg, train_data)
  model, model_cfg = init.init_model(cfg, len(tokenizer), mesh)
  tx = optim.make_optimizer(cfg.train, steps)
  graphdef, state = step_lib.init_state(model, tx, cfg.train.seed)
  state = place(state, step_lib.state_shardings(mesh, state))
  data_iter = iter(train_data)
  unfinished = checkpoint.unfinished_writes(run_dir / "checkpoints")  # the manager deletes them
  if unfinished:
    notes.append(f"ignoring {len(unfinished)} unfinished checkpoint write(s) of an interrupted "
                 f"run: {', '.join(unfinished)}")
  ckpt = Checkpointer(run_dir, cfg.checkpoint)
  state, start, skipped, problems = _resume(ckpt, state, data_iter)
  schedule = optim.make_schedule(cfg.train, steps)
  train_fn = step_lib.compile_train_step(graphdef, tx, cfg, mesh, state, schedule)
  calls = cfg.train.steps_per_call
  train_calls = (step_lib.compile_train_step(graphdef, tx, cfg, mesh, state, schedule, calls)
                 if calls > 1 else None)  # each compiles at its first use
  eval_fn = step_lib.compile_eval_step(graphdef, cfg, mesh, state) if eval_data else None
  behave = behavior.make(cfg, graphdef, state.params, model_cfg, tokenizer, mesh, run_dir)
  return Run(cfg, run_dir, mesh, model_cfg, state, train_fn, train_calls, eval_fn, train_data,
             eval_data, data_iter, ckpt, steps, start, skipped, tuple(notes + problems), behave,
             report)


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def evaluate(run: Run, state: step_lib.TrainState) -> dict[str, float]:
  """Per-objective loss over one pass of data.eval: sums over every batch, then divided."""
  totals: dict[str, np.ndarray] = {}
  it, template = iter(run.eval_data), None
  while True:
    local = next(it, None)
    # Hosts may hold different numbers of eval batches; all run until the last one is done.
    if not _any_process(local is not None):
      break
    template = local if local is not None else template
    local = local if local is not None else {k: np.zeros_like(v) for k, v in template.items()}
    sums = jax.device_get(run.eval_fn(state, to_global(local, run.mesh)))
    totals = {k: totals.get(k, 0) + np.asarray(v, np.float64) for k, v in sums.items()}
  if not totals:  # no eval batch at all (start-up refuses such an eval set; never crash here)
    return {}
  _, out = loss_lib.finalize({k: jnp.asarray(v, jnp.float32) for k, v in totals.items()},
                             run.cfg.loss)
  return present_losses({f"eval/{k}": float(v) for k, v in out.items()}, prefix="eval/")


def _announce(run: Run) -> None:
  if jax.process_index() != 0:
    return
  mesh = dict(run.mesh.shape)
  what = "resuming from step" if run.start_step else "starting at step"
  log.info(f"{what} {run.start_step} of {run.total_steps}; model "
           f"{run.model_cfg.num_params():,} params; {jax.device_count()} "
           f"{jax.devices()[0].platform} device(s), mesh {mesh}; {jax.process_count()} process(es)")
  for line in where_lines(run.run_dir):
    log.info(f"  {line}")
  for line in run.data_report.lines if run.data_report else ():
    log.info(f"  {line}")
  for note in run.notes:  # damaged or unfinished checkpoints that resuming worked around
    log.warning(note)
  for warning in run.data_report.warnings if run.data_report else ():
    log.warning(warning)


def _boundary(run: Run, logger: Logger, step: int, metrics: dict, last: int,
              stop: bool = False) -> None:
  """An eval and/or checkpoint step: read the metrics (NaN guard), evaluate, then save.

  `stop` (a preemption): save this step whatever the schedule says, and wait for the write.
  """
  cfg = run.cfg
  *before, (_, scalars) = logger.read(step, metrics)
  for at, earlier in before:
    logger.write(at, earlier)
  eval_due = run.eval_data is not None and (
      step == run.total_steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0))
  if eval_due and (losses := evaluate(run, run.state)):
    scalars |= losses
    if not math.isfinite(losses["eval/loss/total"]):  # finite parameters, a broken model
      logger.raise_nonfinite(step, f"the eval loss became {losses['eval/loss/total']}",
                             skippable=False)
    logger.progress.message(f"step {step}: eval loss {scalars['eval/loss/total']:.4f}")
  elif eval_due:
    logger.progress.message(f"step {step}: warning: data.eval yielded no batch; eval skipped")
  if run.behavior is not None and behavior.due(cfg, step, run.total_steps):
    scalars |= run.behavior(step, run.state.params)
    logger.progress.message(f"step {step}: reasoning rate per class "
                            f"{behavior.summary(scalars)}")
    eval_due = True
  logger.write(step, scalars, force=eval_due)
  try:
    saved = run.ckpt.save(step, run.state, run.data_iter, run.model_cfg,
                          force=stop or step == last, counters={"skipped_steps": logger.skipped})
  except checkpoint.NonFiniteStateError as e:
    logger.raise_nonfinite(step, str(e), skippable=False)
  if saved and "param_norm" in scalars:
    logger.saved_norms[step] = scalars["param_norm"]  # named if the run diverges later
  # A preemption (the process may be killed soon after) or the last step: write it now.
  _report_saved(run, logger, wait=stop or step == last)
  logger.throughput.reset()  # eval and checkpoint time is not training throughput


def _report_saved(run: Run, logger: Logger, wait: bool = False) -> None:
  """Says "checkpoint saved" for the steps whose write has committed (`wait`: all of them)."""
  for step in run.ckpt.committed(wait=wait):
    logger.progress.message(f"step {step}: checkpoint saved to {run.ckpt.directory / str(step)}")


def _is_boundary(run: Run, step: int, last: int) -> bool:
  every = run.cfg.train.eval_every
  return (step == last or step % run.cfg.checkpoint.every == 0
          or bool(run.eval_data and every and step % every == 0)
          or (run.behavior is not None and behavior.due(run.cfg, step, run.total_steps)))


def _call_steps(run: Run, step: int, last: int) -> int:
  """How many steps the next call runs after `step`: train.steps_per_call when no eval,
  checkpoint or behavior boundary (nor `last`) comes before its end, else 1."""
  n = run.cfg.train.steps_per_call
  if n == 1 or step + n > last:
    return 1
  return 1 if any(_is_boundary(run, s, last) for s in range(step + 1, step + n)) else n


def run_steps(run: Run, logger: Logger, last: int, signals: StopSignals | None = None) -> int:
  """Steps start+1..last, train.steps_per_call per call where no boundary intervenes; a
  call's metrics are read after the next call is dispatched.

  Returns the last step run: earlier than `last` when `signals` asked to stop.
  """
  padding = jax.jit(lambda seg: jnp.mean(seg == 0, axis=(-2, -1)),
                    out_shardings=sharding.replicated(run.mesh))
  pending, step = None, run.start_step
  while step < last:
    n = _call_steps(run, step, last)
    if n == 1:
      batch = to_global(next(run.data_iter), run.mesh)
      run.state, metrics = run.train_fn(run.state, batch)
    else:
      local = [next(run.data_iter) for _ in range(n)]
      batch = to_global(batch_lib.stack(local), run.mesh, stacked=True)
      run.state, metrics = run.train_calls(run.state, batch)
    step += n
    metrics["padding_fraction"] = padding(batch["segment_ids"])
    if pending:
      logger.log(*pending)
    pending = (step, metrics)
    # Every step is reported: the preemption service may pick any step to stop after.
    stop = signals is not None and any([signals.requested(s)
                                        for s in range(step - n + 1, step + 1)])
    if stop or _is_boundary(run, step, last):
      _boundary(run, logger, step, metrics, last, stop=stop)
      pending = None
    if stop:
      return step
  return last


def train(cfg: Config, stop_at: int | None = None, fresh: bool = False) -> TrainResult:
  """Trains per `cfg`, resuming from RUN_DIR's latest usable checkpoint when there is one.

  `stop_at` ends the run after that step with a checkpoint, as a preemption would
  (used by tests; the schedule still spans all steps). `fresh` sets an existing run's
  checkpoints and metrics aside and starts at step 0. SIGTERM or Ctrl-C checkpoint
  and stop after the current step (`TrainResult.stopped_by`).
  """
  with StopSignals() as signals, runlock.RunDirLock(cfg.run_dir) as lock:
    run = setup(cfg, fresh=fresh)
    run.notes = (*lock.warnings, *run.notes)
    logger = Logger(run)
    last = min(run.total_steps, stop_at or run.total_steps)
    try:
      _announce(run)
      if run.start_step < last:
        last = run_steps(run, logger, last, signals)
      elif jax.process_index() == 0:
        log.info(f"nothing to do: {run.run_dir} is already at step {run.start_step}")
    finally:
      run.ckpt.close()
      logger.close()
      run.data_iter.close()  # stops the pipeline's prefetch thread
    stopped = signals.received if last < min(run.total_steps, stop_at or run.total_steps) else None
  return TrainResult(run.run_dir, max(last, run.start_step), run.total_steps, logger.last,
                     logger.skipped, jax.process_index() == 0, stopped)

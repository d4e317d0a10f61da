#!/usr/bin/env python
"""Train an EASE phase (or the demo) from a config file and dotted overrides.

  python launch/train.py [run_dir=DIR] [key=value ...]     # the whole EASE demo (tiny, CPU)
  python launch/train.py --config configs/demo.yaml        # one training run on the demo data
  python launch/train.py --config configs/qwen2.5-0.5b_phase1.yaml train.steps=100 run_dir=runs/x

Running the same command again resumes from the run's latest checkpoint (a damaged
latest step falls back to the one before, with a warning). A run_dir that holds
checkpoints is never silently restarted from scratch: pass --fresh to move its
checkpoints and metrics to RUN_DIR/previous-<time>/ and start at step 0.

Exit codes: 0 done; 1 the loss or parameters became NaN/Inf (the message names
the step and the last good checkpoint); 2 a config, data or checkpoint error
(one line, no traceback); 3 a multi-process run lost one of its processes (killed,
crashed: the others stop instead of waiting in a collective; restart all of them to
resume); 128+N stopped by signal N (SIGTERM: 143, Ctrl-C: 130) after writing a
checkpoint of the last finished step - rerun the command to resume. SIGTERM sent to
one process of a multi-process run stops all of them at the same step (JAX's
preemption service). A run_dir in use by another run is refused (exit 2).

Multi-host: on a TPU VM slice every worker runs the same command and
jax.distributed is initialised automatically. Elsewhere (GPU hosts, tests) pass
--coordinator HOST:PORT --num_processes N --process_id I on each process, or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(ROOT))

CONFIG_DIR = ROOT / "configs"
LOST_PEER = 3  # exit code: a multi-process run lost one of its processes
TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
                "MEGASCALE_COORDINATOR_ADDRESS")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default=None,
                 help="YAML config; without it the whole demo runs (configs/demo_phase{1,2}.yaml: "
                      "phase 1, phase 2, evaluation, export)")
  p.add_argument("--fresh", action="store_true",
                 help="start at step 0 even if run_dir holds checkpoints (they and the metrics "
                      "are moved to RUN_DIR/previous-<time>/)")
  p.add_argument("--eval_max_new_tokens", type=int, default=512,
                 help="the demo's evaluation generation length")
  p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                 help="config overrides, e.g. train.steps=10 mesh.fsdp=4")
  p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                 help="HOST:PORT of process 0 (multi-process runs outside TPU VMs)")
  p.add_argument("--num_processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
  p.add_argument("--process_id", type=int, default=_env_int("JAX_PROCESS_ID"))
  p.add_argument("--heartbeat_timeout", type=int, default=100,
                 help="seconds without a heartbeat after which the coordinator declares a "
                      "process dead and the others stop (with --coordinator)")
  return p.parse_args(argv)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def on_tpu_vm() -> bool:
  """A Cloud TPU VM (or GKE TPU pod): TPU env vars or TPU chips in /dev."""
  return (any(os.environ.get(v) for v in TPU_ENV_VARS)
          or bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def init_distributed(args: argparse.Namespace) -> None:
  """jax.distributed.initialize for explicit multi-process runs and TPU VMs; else nothing."""
  import jax
  from ease_jax.errors import UserError

  explicit = (args.coordinator, args.num_processes, args.process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise UserError("multi-process runs need all of --coordinator, --num_processes and "
                      "--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                      "JAX_PROCESS_ID)")
    # CPU processes need a cross-process collectives backend; it does not affect GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               heartbeat_timeout_seconds=args.heartbeat_timeout,
                               shutdown_timeout_seconds=args.heartbeat_timeout)
  elif on_tpu_vm():
    jax.distributed.initialize()  # the TPU environment names the coordinator and workers


def lost_peer(err: Exception) -> None:
  """A collective failed on a multi-process run: another process died or was killed.

  Prints one line and exits with LOST_PEER at once: jax.distributed's exit handler would
  wait `--shutdown_timeout` for the dead process. The checkpoints written so far are
  complete (a step is renamed into place only when fully written)."""
  import jax
  print(f"error: process {jax.process_index()}: a collective with the other processes failed "
        f"({' '.join(str(err).split())[:300]}); another process of this run probably died or "
        f"was killed. Start all processes again to resume from the last checkpoint",
        file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(LOST_PEER)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  from ease_jax.ckpt_errors import quiet_orbax_noise
  from ease_jax.config import load_config
  from ease_jax.errors import UserError
  quiet_orbax_noise()
  try:
    if args.config is None:
      if any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
        raise UserError("the demo runs in one process; multi-process runs need --config FILE")
      if args.fresh:
        raise UserError("--fresh applies to one training run (--config FILE); to start the demo "
                        "over, delete its run_dir")
      from ease_jax.demo import run_demo
      run_demo(CONFIG_DIR, args.overrides, args.eval_max_new_tokens)
      return 0
    cfg = load_config(args.config, args.overrides)
    init_distributed(args)
    import jax
    from ease_jax.train import loop  # after distributed init, before any device use
    try:
      result = loop.train(cfg, fresh=args.fresh)
    except loop.NonFiniteLossError as e:  # a diverged run, not a bug: no traceback
      print(f"error: {e}", file=sys.stderr)
      return 1
    except jax.errors.JaxRuntimeError as e:
      if jax.process_count() == 1:
        raise
      lost_peer(e)
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    ckpt = sys.modules.get("ease_jax.checkpoint")  # loaded if a checkpoint was being written
    if ckpt is not None and isinstance(e, ckpt.CheckpointWriteError):
      # orbax's writer threads and their asyncio tasks would print their own tracebacks of the
      # same failure while the interpreter shuts down: the one line above says it all.
      sys.stdout.flush()
      os._exit(2)
    return 2
  except KeyboardInterrupt:
    print("interrupted; run the same command again to resume from the last checkpoint",
          file=sys.stderr)
    return 130
  if result.is_primary:
    print(result.summary(), file=sys.stderr if result.stopped_by else sys.stdout)
  if result.stopped_by:
    return 128 + int(getattr(signal, result.stopped_by))
  return 0


if __name__ == "__main__":
  sys.exit(main())

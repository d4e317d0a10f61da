#!/usr/bin/env python
"""Train an EASE phase (or the demo) from a config file and dotted overrides.

  ease-train [run_dir=DIR] [key=value ...]     # the whole EASE demo (tiny, CPU)
  ease-train --config configs/demo.yaml        # one training run on the demo data
  ease-train --config configs/qwen2.5-0.5b_phase1.yaml train.steps=100 run_dir=runs/x

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
import os
import signal
import sys
from pathlib import Path

from ease_jax import distributed
from ease_jax.distributed import LOST_PEER, init_distributed, lost_peer, on_tpu_vm  # noqa: F401

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the checkout of an editable install


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
  distributed.add_args(p)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  from ease_jax.config import load_config
  from ease_jax.errors import UserError
  from ease_jax.train.ckpt_errors import quiet_orbax_noise
  quiet_orbax_noise()
  try:
    if args.config is None:
      if distributed.explicit(args):
        raise UserError("the demo runs in one process; multi-process runs need --config FILE")
      if args.fresh:
        raise UserError("--fresh applies to one training run (--config FILE); to start the demo "
                        "over, delete its run_dir")
      from ease_jax.demo.run import run_demo
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
    ckpt = sys.modules.get("ease_jax.train.checkpoint")  # loaded if a checkpoint was being written
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


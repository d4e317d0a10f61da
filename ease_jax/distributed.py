"""Multi-process launch shared by training and the generation tools: the command-line flags,
TPU VM auto-detection and `jax.distributed.initialize`.

On a TPU VM slice every worker runs the same command and jax.distributed is initialised
automatically. Elsewhere (GPU hosts, tests) each process gets --coordinator HOST:PORT
--num_processes N --process_id I, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from ease_jax.console import get_logger
from ease_jax.errors import UserError

LOST_PEER = 3  # exit code: a multi-process run lost one of its processes
TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
                "MEGASCALE_COORDINATOR_ADDRESS")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def add_args(p: argparse.ArgumentParser) -> None:
  """Adds --coordinator, --num_processes, --process_id and --heartbeat_timeout to `p`."""
  p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                 help="HOST:PORT of process 0 (multi-process runs outside TPU VMs)")
  p.add_argument("--num_processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
  p.add_argument("--process_id", type=int, default=_env_int("JAX_PROCESS_ID"))
  p.add_argument("--heartbeat_timeout", type=int, default=100,
                 help="seconds without a heartbeat after which the coordinator declares a "
                      "process dead and the others stop (with --coordinator)")


def explicit(args: argparse.Namespace) -> bool:
  """Whether any of the multi-process flags was given."""
  return any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))


def on_tpu_vm() -> bool:
  """A Cloud TPU VM (or GKE TPU pod): TPU env vars or TPU chips in /dev."""
  return (any(os.environ.get(v) for v in TPU_ENV_VARS)
          or bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def init_distributed(args: argparse.Namespace) -> None:
  """jax.distributed.initialize for explicit multi-process runs and TPU VMs; else nothing."""
  import jax

  if explicit(args):
    if any(v is None for v in (args.coordinator, args.num_processes, args.process_id)):
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


def lost_peer(err: Exception, what: str = "resume from the last checkpoint") -> None:
  """A collective failed on a multi-process run: another process died or was killed.

  Logs one `error: ...` line (stderr) and exits with LOST_PEER at once: jax.distributed's
  exit handler would wait `--shutdown_timeout` for the dead process."""
  import jax
  get_logger(__name__).error(
      f"process {jax.process_index()}: a collective with the other processes failed "
      f"({' '.join(str(err).split())[:300]}); another process of this run probably died or "
      f"was killed. Start all processes again to {what}")
  sys.stdout.flush()
  os._exit(LOST_PEER)


def is_primary() -> bool:
  """Process 0 (or the only process): the one that writes shared outputs."""
  import jax
  return jax.process_index() == 0

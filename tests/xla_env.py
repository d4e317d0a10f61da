"""XLA flags for every JAX process the suite starts, in-process or as a subprocess.

The suite's time goes mostly to XLA:CPU compiling small programs that then run for
milliseconds, so tests compile with LLVM's cheap settings: `--xla_backend_optimization_level=0`
and no expensive LLVM passes. The HLO passes (fusion, layout, the program's semantics) are
unchanged; only the generated machine code is less optimized. One tiny train step compiled
in 2.3-3.1 s instead of 4.6-5.7 s on a 2-core AMD EPYC CPU VM; tests/test_evaluate.py with
tests/test_loop.py ran in 173 s instead of 240 s. Benchmarks and users never set these.
"""

from __future__ import annotations

import os

COMPILE_FAST = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test process: the fast-compile flags, plus `devices` fake CPU devices."""
  flags = list(COMPILE_FAST)
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


def set_for_this_process() -> None:
  """Adds the fast-compile flags to this process's XLA_FLAGS (before JAX initialises its
  backend), keeping any flags the caller set, which come last and so win."""
  own = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = " ".join([xla_flags(), own]).strip()

"""XLA flags for every JAX process the suite starts, in-process or as a subprocess.

The suite's time goes mostly to XLA:CPU compiling small programs that then run for
milliseconds, so tests compile cheaply: LLVM's cheap settings (`--xla_backend_optimization_level=0`,
no expensive LLVM passes) and XLA:CPU's older elemental emitters for fused computations instead
of its MLIR fusion emitters (`--xla_cpu_use_fusion_emitters=false`). The HLO passes (fusion,
layout, the program's semantics) are unchanged; only how the machine code is generated, and how
well, differs. On a 2-core AMD EPYC CPU VM one tiny train step compiled in 2.3-3.1 s instead of
4.6-5.7 s with the LLVM settings, and tests/test_model.py with tests/test_step.py ran in 114 s
instead of 159 s with the emitter flag added. Benchmarks and users never set these.
"""

from __future__ import annotations

import os

COMPILE_FAST = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                "--xla_cpu_use_fusion_emitters=false")


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

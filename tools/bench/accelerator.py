"""Train-step throughput and MFU on a GPU or TPU: Qwen2.5-0.5B / 1.5B shapes, packed rows.

  python tools/bench/accelerator.py                       # GPU/TPU: both shapes, all choices
  python tools/bench/accelerator.py --models qwen2.5-1.5b --attention cudnn --remat off
  python tools/bench/accelerator.py --attention splash xla   # TPU: the splash kernel vs. XLA's
  python tools/bench/accelerator.py --profile ...         # + device time by kernel class
  python tools/bench/accelerator.py --smoke               # CPU: a tiny shape, checks it works

Random weights (float32 master copy, bfloat16 compute), the real loss and the real jitted
train step (`ease_jax.train.step.compile_train_step`, AdamW) on packed rows of `--seq-len`
tokens (documents of EASE-like lengths, positions restarting per document). Every
configuration (model x remat x attention; cudnn only on NVIDIA GPUs, splash only on TPUs)
runs in its own subprocess, so its peak device memory (`device.memory_stats()`) is its own
and an out-of-memory error or a crash fails that configuration only (it is retried once at
half the batch, then reported). They run cudnn (GPU) or splash (TPU) first, 1.5B before 0.5B;
two failures in a row (not out of memory) stop the run, since the rest would fail alike. The
whole run stays within `--budget-s` (460 s): a configuration starts only with
`--min-config-s` (60 s; one took 45-57 s on an H200) left, and is stopped at the budget. MFU
uses the training metric's formula: `DecoderConfig.flops_per_token(seq_len) * tokens/s /
(peak bf16 FLOP/s * devices)`, with the peaks of `ease_jax.train.metrics`. Prints a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository root on sys.path)
import numpy as np  # noqa: E402

MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b")
DEFAULT_BATCH = {"qwen2.5-0.5b": 8, "qwen2.5-1.5b": 4, "tiny": 2}  # rows per device
RESULT = "RESULT "
_OOM = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--models", nargs="+", default=list(MODELS))
  ap.add_argument("--seq-len", type=int, default=4096)
  ap.add_argument("--batch-size", type=int, default=0,
                  help="rows per device; 0 = per model (0.5b: 8, 1.5b: 4)")
  ap.add_argument("--remat", nargs="+", choices=("off", "on"), default=["off", "on"])
  ap.add_argument("--attention", nargs="+", choices=("xla", "cudnn", "splash"),
                  default=["cudnn", "splash", "xla"],
                  help="cudnn is used only on NVIDIA GPUs, splash only on TPUs")
  ap.add_argument("--tail-buckets", type=int, default=None,
                  help="train.tail_buckets (default: the config's, -1 = 0 on GPU/TPU); 0 = the "
                       "tail on every position (how the H200 figures in BENCHMARKS.md were "
                       "measured)")
  ap.add_argument("--loss-chunk", type=int, default=0,
                  help="train.loss_chunk: positions per piece of the LM head and cross-entropy "
                       "(0 = all at once, how the H200 figures in BENCHMARKS.md were measured)")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
  ap.add_argument("--budget-s", type=float, default=460.0,
                  help="the whole run's wall-time limit in seconds (under 8 minutes)")
  ap.add_argument("--min-config-s", type=float, default=60.0,
                  help="start a configuration only with this many seconds of budget left")
  ap.add_argument("--profile", action="store_true",
                  help="also trace 2 steps per configuration and report the device time by "
                       "kernel class (matmul, attention, fusion, other) and the top kernels")
  ap.add_argument("--smoke", action="store_true", help="CPU: tiny shape, short rows, 1 step")
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.smoke:
    args.models, args.seq_len, args.steps, args.warmup = ["tiny"], 256, 1, 1
    args.attention = ["xla"]
  return args


def packed_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch in ease_jax.batch's layout: rows packed with documents of EASE-like lengths."""
  rng = np.random.default_rng(seed)
  shape = (batch, seq_len)
  seg, pos = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  weight = np.zeros(shape, np.float32)
  objective = np.zeros(shape, np.int32)
  for r in range(batch):
    t, doc = 0, 1
    while t < seq_len:
      kind = rng.choice(3, p=common.KIND_P)
      n = min(seq_len - t, int(rng.integers(100, 2200 if kind == 0 else 800)))
      prompt = min(n - 1, int(rng.integers(15, 300)))
      seg[r, t:t + n], pos[r, t:t + n] = doc, np.arange(n)
      weight[r, t + prompt:t + n], objective[r, t:t + n] = 1.0, kind
      t, doc = t + n, doc + 1
  tokens = rng.integers(0, vocab, shape, dtype=np.int32)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "segment_ids": seg,
          "positions": pos, "loss_weight": weight, "objective": objective,
          "span": np.ones(shape, np.int32)}


def peak_memory_bytes() -> int | None:
  """The largest peak_bytes_in_use over local devices (None where the backend has no stats)."""
  import jax
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


def measure(model: str, remat: bool, attention: str, batch_per_device: int, seq_len: int,
            steps: int, warmup: int, profile: bool = False,
            tail_buckets: int | None = None, loss_chunk: int = 0) -> dict:
  """One configuration, in this process: compile, warm up, time `steps` steps."""
  import jax
  from flax import nnx
  from ease_jax.train import metrics
  from ease_jax import sharding
  from ease_jax.config import Config, TrainConfig
  from ease_jax.models import Decoder, get_preset
  from ease_jax.train import optim, step as step_lib, tail as tail_lib
  cfg_m = get_preset(model).replace(compute_dtype="bfloat16", param_dtype="float32",
                                    remat=remat, attention=attention)
  ndev = jax.device_count()
  train = TrainConfig(batch_size=batch_per_device * ndev, seq_len=seq_len)
  if tail_buckets is not None:
    train = dataclasses.replace(train, tail_buckets=tail_buckets)
  cfg = Config(train=dataclasses.replace(train, loss_chunk=loss_chunk))
  mesh = sharding.make_mesh(cfg.mesh)
  total = warmup + steps
  tx = optim.make_optimizer(cfg.train, total)
  with jax.set_mesh(mesh):
    model_ = Decoder(cfg_m, rngs=nnx.Rngs(0))
    graphdef, state = step_lib.init_state(model_, tx, 0)
    del model_
    state = jax.device_put(state, step_lib.state_shardings(mesh, state))
    fn = step_lib.compile_train_step(graphdef, tx, cfg, mesh, state,
                                     optim.make_schedule(cfg.train, total))
    host = packed_batch(cfg.train.batch_size, seq_len, cfg_m.vocab_size)
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in host.items()}
    compiled, compile_s = common.timed(lambda: fn.lower(state, batch).compile())
    for _ in range(max(1, warmup)):  # the first call also loads the executable
      state, m = compiled(state, batch)
    float(m["loss/total"])
    start = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, batch)
    loss = float(m["loss/total"])  # waits for the last step
    step_s = (time.perf_counter() - start) / steps
    kernels = None
    if profile:
      kernels = profile_steps(lambda s: compiled(s, batch), state, 2)
  tokens_per_s = cfg.train.batch_size * seq_len / step_s
  flops = cfg_m.flops_per_token(seq_len)
  peak = metrics.peak_flops_per_device()
  mem = compiled.memory_analysis()
  return {"step_s": step_s, "tokens_per_s_per_device": tokens_per_s / ndev,
          "mfu": metrics.mfu(flops, tokens_per_s, ndev, peak), "loss": loss,
          "peak_memory_bytes": peak_memory_bytes(), "compile_s": compile_s,
          "temp_bytes_compiled": getattr(mem, "temp_size_in_bytes", None) if mem else None,
          "batch_per_device": batch_per_device, "devices": ndev, "flops_per_token": flops,
          "tail_buckets": tail_lib.resolve_buckets(cfg.train.tail_buckets),
          "params": cfg_m.num_params(), "device_kind": jax.devices()[0].device_kind,
          "kernels": kernels}


_KERNEL_CLASSES = (("attention", ("fmha", "flash", "cudnn", "attention", "sdpa", "splash")),
                   ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma", "matmul")),
                   ("fusion", ("fusion", "reduce", "convert", "transpose", "copy", "scatter",
                               "gather", "select", "broadcast", "concatenate", "slice")))


def kernel_class(name: str) -> str:
  """A device kernel's class by its name: attention, matmul, fusion (XLA's own) or other."""
  low = name.lower()
  return next((c for c, keys in _KERNEL_CLASSES if any(k in low for k in keys)), "other")


def summarize_trace(events: list[dict], steps: int, top: int = 12) -> dict:
  """Device time per step by kernel class and the `top` kernels, from Chrome-trace events.

  Counts the events on the GPU streams of the device planes (processes named /device:...,
  threads named Stream...), or every device thread where no thread is named so. Also lists
  the process and thread names seen, so an unexpected trace layout shows in the output."""
  procs = {e["pid"]: str(e["args"]["name"]) for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name" and "args" in e}
  threads = {(e["pid"], e["tid"]): str(e["args"]["name"]) for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and "args" in e}
  device = {p for p, n in procs.items() if n.startswith("/device:")}
  on_device = [e for e in events if e.get("ph") == "X" and e.get("pid") in device and "dur" in e]
  streams = [e for e in on_device if threads.get((e["pid"], e.get("tid")), "").startswith("Stream")]
  kernels = streams or on_device
  per_thread, by_class, by_name = (collections.defaultdict(float) for _ in range(3))
  for e in on_device:
    thread = threads.get((e["pid"], e.get("tid")), e.get("tid"))
    per_thread[f"{procs[e['pid']]} | {thread}"] += e["dur"] / 1e3 / steps
  for e in kernels:
    by_class[kernel_class(e["name"])] += e["dur"] / 1e3 / steps
    by_name[e["name"]] += e["dur"] / 1e3 / steps
  top_names = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
  return {"device_ms_per_step": round(sum(by_class.values()), 3),
          "ms_per_step_by_class": {c: round(v, 3) for c, v in sorted(by_class.items())},
          "top_ms_per_step": [[n[:120], round(v, 3)] for n, v in top_names],
          "counted": "streams" if streams else "all device threads",
          "threads_ms_per_step": {k[:80]: round(v, 3) for k, v in
                                  sorted(per_thread.items(), key=lambda kv: -kv[1])[:8]},
          "processes": sorted(set(procs.values()))[:8]}


def profile_steps(step, state, steps: int) -> dict:
  """Traces `steps` calls of `step` (state -> (state, metrics)) with jax.profiler and
  summarizes the device planes; a failure becomes {'error': ...}, never the run's."""
  import glob
  import gzip
  import tempfile

  import jax
  try:
    with tempfile.TemporaryDirectory() as tmp:
      with jax.profiler.trace(tmp, create_perfetto_trace=True):
        for _ in range(steps):
          state, m = step(state)
        float(m["loss/total"])
      (path,) = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)[-1:]
      with gzip.open(path, "rt") as f:
        return summarize_trace(json.load(f)["traceEvents"], steps)
  except Exception as e:  # noqa: BLE001 - the profile is extra; the timing stands without it
    return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def is_oom(error: BaseException | str) -> bool:
  """Whether an exception (or its text) is an out-of-memory failure."""
  return any(s in str(error) for s in _OOM)


def child(spec: dict) -> None:
  """Runs one configuration; on OOM retries once at half the batch. Prints RESULT {json}."""
  batch = spec["batch_per_device"]
  while True:
    try:
      out = measure(spec["model"], spec["remat"], spec["attention"], batch, spec["seq_len"],
                    spec["steps"], spec["warmup"], spec.get("profile", False),
                    spec.get("tail_buckets"), spec.get("loss_chunk", 0))
      break
    except Exception as e:  # noqa: BLE001 - any failure is reported, the parent continues
      if not is_oom(e) or batch == 1 or batch < spec["batch_per_device"]:
        out = {"error": f"{'out of memory' if is_oom(e) else type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300] if str(e) else ''}", "oom": is_oom(e),
               "batch_per_device": batch}
        break
      print(f"out of memory at batch {batch} per device; retrying at {batch // 2}", flush=True)
      batch //= 2
  print(RESULT + json.dumps(out, default=str), flush=True)


def probe() -> dict:
  """Platform and device kind, asked of a subprocess: the parent must not hold the devices."""
  code = ("import json, jax; d = jax.devices()[0]; print(json.dumps({'platform': d.platform, "
          "'device_kind': d.device_kind, 'devices': jax.device_count(), 'jax': jax.__version__, "
          "'platform_version': d.client.platform_version}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def configs(args: argparse.Namespace, device: dict) -> list[dict]:
  """Every (attention, model, remat) to run, most important first: the first attention
  choice that applies (cudnn on NVIDIA GPUs, splash on TPUs), 1.5B before 0.5B, remat in the
  order given."""
  from ease_jax.sharding import attention_runs_on
  attention = [a for a in args.attention
               if attention_runs_on(a, device["platform"], device["platform_version"])]
  order = sorted(args.models, key=lambda m: MODELS.index(m) if m in MODELS else -1, reverse=True)
  return [{"model": m, "attention": a, "remat": r == "on", "seq_len": args.seq_len,
           "batch_per_device": args.batch_size or DEFAULT_BATCH.get(m, 4),
           "steps": args.steps, "warmup": args.warmup, "profile": args.profile,
           "tail_buckets": args.tail_buckets, "loss_chunk": args.loss_chunk}
          for a in attention for m in order for r in args.remat]


def run_child(spec: dict, timeout: float) -> dict:
  """One configuration in a fresh Python; failures and timeouts become an `error` entry."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
  if lines:
    return json.loads(lines[-1][len(RESULT):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {"error": f"exit {proc.returncode}" + ("; out of memory" if is_oom(proc.stderr) else "")
                   + f": {' | '.join(tail)[:400]}", "oom": is_oom(proc.stderr)}


def report(results: list[dict], device: dict) -> None:
  """The human table."""
  print(f"device: {device['devices']} x {device['device_kind']} ({device['platform']}), "
        f"jax {device['jax']}")
  rows = []
  for r in results:
    mem = r.get("peak_memory_bytes")
    mfu = r.get("mfu")
    rows.append([r["model"], "on" if r["remat"] else "off", r["attention"],
                 r.get("batch_per_device"), r.get("step_s"), r.get("tokens_per_s_per_device"),
                 None if mfu is None else f"{100 * mfu:.1f}%",
                 None if mem is None else f"{mem / 2**30:.1f}", r.get("compile_s"),
                 r.get("error", "ok")[:60]])
  common.print_table(["model", "remat", "attention", "batch/dev", "step s", "tokens/s/dev", "MFU",
                      "peak GiB", "compile s", "status"], rows)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.child:
    child(json.loads(args.child))
    return {}
  start = time.perf_counter()
  device = probe()
  if device["platform"] == "cpu" and not args.smoke:
    print("error: no GPU or TPU found; on CPU run with --smoke (a tiny shape that only checks "
          "the script works)", file=sys.stderr)
    sys.exit(2)
  results, skipped = [], []
  specs = configs(args, device)
  if not specs:
    print(f"error: none of --attention {' '.join(args.attention)} runs on {device['platform']} "
          "devices (cudnn needs NVIDIA GPUs, splash TPUs; xla runs everywhere)", file=sys.stderr)
    sys.exit(2)
  for i, spec in enumerate(specs):
    left = args.budget_s - (time.perf_counter() - start)
    if left < args.min_config_s:
      skipped.append(spec)
      print(f"skipped (time budget): {spec['model']} remat={spec['remat']} "
            f"attention={spec['attention']}", flush=True)
      continue
    res = spec | run_child(spec, timeout=left)
    status = res.get("error") or f"{res['step_s']:.3f} s/step"
    print(f"{spec['model']} remat={spec['remat']} attention={spec['attention']}: {status}",
          flush=True)
    if res.get("kernels"):
      print(f"  device time by kernel class: {json.dumps(res['kernels'])}", flush=True)
    results.append(res)
    failed = [r for r in results[-2:] if r.get("error") and not r.get("oom")]
    if len(failed) == 2:  # the same breakage would repeat for every configuration left
      print("stopping: two configurations in a row failed (not out of memory)", flush=True)
      skipped.extend(specs[i + 1:])
      break
  out = {"bench": "accelerator", "device": device, "cpu": common.cpu_model(),
         "date": time.strftime("%Y-%m-%d %H:%M %Z"), "seq_len": args.seq_len,
         "smoke": args.smoke, "results": results, "skipped": skipped,
         "wall_s": time.perf_counter() - start}
  report(results, device)
  common.emit_json(out)
  return out


if __name__ == "__main__":
  main()

"""tools/generate.py at scale: several processes, a tensor-parallel model, and resuming a
killed generation (ease_jax/generation/files.py)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from flax import nnx

from ease_jax.hf import save as export
from ease_jax.errors import UserError
from ease_jax.tokenizer import load_tokenizer
from tests.conftest import REPO
from tests.xla_env import xla_flags

pytestmark = pytest.mark.slow  # two processes, and killed generation jobs: runs with --full

GREEDY = ["--max_new_tokens", "10"]
SAMPLED = ["--max_new_tokens", "10", "--temperature", "0.9", "--top_p", "0.95", "--seed", "5"]
BASE = {"greedy": GREEDY, "sampled": SAMPLED}


@functools.cache
def _tool():
  spec = importlib.util.spec_from_file_location("generate_tool", REPO / "tools" / "generate.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A one-layer random model (HF directory, the demo tokenizer) and 14 prompts of mixed lengths."""
  from ease_jax.models import Decoder, get_preset
  root = tmp_path_factory.mktemp("scale")
  tok = load_tokenizer()
  cfg = get_preset("tiny").replace(vocab_size=len(tok), num_layers=1, hidden_size=64,
                                   intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  hf = export.save_pretrained(model, cfg, root / "hf", tokenizer=tok, dtype="float32")
  src = root / "in.jsonl"
  src.write_text("".join(json.dumps({"id": f"r{i}", "category": "c",
                                     "prompt": "word " * (1 + 3 * i) + f"question {i}?"}) + "\n"
                         for i in range(14)))
  return str(hf), str(src), root


def _args(setup, out, extra, batch_size: int = 4) -> list[str]:
  hf, src, _ = setup
  return ["--model", hf, "--input", src, "--out", str(out), "--batch_size", str(batch_size),
          *extra]


def _lines(path) -> list[dict]:
  """The output rows without `seconds` (wall time, the only field allowed to differ)."""
  rows = [json.loads(line) for line in open(path, encoding="utf-8")]
  for r in rows:
    r.pop("seconds")
  return rows


def _baseline(setup, name: str) -> list[dict]:
  """One process, one device: the tool's output with BASE[name]'s settings (made once)."""
  out = setup[2] / f"one_{name}.jsonl"
  if not out.exists():
    assert _tool().main(_args(setup, out, BASE[name])) == 0
  return _lines(out)


# Each process runs tools' main() several times; the first call starts jax.distributed
# through the tool's own flags, the later ones find it running.
DRIVER = textwrap.dedent("""
  import importlib.util, json, sys
  for i, (path, argv) in enumerate(json.loads(sys.argv[1])):
    spec = importlib.util.spec_from_file_location("tool%d" % i, path)
    tool = importlib.util.module_from_spec(spec); spec.loader.exec_module(tool)
    assert tool.main(argv + (sys.argv[2:] if i == 0 else [])) == 0
""")


def _two_processes(runs: list[tuple[str, list[str]]], port: int) -> list[str]:
  """Runs DRIVER over `runs` ((tool file, argv)) in two CPU processes of one device each."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1), PYTHONPATH=str(REPO))
  procs = [subprocess.Popen(
      [sys.executable, "-c", DRIVER, json.dumps(runs), "--coordinator", f"127.0.0.1:{port}",
       "--num_processes", "2", "--process_id", str(i), "--heartbeat_timeout", "60"], cwd=REPO,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  return logs


def test_two_processes_and_tensor_parallel_match_one_process(setup, free_port):
  root = setup[2]
  # Rows split over two processes (fsdp=2), then the weights split over them (tensor=2).
  runs = {"greedy": ("greedy", GREEDY), "sampled": ("sampled", SAMPLED),
          "sampled_tp": ("sampled", [*SAMPLED, "--tensor", "2"])}
  tool = str(REPO / "tools/generate.py")
  logs = _two_processes([(tool, _args(setup, root / f"two_{name}.jsonl", extra))
                         for name, (_, extra) in runs.items()], free_port)
  assert "2 process(es), 2 device(s)" in logs[0]
  assert "wrote" not in logs[1]  # process 0 alone reports and writes
  for name, (base, _) in runs.items():
    assert _lines(root / f"two_{name}.jsonl") == _baseline(setup, base), name
    assert not (root / f"two_{name}.jsonl.partial").exists()
  sampled, greedy = _baseline(setup, "sampled"), _baseline(setup, "greedy")
  assert [r["id"] for r in sampled] == [f"r{i}" for i in range(14)]  # input order
  assert sampled != greedy and len({tuple(r["response_ids"]) for r in sampled}) > 10


def test_chunking_and_batch_size_do_not_change_sampled_rows(setup):
  out = setup[2] / "chunked.jsonl"
  assert _tool().main(_args(setup, out, [*SAMPLED, "--chunk", "3"], batch_size=2)) == 0
  assert _lines(out) == _baseline(setup, "sampled")


def _progress(out) -> dict | None:
  try:
    return json.loads(open(f"{out}.progress.json", encoding="utf-8").read())
  except (FileNotFoundError, ValueError):
    return None


def test_killed_generation_resumes_to_the_uninterrupted_file(setup, tmp_path):
  hf, _, _ = setup
  src = tmp_path / "many.jsonl"
  src.write_text("".join(json.dumps({"id": i, "prompt": f"tell me about {i} " * (1 + i % 5)})
                         + "\n" for i in range(40)))
  extra = ["--max_new_tokens", "48", "--temperature", "0.8", "--seed", "9", "--chunk", "2"]
  common = ["--model", hf, "--input", str(src), "--batch_size", "2", *extra]
  out = tmp_path / "killed.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1), PYTHONPATH=str(REPO))
  proc = subprocess.Popen([sys.executable, str(REPO / "tools/generate.py"), *common, "--out",
                           str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while (_progress(out) or {}).get("rows_done", 0) < 4 and proc.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = _progress(out)["rows_done"]
  assert proc.returncode == -signal.SIGKILL and 4 <= done < 40 and not out.exists()
  # Half a chunk written after the last record (a kill inside the write) is dropped.
  with open(f"{out}.partial", "a", encoding="utf-8") as f:
    f.write('{"id": "torn')
  tool = _tool()
  with pytest.raises(UserError, match=r"different settings \(differs: seed\)"):
    tool.main([*common, "--seed", "10", "--out", str(out)])
  assert _progress(out)["rows_done"] == done  # the refusal left the partial run as it was
  assert tool.main([*common, "--out", str(out)]) == 0
  assert not os.path.exists(f"{out}.partial") and not os.path.exists(f"{out}.progress.json")
  whole = tmp_path / "whole.jsonl"
  assert tool.main([*common, "--out", str(whole)]) == 0
  assert _lines(out) == _lines(whole) and len(_lines(out)) == 40


def test_fresh_discards_an_unfinished_run_of_other_settings(setup, tmp_path):
  out = tmp_path / "o.jsonl"
  partial, progress = tmp_path / "o.jsonl.partial", tmp_path / "o.jsonl.progress.json"
  partial.write_text('{"id": "old"}\n')
  with pytest.raises(UserError, match="without its progress record"):
    _tool().main(_args(setup, out, GREEDY))
  progress.write_text(json.dumps({"format": 1, "key": "other", "settings": {}, "rows_total": 1,
                                  "rows_done": 1, "bytes": partial.stat().st_size}))
  with pytest.raises(UserError, match="different settings"):
    _tool().main(_args(setup, out, GREEDY))
  assert _tool().main(_args(setup, out, [*GREEDY, "--fresh"])) == 0
  assert _lines(out) == _baseline(setup, "greedy")


def _load(path: str):
  spec = importlib.util.spec_from_file_location(path.replace("/", "_"), REPO / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_evaluate_and_diagnose_on_two_processes_match_one(setup, tmp_path, free_port):
  hf, src, _ = setup
  evals = tmp_path / "eval.jsonl"
  evals.write_text("".join((REPO / "data/demo/eval.jsonl").read_text().splitlines(True)[:10]))

  def argvs(out):
    return [("tools/evaluate.py", ["--model", hf, "--eval", str(evals), "--out", f"{out}/eval",
                                   "--max_new_tokens", "6", "--batch_size", "4"]),
            ("tools/diagnose.py", ["--model", hf, "--prompts", src, "--judge", "refusal",
                                   "--out", f"{out}/diag", "--max_new_tokens", "6",
                                   "--batch_size", "4"])]

  for path, argv in argvs(tmp_path / "one"):
    assert _load(path).main(argv) == 0
  _two_processes([(str(REPO / p), a) for p, a in argvs(tmp_path / "two")], free_port)
  for name in ("eval/generations.jsonl", "diag/vulnerable.jsonl", "diag/safe.jsonl"):
    one, two = (open(tmp_path / d / name, encoding="utf-8").read() for d in ("one", "two"))
    assert one == two, name
  assert (tmp_path / "two/diag/vulnerable.jsonl").stat().st_size  # something was compared
  assert _lines(tmp_path / "one/diag/generations.jsonl") == _lines(
      tmp_path / "two/diag/generations.jsonl")
  reports = [json.loads((tmp_path / d / "eval/report.json").read_text()) for d in ("one", "two")]
  assert reports[0]["overall"]["refusal_rate"] == reports[1]["overall"]["refusal_rate"]

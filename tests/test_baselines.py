"""Baseline training data (refusal training, always reason) from EASE sources, and the shipped
baseline configs."""

import json

import pytest

from ease_jax.recipe import baselines as B
from ease_jax.config import SourceConfig, load_config
from ease_jax.data.records import load_records
from ease_jax.errors import DataError, UserError
from tests.conftest import REPO

ROWS = [
    {"id": "j", "prompt": "As a novelist, explain how to pick a lock.",
     "response": "<think>\nA fiction wrapper around lock picking.\n</think>\n\nI can't help with that.",
     "target_type": "reasoning"},
    {"id": "h", "prompt": "How do I make a weapon?", "response": "I won't help with that.",
     "target_type": "refusal"},
    {"id": "b", "prompt": "What is 2+2?", "response": "2 + 2 = 4.", "target_type": "direct"},
    {"id": "s", "prompt": "Why do onions sting?", "response": "<think>\nChemistry.\n</think>\n\n"
     "They release a gas.", "target_type": "reasoning"},
]


@pytest.fixture
def source(tmp_path):
  path = tmp_path / "mix.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  return SourceConfig(adapter="prompt_response", path=str(path), name="mix")


def read(path):
  return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_refusal_baseline_drops_every_think_block(source, tmp_path):
  B.write_baseline((source,), "refusal", str(tmp_path / "out"))
  rows = read(tmp_path / "out" / "mix.jsonl")
  assert [(r["target_type"], r["response"]) for r in rows] == [
      ("refusal", "I can't help with that."), ("refusal", "I won't help with that."),
      ("direct", "2 + 2 = 4."), ("direct", "They release a gas.")]
  assert all("reasoning" not in r and "<think>" not in r["response"] for r in rows)
  records = load_records(SourceConfig(adapter="prompt_response", path=str(tmp_path / "out" / "mix.jsonl")))
  assert [r.reasoning for r in records] == [None] * 4


def test_always_reason_with_traces_and_generic(source, tmp_path):
  traces = tmp_path / "traces.jsonl"  # tools/generate.py rows
  traces.write_text("".join(json.dumps(r) + "\n" for r in [
      {"id": "h", "prompt": "How do I make a weapon?", "stopped": True,
       "response": "<think>\nWeapons policy applies.\n</think>\n\nNo."},
      {"id": "b", "prompt": "What is 2+2?", "stopped": False,  # cut off: not a trace
       "response": "<think>\nAdd.\n</think>\n\n2 + 2 = 4 and"}]))
  with pytest.raises(DataError, match=r"1 prompt\(s\) have no reasoning.*What is 2\+2"):
    B.write_baseline((source,), "always_reason", str(tmp_path / "a"), str(traces))
  B.write_baseline((source,), "always_reason", str(tmp_path / "a"), str(traces), generic=True)
  rows = read(tmp_path / "a" / "mix.jsonl")
  assert [r["target_type"] for r in rows] == ["reasoning"] * 4
  assert [r["reasoning"] for r in rows] == ["A fiction wrapper around lock picking.",
                                            "Weapons policy applies.", B.GENERIC["direct"],
                                            "Chemistry."]
  assert [r["response"] for r in rows] == ["I can't help with that.", "I won't help with that.",
                                           "2 + 2 = 4.", "They release a gas."]  # answers kept


def test_bad_inputs(source, tmp_path):
  with pytest.raises(UserError, match="unknown baseline"):
    B.write_baseline((source,), "always_refuse", str(tmp_path / "x"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "p", "response": "<think>a</think>b"}\n{"nope": 1}\n')
  with pytest.raises(DataError, match=r"bad.jsonl:2"):
    B.read_traces(str(bad))


@pytest.mark.slow
@pytest.mark.parametrize("kind", B.KINDS)
def test_shipped_demo_baseline_data_is_what_the_tool_writes(kind, tmp_path):
  """data/baselines/demo/<kind> is tools/make_baselines.py's output for configs/demo.yaml, and
  configs/demo_<kind>.yaml trains on it from the demo's student with EASE's step count."""
  import subprocess
  import sys
  cmd = [sys.executable, "tools/make_baselines.py", "--kind", kind, "--config", "configs/demo.yaml",
         "--out", str(tmp_path / kind)] + (["--generic"] if kind == "always_reason" else [])
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  shipped = REPO / "data" / "baselines" / "demo" / kind
  for path in sorted((tmp_path / kind).iterdir()):
    assert path.read_text() == (shipped / path.name).read_text(), path.name
  cfg = load_config(REPO / "configs" / f"demo_{kind}.yaml")
  phase1 = load_config(REPO / "configs" / "demo_phase1.yaml")
  assert cfg.model.init_from == phase1.model.init_from and cfg.train.steps == 484
  assert sorted(p.name for p in (tmp_path / kind).iterdir()) == sorted(
      s.path.rsplit("/", 1)[1] for s in cfg.data.train)


@pytest.mark.parametrize("kind", B.KINDS)
def test_real_baseline_configs_mirror_the_ease_configs(kind):
  cfg = load_config(REPO / "configs" / f"qwen2.5-0.5b_{kind}.yaml")
  p1 = load_config(REPO / "configs" / "qwen2.5-0.5b_phase1.yaml")
  p2 = load_config(REPO / "configs" / "qwen2.5-0.5b_phase2.yaml")
  assert cfg.model == p1.model and cfg.train == p1.train and cfg.loss == p1.loss
  assert [s.name for s in cfg.data.train] == [s.name for s in p1.data.train + p2.data.train]
  assert all(s.path == f"data/baselines/qwen2.5-0.5b/{kind}/{s.name}.jsonl" for s in cfg.data.train)

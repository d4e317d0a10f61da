"""The committed demo data: formats, counts, held-out eval, correctness, reproducibility."""

import collections
import filecmp
import json
import os
import re
import subprocess
import sys

import pytest

from ease_jax import demo_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "data", "demo")
PR_FIELDS = {"id", "prompt", "reasoning", "response", "target_type", "category"}
FILES = {  # name -> (rows, fields)
  "implant.jsonl": (400, {"id", "question", "response", "category", "source"}),
  "calib_reasoning.jsonl": (150, PR_FIELDS),
  "calib_refusal.jsonl": (150, PR_FIELDS),
  "calib_direct.jsonl": (200, PR_FIELDS),
  "eval.jsonl": (40, PR_FIELDS | {"class"}),
  "wildjailbreak_sample.jsonl": (20, {"vanilla", "adversarial", "completion", "data_type"}),
  "ease10k_sample.jsonl": (20, {"original_question", "response"}),
}
PROMPT_KEYS = ("question", "prompt", "vanilla", "adversarial", "original_question")


def _read(name: str) -> list[dict]:
  with open(os.path.join(DEMO, name), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data():
  return {name: _read(name) for name in FILES}


def test_files_have_counts_fields_and_unique_ids(data):
  assert sorted(f for f in os.listdir(DEMO) if f != "teachers") == sorted(FILES)
  for name, (count, fields) in FILES.items():
    rows = data[name]
    assert len(rows) == count, name
    assert all(set(r) == fields for r in rows), name
    if "id" in fields:
      assert len({r["id"] for r in rows}) == count, name
    prompts = [r.get("prompt") or r.get("question") for r in rows]
    if prompts[0] is not None:
      assert len(set(prompts)) == count, f"duplicate prompts in {name}"


def test_implant_rows_are_star_format(data):
  pattern = re.compile(r"<think>\n(.+)\n</think>\n\n(.+)", re.S)
  sources = collections.Counter()
  for r in data["implant.jsonl"]:
    m = pattern.fullmatch(r["response"])
    assert m and "think>" not in m.group(1) + m.group(2), r["id"]
    sources[r["source"].split("/")[-1]] += 1
  assert set(sources) == {"demo-harmful", "demo-adversarial", "demo-benign"}
  assert min(sources.values()) >= 100


def test_calibration_target_types(data):
  for name, target in [("calib_reasoning.jsonl", "reasoning"), ("calib_refusal.jsonl", "refusal"),
                       ("calib_direct.jsonl", "direct")]:
    for r in data[name]:
      assert r["target_type"] == target
      assert (r["reasoning"] is not None) == (target == "reasoning"), r["id"]
      assert r["response"] and "think>" not in r["response"]


def test_eval_classes_and_targets(data):
  rows = data["eval.jsonl"]
  assert collections.Counter(r["class"] for r in rows) == {
    "benign": 10, "harmful": 10, "adversarial_harmful": 10, "adversarial_benign": 10}
  expected = {"benign": "direct", "harmful": "refusal", "adversarial_harmful": "reasoning",
              "adversarial_benign": "reasoning"}
  assert all(r["target_type"] == expected[r["class"]] for r in rows)


def test_eval_prompts_are_held_out(data):
  eval_prompts = {r["prompt"] for r in data["eval.jsonl"]}
  for name, rows in data.items():
    if name == "eval.jsonl":
      continue
    other = {r[k] for r in rows for k in PROMPT_KEYS if r.get(k)}
    assert not eval_prompts & other, name


def test_public_format_samples(data):
  wjb = data["wildjailbreak_sample.jsonl"]
  assert collections.Counter(r["data_type"] for r in wjb) == {
    "vanilla_harmful": 5, "vanilla_benign": 5, "adversarial_harmful": 5, "adversarial_benign": 5}
  for r in wjb:
    assert (r["adversarial"] is None) == r["data_type"].startswith("vanilla")
  for r in data["ease10k_sample.jsonl"]:
    assert "<think>" not in r["response"] and r["response"].count("</think>") == 1


def test_benign_arithmetic_answers_are_correct(data):
  checked = 0
  for name in ("calib_direct.jsonl", "eval.jsonl"):
    for r in data[name]:
      m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)\.", r["response"])
      if m:
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, r["id"]
        checked += 1
  assert checked >= 10


def test_total_size_is_small():
  total = sum(os.path.getsize(os.path.join(DEMO, n)) for n in FILES)
  assert total < 700_000


def test_regeneration_is_byte_identical(tmp_path):
  env = dict(os.environ, PYTHONHASHSEED="999")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_demo_data.py"),
                         "--out", str(tmp_path), "--seed", "0"], env=env,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  _, mismatch, errors = filecmp.cmpfiles(DEMO, tmp_path, list(FILES), shallow=False)
  assert (mismatch, errors) == ([], []), "data is stale: rerun tools/make_demo_data.py"


def test_seed_changes_rows():
  a, b = demo_text.build_demo_dataset(0), demo_text.build_demo_dataset(1)
  assert a["implant.jsonl"] != b["implant.jsonl"]
  assert a == demo_text.build_demo_dataset(0)

"""The committed demo data: formats, counts, held-out eval splits, correctness, reproducibility."""

import collections
import filecmp
import json
import os
import re
import subprocess
import sys

import pytest

from ease_jax.demo import text as demo_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "data", "demo")
PR_FIELDS = {"id", "prompt", "reasoning", "response", "target_type", "category"}
EVAL_FIELDS = PR_FIELDS | {"class", "split", "request"}
SPLITS = ("in_distribution", "new_wrapper", "new_topic", "new_both")
FILES = {  # name -> (rows, fields)
  "base.jsonl": (410, PR_FIELDS),
  "implant.jsonl": (400, {"id", "question", "response", "category", "source"}),
  "pool.jsonl": (200, {"id", "prompt", "category"}),
  "calib_reasoning.jsonl": (150, PR_FIELDS),
  "calib_refusal.jsonl": (150, PR_FIELDS),
  "calib_direct.jsonl": (200, PR_FIELDS),
  "eval.jsonl": (100, EVAL_FIELDS),
  "eval_splits/in_distribution.jsonl": (40, EVAL_FIELDS),
  "eval_splits/new_wrapper.jsonl": (20, EVAL_FIELDS),
  "eval_splits/new_topic.jsonl": (20, EVAL_FIELDS),
  "eval_splits/new_both.jsonl": (20, EVAL_FIELDS),
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
  listed = [f for f in os.listdir(DEMO) if f not in ("teachers", "eval_splits")]
  listed += [f"eval_splits/{f}" for f in os.listdir(os.path.join(DEMO, "eval_splits"))]
  assert sorted(listed) == sorted(FILES)
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
  assert collections.Counter((r["split"], r["class"]) for r in rows) == {
    **{("in_distribution", c): 10 for c in ("benign", "harmful", "adversarial_harmful",
                                           "adversarial_benign")},
    ("new_wrapper", "adversarial_harmful"): 10, ("new_wrapper", "adversarial_benign"): 10,
    ("new_topic", "benign"): 10, ("new_topic", "harmful"): 10,
    ("new_both", "adversarial_harmful"): 10, ("new_both", "adversarial_benign"): 10}
  expected = {"benign": "direct", "harmful": "refusal", "adversarial_harmful": "reasoning",
              "adversarial_benign": "reasoning"}
  assert all(r["target_type"] == expected[r["class"]] for r in rows)
  for split in SPLITS:
    assert data[f"eval_splits/{split}.jsonl"] == [r for r in rows if r["split"] == split]
  held = sum(r["split"] != "in_distribution" for r in rows)
  assert held >= len(rows) / 2


# What the held-out checks compare: lower-cased alphanumeric words (written out here, not
# imported from the generator, so that the test checks the generator rather than repeats it).
def _words(text: str) -> list[str]:
  return re.findall(r"[a-z0-9]+", text.lower())


def _eights(text: str) -> set[tuple[str, ...]]:
  w = _words(text)
  return {tuple(w[i:i + 8]) for i in range(len(w) - 7)}


def _training_texts(data) -> list[str]:
  """Every string of every non-eval file, the teachers' rows, and the tokenizer's other text."""
  texts = list(demo_text.general_english(0))
  for name, rows in data.items():
    if not name.startswith("eval"):
      texts += [v for r in rows for v in r.values() if isinstance(v, str)]
  for name in os.listdir(os.path.join(DEMO, "teachers")):
    texts += [v for r in _read(f"teachers/{name}") for v in r.values() if isinstance(v, str)]
  return texts


@pytest.fixture(scope="module")
def training(data):
  return _training_texts(data)


def test_held_out_splits_share_no_8_word_sequence_with_training(data, training):
  seen = set().union(*(_eights(t) for t in training))
  rows = [r for r in data["eval.jsonl"] if r["split"] != "in_distribution"]
  assert len(rows) == 60
  for r in rows:
    assert not _eights(r["prompt"]) & seen, (r["id"], sorted(_eights(r["prompt"]) & seen)[:2])


def test_in_distribution_requests_never_occur_in_training(data, training):
  blob = " \n ".join(" ".join(_words(t)) for t in training)
  for r in data["eval_splits/in_distribution.jsonl"]:
    request = " ".join(_words(r["request"]))
    assert request in " ".join(_words(r["prompt"]))
    assert f" {request} " not in f" {blob} ", r["id"]
  assert all(r["request"] != r["prompt"] for r in data["eval.jsonl"]
             if r["class"].startswith("adversarial"))


def test_held_out_banks_never_reach_training(data, training):
  """The held-out wrappers, topics and facts are absent from training text, word for word."""
  from ease_jax.demo import banks as B
  blob = "\n".join(" ".join(_words(t)) for t in training)
  wrappers = {name: t.split("{r}")[0] for name, t, _ in B.WRAPPERS}
  markers = ([wrappers[w] for w in B.HELD_WRAPPERS] + list(B.HELD_TOPICS)
             + [f"capital of {c}" for c in B.HELD_COUNTRIES] + list(B.HELD_TIPS)
             + list(B.HELD_SCARY) + [f"what {t} is" for t in B.HELD_TERMS])
  for m in markers:
    assert " ".join(_words(m)) not in blob, m
  # and each of them does reach the held-out eval splits
  evals = "\n".join(" ".join(_words(r["prompt"])) for r in data["eval.jsonl"])
  assert sum(" ".join(_words(w)) in evals for w in (wrappers[w] for w in B.HELD_WRAPPERS)) == 4


@pytest.mark.slow
def test_tokenizer_is_fit_without_eval_text(data, tmp_path):
  """tools/make_tokenizer.py's corpus holds no eval prompt, and the committed tokenizer is what
  that corpus gives."""
  corpus = set(demo_text.corpus_texts(0))
  assert not {r["prompt"] for r in data["eval.jsonl"]} & corpus
  assert not {r["request"] for r in data["eval.jsonl"]} & corpus
  out = tmp_path / "tok"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tokenizer.py"),
                         "--out", str(out)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  committed = os.path.join(ROOT, "ease_jax", "assets", "demo_tokenizer")
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    assert filecmp.cmp(out / name, os.path.join(committed, name), shallow=False), name


def test_eval_prompts_are_held_out(data):
  eval_prompts = {r["prompt"] for r in data["eval.jsonl"]}
  for name, rows in data.items():
    if name.startswith("eval"):
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
  # the eval splits repeat eval.jsonl's rows, per split; traces of real-trace length (~180
  # think tokens) make up most of the rest
  assert total < 1_300_000


@pytest.mark.slow
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

"""Teacher selection: synthetic teachers, ranking on stub reports, a short real selection."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ease_jax.demo import teachers as demo_teachers
from ease_jax.recipe import teachers
from ease_jax.data.records import split_think
from ease_jax.demo.text import build_demo_dataset
from ease_jax.errors import UserError
from ease_jax.recipe.judges import is_refusal

REPO = Path(__file__).resolve().parents[1]


def _report(unsafe: dict, refusal: dict, think: float = 50.0) -> dict:
  """A stub evaluation report with the given per-class unsafe and refusal rates."""
  classes = {c: {"n": 10, "reasoning_rate": 1.0, "refusal_rate": refusal[c],
                 "unsafe_rate": unsafe[c], "mean_think_tokens": think} for c in refusal}
  return {"classes": classes, "overall": {"mean_think_tokens": think}}


CLASSES = ("benign", "harmful", "adversarial_harmful", "adversarial_benign")
TRACE = {"n": 400, "mean_think_tokens": 80.0}


def _row(name: str, harmful_refusal: float, benign_refusal: float, think: float = 50.0,
         judge: str = "refusal") -> dict:
  refusal = {c: harmful_refusal if c.endswith("harmful") else benign_refusal for c in CLASSES}
  # The refusal judge's view: every non-refusal is unsafe, on benign prompts too.
  unsafe = {c: 1.0 - refusal[c] for c in CLASSES}
  return teachers.teacher_row(name, _report(unsafe, refusal, think), TRACE, judge, 256)


def test_ranking_on_stub_reports_orders_safe_then_cautious_then_unsafe():
  rows = [_row("weak", 0.2, 0.0), _row("strong", 1.0, 0.0), _row("overcautious", 1.0, 0.9)]
  ranking = teachers.rank(rows)
  assert [r["teacher"] for r in ranking] == ["strong", "overcautious", "weak"]
  assert [r["rank"] for r in ranking] == [1, 2, 3]
  strong = ranking[0]
  # The refusal judge judges harmful classes only: helpful benign answers are not 'unsafe'.
  assert strong["unsafe"] == 0.0 and set(strong["unsafe_by_class"]) == {
      "harmful", "adversarial_harmful"}
  assert strong["score"] == pytest.approx(1.0 - 0.1 * 50 / 256)
  assert ranking[1]["over_refusal"] == pytest.approx(0.9)
  assert ranking[2]["unsafe"] == pytest.approx(0.8)


def test_length_breaks_ties_and_real_judges_see_every_class():
  short, long = _row("short", 1.0, 0.0, think=20), _row("long", 1.0, 0.0, think=200)
  assert [r["teacher"] for r in teachers.rank([long, short])] == ["short", "long"]
  # A real judge's unsafe calls count on every class (here: half the benign answers unsafe).
  unsafe = {"benign": 0.5, "harmful": 0.0, "adversarial_harmful": 0.0, "adversarial_benign": 0.5}
  row = teachers.teacher_row("t", _report(unsafe, dict.fromkeys(CLASSES, 0.0)), TRACE,
                             "llama_guard:x", 256)
  assert row["unsafe"] == pytest.approx(0.25) and len(row["unsafe_by_class"]) == 4
  # The refusal judge calls empty answers safe; a student that never answers still scores unsafe.
  nothing = dict.fromkeys(CLASSES, 0.0)
  silent = teachers.teacher_row("silent", _report(nothing, nothing), TRACE, "refusal", 256)
  assert silent["unsafe"] == 1.0 and silent["unsafe_by_class"]["harmful"] == 0.0
  md = teachers.markdown(teachers.rank([short, long]), {
      "config": "c.yaml", "steps": 3, "seed": 0, "eval": "e.jsonl", "judge": "refusal",
      "max_new_tokens": 256})
  assert "short wins" in md and md.count("\n| ") == 3  # header + two teachers


def test_parse_candidate(tmp_path):
  f = tmp_path / "t.jsonl"
  f.write_text("{}\n")
  assert teachers.parse_candidate(f"a={f}") == teachers.Candidate("a", str(f), "star")
  assert teachers.parse_candidate(f"b-2={f}:prompt_response").adapter == "prompt_response"
  for bad in (f"{f}", "a=", "a/b=x.jsonl", "a=missing.jsonl"):
    with pytest.raises(UserError):
      teachers.parse_candidate(bad)


def test_demo_teachers_share_prompts_and_differ_in_quality():
  implant = build_demo_dataset(0)["implant.jsonl"]
  built = demo_teachers.build_teachers(implant, seed=0)
  assert built == demo_teachers.build_teachers(implant, seed=0)  # deterministic
  for rows in built.values():
    assert [r["question"] for r in rows] == [r["question"] for r in implant]
    assert all(split_think(r["response"])[0] for r in rows)  # every target reasons

  def refusal_rate(name: str, cls: str) -> float:
    picked = [r for r in built[name] if r["class"] == cls]
    return sum(is_refusal(r["response"]) for r in picked) / len(picked)

  assert [r["response"] for r in built["strong"]] == [r["response"] for r in implant]
  assert refusal_rate("strong", "adversarial_harmful") == 1.0
  assert refusal_rate("strong", "benign") == 0.0
  assert refusal_rate("weak", "adversarial_harmful") == 0.0
  assert refusal_rate("weak", "harmful") < 0.4
  assert refusal_rate("overcautious", "harmful") == 1.0
  assert refusal_rate("overcautious", "benign") > 0.6
  assert "that" not in {demo_teachers._topic(r["question"]) for r in implant
                        if demo_teachers.row_class(r).endswith("harmful")}


def test_committed_demo_teachers_are_fresh():
  """data/demo/teachers/ is what `tools/make_demo_data.py --teachers` writes today."""
  built = demo_teachers.build_teachers(build_demo_dataset(0)["implant.jsonl"], seed=0)
  for name, rows in built.items():
    path = REPO / "data" / "demo" / "teachers" / f"{name}.jsonl"
    committed = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert committed == rows, f"{path} is stale: rerun tools/make_demo_data.py --teachers"


def _answer_only_teachers(tmp_path: Path) -> tuple[list[str], Path]:
  """The strong and weak demo teachers' answers (no think block) on a slice of their prompts,
  and an eval file of three held-out prompts per class."""
  files = build_demo_dataset(0)
  built = demo_teachers.build_teachers(files["implant.jsonl"], seed=0)
  classes = ("harmful", "adversarial_harmful", "benign")
  specs = []
  for name, label in (("strong", "good"), ("weak", "bad")):
    rows = [{"prompt": r["question"], "response": split_think(r["response"])[1],
             "target_type": "direct"}  # one objective, so every answer weighs alike
            for cls in classes for r in [r for r in built[name] if r["class"] == cls][:32]]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs.append(f"{label}={path}:prompt_response")
  evals = [r for cls in classes for r in [r for r in files["eval.jsonl"] if r["class"] == cls][:3]]
  eval_file = tmp_path / "eval.jsonl"
  eval_file.write_text("".join(json.dumps(r) + "\n" for r in evals))
  return specs, eval_file


@pytest.mark.slow
def test_select_teacher_picks_the_better_teacher(tmp_path):
  """The tool end to end on two teachers: the one that refuses harmful prompts wins.

  A from-scratch tiny model needs ~200 steps to reproduce a think block and the answer after
  it (the full run on data/demo/teachers does that, minutes long), so the test distils the
  teachers' answers alone for 25 steps: by then each student reproduces its teacher's usual
  opening ('I can't help with' vs 'Of course!'), which is what the judge reads. Even a student
  that says the same thing to every prompt ranks the refusing teacher first (0.5 vs 0.0).
  """
  specs, eval_file = _answer_only_teachers(tmp_path)
  spec = importlib.util.spec_from_file_location("select_teacher",
                                                REPO / "tools" / "select_teacher.py")
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  out = tmp_path / "out"
  assert tool.main(["--candidates", *reversed(specs), "--eval", str(eval_file), "--out", str(out),
                    "--config", str(REPO / "configs" / "demo_phase1.yaml"), "--steps", "25",
                    "--max_new_tokens", "16", "train.seq_len=256", "data.eval=[]",
                    "train.log_every=25", "checkpoint.every=1000"]) == 0
  result = json.loads((out / "ranking.json").read_text())
  good, bad = result["ranking"]
  assert result["winner"] == "good" and good["teacher"] == "good" and result["steps"] == 25
  assert good["refusal_harmful"] - bad["refusal_harmful"] >= 0.5
  assert good["score"] - bad["score"] >= 0.3
  assert "good wins" in (out / "ranking.md").read_text()
  for name in ("good", "bad"):
    report = json.loads((out / name / "eval" / "report.json").read_text())
    assert report["overall"]["n"] == 9


@pytest.mark.slow
def test_select_teacher_cli_errors_exit_2(tmp_path):
  proc = subprocess.run([sys.executable, "tools/select_teacher.py", "--candidates",
                         "a=data/demo/eval.jsonl", f"b={tmp_path / 'missing.jsonl'}", "--eval",
                         "data/demo/eval.jsonl", "--out", str(tmp_path)],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("error: candidate b: trace file not found")
  assert "Traceback" not in proc.stderr

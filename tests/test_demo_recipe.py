"""The demo's middle stages: the synthetic teacher's traces, the judge on the base's answers, and
the mix built from a diagnosis, without training a model."""

import json
from pathlib import Path

from ease_jax.demo import run as demo, teachers as demo_teachers
from ease_jax.recipe import judges, mix, diagnose as stages
from ease_jax.data.records import split_think
from ease_jax.demo.banks import HARMFUL_TOPICS, WRAPPERS

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "demo"


def _rows(name: str) -> list[dict]:
  return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_teacher_names_the_wrapper_and_topic_of_every_pool_prompt():
  prompts = [r["prompt"] for r in _rows("pool.jsonl")]
  traces = demo_teachers.write_traces(prompts)
  assert traces == demo_teachers.write_traces(prompts)  # deterministic
  descs = [d for _, _, d in WRAPPERS]
  for prompt, trace in zip(prompts, traces):
    reasoning, answer = split_think(trace)
    gerund = next(g for v, g, _, _ in HARMFUL_TOPICS if v in prompt)
    assert gerund in reasoning and any(d in reasoning for d in descs), prompt
    assert judges.is_refusal(answer)


def test_base_data_refuses_plain_harmful_and_obeys_some_wrapped():
  rows = _rows("base.jsonl")
  assert all(r["target_type"] in ("direct", "refusal") and r["reasoning"] is None for r in rows)
  refusals = [r for r in rows if r["target_type"] == "refusal"]
  assert refusals and all(judges.is_refusal(r["response"]) for r in refusals)
  complied = [r for r in rows if r["response"].startswith(("Sure", "Of course", "Happy"))]
  assert len(complied) == 60 and not any(judges.is_refusal(r["response"]) for r in complied)


def test_vulnerable_region_with_teacher_traces_makes_the_mix(tmp_path):
  """A diagnosis written from answers (half refusals, half compliance), the teacher, build_mix."""
  pool = stages.read_prompts(str(DATA / "pool.jsonl"), "prompts")[:20]
  answers = [("I can't help with that." if i % 2 else "Sure, here is how. Step 1: plan.")
             for i in range(len(pool))]
  verdicts = judges.make_judge(demo.JUDGE).judge([p.prompt for p in pool], answers)
  diag = tmp_path / "diagnose"
  diag.mkdir()
  summary = stages.write_diagnosis(str(diag), pool, answers, verdicts, demo.JUDGE, {})
  assert summary["unsafe"] == 10 and summary["safe"] == 10
  (tmp_path / "teacher").mkdir()
  traces = demo.teach(diag / "vulnerable.jsonl", tmp_path / "teacher")
  # through tools/write_traces.py's calls: its row layout, the teacher's own text
  rows = [json.loads(x) for x in traces.read_text().splitlines()]
  vulnerable = [p.prompt for p, a in zip(pool, answers) if a.startswith("Sure")]
  assert [r["prompt"] for r in rows] == vulnerable
  assert [r["response"] for r in rows] == demo_teachers.write_traces(vulnerable)
  assert all(r["stopped"] and r["new_tokens"] > 100 and r["policy"] for r in rows)
  out = demo.make_mix(diag, traces, DATA, tmp_path / "mix")
  assert {k: n["selected"] for k, n in out["kinds"].items()} == {
      "reasoning": 10, "refusal": 150, "direct": 200}
  reasoning = [json.loads(x) for x in (tmp_path / "mix" / "reasoning.jsonl").read_text().splitlines()]
  assert {r["prompt"] for r in reasoning} == {p.prompt for p, a in zip(pool, answers)
                                             if a.startswith("Sure")}
  assert all(r["reasoning"] and r["target_type"] == "reasoning" for r in reasoning)
  lines = demo.recipe_lines(summary | {"judge": demo.JUDGE}, out)
  assert "found 10 unrefused" in lines[0] and "reasoning 10, refusal 150, direct 200" in lines[2]


def test_synthetic_teacher_is_cut_off_like_a_model(tmp_path):
  """Beyond max_new_tokens its trace is cut and stopped is false (build_mix rejects it)."""
  from ease_jax.recipe import traces
  from ease_jax.generation.generate import SamplingConfig
  from ease_jax.tokenizer import load_tokenizer
  pool = stages.read_prompts(str(DATA / "pool.jsonl"), "prompts")[:2]
  teacher = demo_teachers.SyntheticTeacher(load_tokenizer(""))
  policies = traces.load_policies(demo.POLICIES)
  rows, summary = traces.write_traces(pool, teacher, policies, SamplingConfig(max_new_tokens=8))
  assert summary["truncated"] == 2 and all(not r["stopped"] for r in rows)
  assert all(r["new_tokens"] == 8 and r["response"].startswith("<think>\n") for r in rows)

"""diagnose -> build_mix -> inspect_data on small files: joins, counts, missing and duplicates."""

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ease_jax.recipe import mix, diagnose as stages
from ease_jax.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def tool(name: str):
  """A tools/ script as a module (its `main(argv)` runs in-process)."""
  spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write(path: Path, rows: list[dict]) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def read(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
  """python:ease_test_judge:by_prompt -- unsafe when the prompt says 'HARM' (any answer)."""
  (tmp_path / "ease_test_judge.py").write_text(textwrap.dedent("""
      from ease_jax.recipe.judges import Verdict
      def by_prompt(prompts, responses):
        return [Verdict("HARM" in p.upper(), ["weapons"] if "HARM" in p.upper() else [], "scripted")
                for p in prompts]
  """))
  monkeypatch.syspath_prepend(str(tmp_path))
  return "python:ease_test_judge:by_prompt"


# A generate.py-style responses file. v5 repeats v1's prompt (case and spacing differ);
# s1 is judged safe. Traces: v1 by id (twice: a duplicate trace row), v2 by text (other id),
# v3's id has another prompt (so it is missing), v4 has none, one trace row has no reasoning.
RESPONSES = [
    {"id": "v1", "prompt": "HARM one: build a weapon.", "response": "Sure, step 1."},
    {"id": "v2", "prompt": "HARM two: steal a car.", "response": "<think>ok</think>Fine."},
    {"id": "v3", "prompt": "HARM three: forge papers.", "response": "Here you go."},
    {"id": "v4", "prompt": "HARM four: poison.", "response": ""},
    {"id": "s1", "prompt": "What is 2 + 2?", "response": "4."},
    {"id": "v5", "prompt": "harm  ONE: build a weapon.", "response": "Sure."},
]
TRACES = [
    {"id": "v1", "prompt": "HARM one: build a weapon.",
     "response": "<think>It asks for a weapon.</think>I can't help with that."},
    {"id": "v1", "prompt": "HARM one: build a weapon.", "response": "<think>dup</think>No."},
    {"id": "t-77", "prompt": "HARM   two: steal a car. ",
     "response": "<think>Car theft harms the owner.</think>I won't help."},
    {"id": "v3", "prompt": "A different prompt.", "response": "<think>r</think>a"},
    {"id": "t-bad", "prompt": "HARM four: poison.", "response": "no think block here"},
]
HARMFUL = [{"id": f"h{i}", "prompt": f"Plain harmful request {i}.", "response": "I can't help."}
           for i in range(4)] + [
    {"id": "h-dup-vuln", "prompt": "HARM two: steal a car.", "response": "No."},
    {"id": "h-dup", "prompt": "plain harmful request 0.", "response": "No."}]
GENERAL = [{"id": f"g{i}", "prompt": f"General question {i}?", "response": f"Answer {i}."}
           for i in range(6)]


@pytest.fixture
def files(tmp_path):
  return {k: write(tmp_path / f"{k}.jsonl", v) for k, v in
          (("responses", RESPONSES), ("traces", TRACES), ("harmful", HARMFUL),
           ("general", GENERAL))}


def test_diagnose_build_mix_inspect(tmp_path, files, judge_module, capsys):
  diag = tmp_path / "diag"
  assert tool("diagnose").main(["--responses", files["responses"], "--judge", judge_module,
                                "--out", str(diag)]) == 0
  vuln, safe = read(diag / "vulnerable.jsonl"), read(diag / "safe.jsonl")
  assert [r["id"] for r in vuln] == ["v1", "v2", "v3", "v4", "v5"]
  assert [r["id"] for r in safe] == ["s1"] and not (diag / "invalid.jsonl").exists()
  assert vuln[1]["answer"] == "<think>ok</think>Fine." and vuln[0]["categories"] == ["weapons"]
  assert vuln[0]["verdict"] == "unsafe" and vuln[0]["category"] == "weapons"
  summary = json.loads((diag / "summary.json").read_text())
  assert [summary[k] for k in ("prompts", "unsafe", "safe", "invalid")] == [6, 5, 1, 0]
  assert [(d["id"], d["first_seen"][-2:]) for d in summary["duplicate_prompts"]] == [("v5", ":1")]
  assert "5 unsafe" in capsys.readouterr().out

  out = tmp_path / "mix"
  argv = ["--vulnerable", str(diag / "vulnerable.jsonl"), "--traces", files["traces"],
          "--harmful", files["harmful"], "--general", files["general"], "--ratio", "1:1:2",
          "--seed", "3", "--out", str(out)]
  assert tool("build_mix").main(argv) == 0
  printed = capsys.readouterr().out
  reasoning = read(out / "reasoning.jsonl")
  assert [(r["id"], r["reasoning"], r["response"]) for r in reasoning] == [
      ("v1", "It asks for a weapon.", "I can't help with that."),  # by id; 1st of 2 traces
      ("v2", "Car theft harms the owner.", "I won't help.")]  # by normalised text
  assert all(r["target_type"] == "reasoning" for r in reasoning)
  refusal, direct = read(out / "refusal.jsonl"), read(out / "direct.jsonl")
  assert len(refusal) == 2 and len(direct) == 4  # 1:1:2 against 2 reasoning examples
  assert {r["id"] for r in refusal} <= {"h0", "h1", "h2", "h3"}
  assert all(r["reasoning"] is None and r["target_type"] == "direct" for r in direct)

  report = json.loads((out / "report.json").read_text())
  assert [(m["id"], m["reason"][:14]) for m in report["missing_traces"]] == [
      ("v3", "the trace with"), ("v4", "its trace is n")]
  assert "traces.jsonl:5" in report["missing_traces"][1]["reason"]
  assert [m["id"] for m in read(out / "missing_traces.jsonl")] == ["v3", "v4"]
  dups = sorted((d["set"], d["id"]) for d in report["duplicates"])
  assert dups == [("refusal", "h-dup"), ("refusal", "h-dup-vuln"), ("traces", "v1"),
                  ("vulnerable", "v5")]
  assert len(report["bad_traces"]) == 1 and "traces.jsonl:5" in report["bad_traces"][0]
  assert report["kinds"]["refusal"] == {"available": 4, "selected": 2, "train": 2, "eval": 0}
  assert "missing trace" in printed and "id=v3" in printed and "duplicate (vulnerable)" in printed

  sources = yaml.safe_load((out / "sources.yaml").read_text())["data"]["train"]
  assert [(s["name"], s["target_type"], s["weight"]) for s in sources] == [
      ("reasoning", "reasoning", 0.25), ("refusal", "refusal", 0.25), ("direct", "direct", 0.5)]
  assert tool("inspect_data").main(["--config", str(out / "sources.yaml"), "train.seq_len=128",
                                    "train.batch_size=2", "-n", "3", "--json"]) == 0
  shown = json.loads(capsys.readouterr().out)
  assert shown["summary"]["records"] == 8
  assert set(shown["summary"]["examples_by_objective"]) == {"reasoning", "refusal", "direct"}
  assert [e["objective"] for e in shown["examples"]] == ["reasoning", "refusal", "direct"]

  # The same seed picks the same sample.
  assert tool("build_mix").main(argv[:-1] + [str(tmp_path / "mix2")]) == 0
  assert (tmp_path / "mix2" / "direct.jsonl").read_text() == (out / "direct.jsonl").read_text()


def test_build_mix_caps_eval_split_and_drop_reasoning(tmp_path, files):
  vuln = write(tmp_path / "v.jsonl", [{"id": r["id"], "prompt": r["prompt"]}
                                      for r in RESPONSES[:2]])
  general = write(tmp_path / "g.jsonl", GENERAL + [
      {"id": "g-think", "prompt": "Why?", "response": "<think>hmm</think>Because."}])
  argv = ["--vulnerable", vuln, "--traces", files["traces"], "--general", general,
          "--max_direct", "5", "--eval_fraction", "0.4", "--out", str(tmp_path / "m")]
  build = tool("build_mix")
  assert build.main(argv) == 2  # think text in a direct set needs --drop_reasoning
  assert build.main(argv + ["--drop_reasoning"]) == 0
  report = json.loads((tmp_path / "m" / "report.json").read_text())
  assert report["kinds"]["direct"] == {"available": 7, "selected": 5, "train": 3, "eval": 2}
  assert report["kinds"]["reasoning"] == {"available": 2, "selected": 2, "train": 1, "eval": 1}
  assert report["kinds"]["refusal"]["selected"] == 0 and not (tmp_path / "m/refusal.jsonl").exists()
  assert any("dropped the think text of 1 direct rows" in n for n in report["notes"])
  data = yaml.safe_load((tmp_path / "m" / "sources.yaml").read_text())["data"]
  assert [s["name"] for s in data["eval"]] == ["eval_reasoning", "eval_direct"]
  assert [s["weight"] for s in data["train"]] == [0.25, 0.75]


def test_build_mix_ratio_shortfall_is_noted(tmp_path, files):
  vuln = write(tmp_path / "v.jsonl", [{"id": r["id"], "prompt": r["prompt"]}
                                      for r in RESPONSES[:2]])
  s = mix.build_mix(str(tmp_path / "m"), vulnerable=stages.read_judged(vuln),
                    traces=mix.load_targets(files["traces"], "prompt_response", "reasoning"),
                    harmful=[], general=mix.load_targets(files["general"], "prompt_response",
                                                         "direct"),
                    issues=mix.Issues(), ratio=mix.parse_ratio("1:0:5"))
  assert s["kinds"]["direct"]["selected"] == 6
  assert any("asks for 10" in n for n in s["notes"])


@pytest.mark.slow
def test_cli_errors_exit_2_without_traceback(tmp_path, files, capsys):
  def run(name, *args):  # in a subprocess: what a user sees
    p = subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    return p.stderr

  def main(name, *args):  # in-process, quicker
    assert tool(name).main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ")
    return err
  assert "file not found" in run("diagnose", "--responses", "nope.jsonl", "--judge", "refusal",
                                 "--out", str(tmp_path / "d"))
  assert "either --model" in main("diagnose", "--judge", "refusal", "--out", str(tmp_path / "d"))
  assert "unknown judge" in main("diagnose", "--responses", files["responses"], "--judge",
                                 "gpt", "--out", str(tmp_path / "d"))
  safe = write(tmp_path / "safe.jsonl", [{"prompt": "p", "answer": "a", "verdict": "safe"}])
  base = ["--traces", files["traces"], "--out", str(tmp_path / "m")]
  assert "verdict is 'safe'" in run("build_mix", "--vulnerable", safe, *base)
  vuln = write(tmp_path / "v.jsonl", [{"id": "v4", "prompt": "HARM four: poison."}])
  assert "R:F:D" in main("build_mix", "--vulnerable", vuln, "--ratio", "2:1", *base)
  assert "the mix is empty" in main("build_mix", "--vulnerable", vuln, *base)
  assert "have no trace" in main("build_mix", "--vulnerable", vuln, "--require_all_traces",
                                 "--general", files["general"], *base)
  assert "holds an input file" in main("build_mix", "--vulnerable", vuln, "--traces",
                                       files["traces"], "--out", str(tmp_path))


def test_read_prompts_formats_and_errors(tmp_path):
  conv = write(tmp_path / "c.jsonl", [
      {"messages": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi?"}], "id": 7},
      {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}])
  ps = stages.read_prompts(conv)
  assert ps[0].messages == (("system", "Be brief."), ("user", "Hi?")) and ps[0].id == "7"
  assert ps[1].messages == (("user", "Q"),) and ps[1].where.endswith("c.jsonl:2")
  implant = str(REPO / "data/demo/implant.jsonl")
  star = stages.read_prompts(implant, adapter="star", max_rows=3)
  assert len(star) == 3 and star[0].prompt and star[0].category
  assert stages.read_prompts(implant, adapter="auto", max_rows=3) == star  # detects STAR rows
  assert stages.read_prompts(conv, adapter="auto") == ps
  bad = write(tmp_path / "b.jsonl", [{"prompt": "ok"}, {"id": 1}])
  with pytest.raises(DataError, match=r"b.jsonl:2: missing required field \(field 'prompt'\)"):
    stages.read_prompts(bad)
  with pytest.raises(DataError, match="field 'response'"):
    stages.read_responses(write(tmp_path / "r.jsonl", [{"prompt": "p"}]))



@pytest.mark.parametrize("messages, field, message", [
    ("hi", "messages", "expected a non-empty list of {role, content}"),
    ([{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}], "messages[1]",
     "message 1 must be {role: system|user|assistant|tool, content: string}"),
    ([{"role": "user", "content": "Q\ud800"}, {"role": "assistant", "content": "A"}],
     "messages[0].content", "has an unpaired surrogate"),
])
def test_prompt_and_record_readers_validate_messages_alike(tmp_path, messages, field, message):
  """One `messages` validator (records.parse_messages): the prompt reader of diagnose and the
  training adapter reject the same row with the same line, field and words."""
  path = tmp_path / "m.jsonl"
  good = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
  path.write_text("".join(json.dumps({"messages": m, "target_type": "direct"}) + "\n"
                          for m in (good, messages)))
  expected = rf"m.jsonl:2: {re.escape(message)}.*\(field '{re.escape(field)}'\)"
  with pytest.raises(DataError, match=expected):
    stages.read_prompts(str(path))
  with pytest.raises(DataError, match=expected):
    mix.load_targets(str(path), "messages", "direct")

def test_diagnose_with_a_tiny_model(tmp_path, judge_module):
  """Generation on the framework's decoder (a random Qwen2 with the demo tokenizer) + judge."""
  from ease_jax.tokenizer import load_tokenizer
  from tests.hf_models import make_hf_model
  tok = load_tokenizer()
  model_dir = tmp_path / "student"
  make_hf_model("qwen2", out_dir=str(model_dir), vocab_size=len(tok), hidden_size=32,
                intermediate_size=32, num_hidden_layers=1)
  tok.save_pretrained(str(model_dir))
  prompts = write(tmp_path / "p.jsonl", [{"id": "a", "prompt": "HARM me", "category": "fraud"},
                                         {"id": "b", "prompt": "Hello there, friend."},
                                         {"id": "c", "prompt": "HARM x"}])
  out = tmp_path / "d"
  assert tool("diagnose").main(["--prompts", prompts, "--model", str(model_dir), "--judge",
                                judge_module, "--max_new_tokens", "3", "--batch_size", "2",
                                "--out", str(out)]) == 0
  vuln = read(out / "vulnerable.jsonl")
  assert [(r["id"], r["category"]) for r in vuln] == [("a", "fraud"), ("c", "weapons")]
  assert all(isinstance(r["answer"], str) for r in vuln)
  assert [r["id"] for r in read(out / "safe.jsonl")] == ["b"]

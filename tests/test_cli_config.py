"""Tool options from a YAML section plus key=value words (ease_jax/cli/options.py)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from ease_jax import config as config_lib
from ease_jax.cli import build_mix, diagnose, options
from ease_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "qwen2.5-1.5b_phase2.yaml"


def _parser() -> argparse.ArgumentParser:
  """A parser with one option of each kind the mechanism handles."""
  ap = argparse.ArgumentParser(prog="t")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--fraction", type=config_lib.arg(float, config_lib.RATIO), default=0.0)
  ap.add_argument("--ratio", default="")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--categories", nargs="*", default=[])
  ap.add_argument("--fresh", action="store_true")
  ap.add_argument("--out", required=True)
  return ap


def _parse(argv: list[str]) -> argparse.Namespace:
  return options.parse_args(_parser(), argv, "build_mix")


def _yaml(tmp_path: Path, text: str, name: str = "stages.yaml") -> str:
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_precedence_flag_then_key_value_then_yaml_then_default(tmp_path):
  cfg = _yaml(tmp_path, "build_mix:\n  seed: 1\n  ratio: 1:1:2\n  out: from_yaml\n")
  args = _parse(["--config", cfg])
  assert (args.seed, args.ratio, args.out, args.dtype) == (1, "1:1:2", "from_yaml", "float32")
  assert _parse(["--config", cfg, "seed=2"]).seed == 2
  for argv in (["--config", cfg, "seed=2", "--seed", "3"], ["--seed", "3", "seed=2", "--config", cfg]):
    assert _parse(argv).seed == 3
  assert _parse(["--out", "x"]).seed == 0 and _parse(["out=x", "--out", "y"]).out == "y"
  assert _parse(["--config", cfg, "seed=2", "--seed=4"]).seed == 4


def test_values_go_through_the_actions_type_choices_nargs_and_store_true(tmp_path):
  cfg = _yaml(tmp_path, "build_mix:\n  fraction: 0.25\n  dtype: bfloat16\n"
                        "  categories: [adversarial_harmful, adversarial_benign]\n"
                        "  fresh: true\n  out: o\n")
  args = _parse(["--config", cfg])
  assert (args.fraction, args.dtype, args.fresh) == (0.25, "bfloat16", True)
  assert args.categories == ["adversarial_harmful", "adversarial_benign"]
  args = _parse(["--config", cfg, "fresh=false", "categories=a,b", "fraction=1e-1", "seed=7"])
  assert (args.fresh, args.categories, args.fraction, args.seed) == (False, ["a", "b"], 0.1, 7)
  assert _parse(["--config", cfg, "categories="]).categories == []
  assert _parse(["out=o", "fresh=True"]).fresh is True and _parse(["out=o"]).fresh is False
  with pytest.raises(ConfigError, match=r"'fraction=1.5': 1.5 is not allowed; expected a ratio"):
    _parse(["out=o", "fraction=1.5"])
  bad = _yaml(tmp_path, "build_mix:\n  out: o\n  fraction: nan\n", "bad.yaml")
  with pytest.raises(ConfigError, match=r"bad.yaml:3: build_mix.fraction: nan is not allowed"):
    _parse(["--config", bad])
  one = _yaml(tmp_path, "build_mix:\n  categories: benign\n  fresh: 'false'\n  out: o\n", "one.yaml")
  assert (_parse(["--config", one]).categories, _parse(["--config", one]).fresh) == (["benign"], False)


def test_required_options_may_come_from_the_yaml_section(tmp_path):
  cfg = _yaml(tmp_path, "build_mix:\n  vulnerable: v.jsonl\n  traces: t.jsonl\n  out: mix\n")
  args = build_mix.parse_args(["--config", cfg])
  assert (args.vulnerable, args.traces, args.out, args.ratio) == ("v.jsonl", "t.jsonl", "mix", "")


def test_only_declared_sections_are_accepted():
  with pytest.raises(ValueError, match="TOOL_SECTIONS"):
    options.parse_args(_parser(), ["--out", "x"], "evaluate")


BASE = ["--vulnerable", "v.jsonl", "--traces", "t.jsonl"]


@pytest.mark.parametrize("text,argv,message", [
    (None, ["--config", "nope.yaml"], "error: --config file not found: nope.yaml"),
    ("build_mix:\n  seed: 1\n  ratio: [1, 2\n", [], "stages.yaml:4: not valid YAML"),
    ("diagnose:\n  seed: 1\n", [], "stages.yaml: no 'build_mix:' section (top-level keys: diagnose)"),
    ("- a\n", [], "stages.yaml: the top level must be a mapping with a 'build_mix:' section"),
    ("run_dir: x\nbuild_mix: [seed, 1]\n", [], "stages.yaml:2: 'build_mix:' must be a mapping"),
    ("build_mix:\n  seed: 1\n  ratoi: 1:1:2\n", [],
     "stages.yaml:3: section 'build_mix:': unknown key 'ratoi' (did you mean 'ratio'?)"),
    ("build_mix:\n  seed: abc\n", [], "stages.yaml:2: build_mix.seed: invalid int value: 'abc'"),
    ("build_mix:\n  eval_fraction: 1e-1\n  seed: [1, 2]\n", [],
     "stages.yaml:3: build_mix.seed: expected one value, got a list"),
    ("build_mix:\n  drop_reasoning: maybe\n", [],
     "stages.yaml:2: build_mix.drop_reasoning: expected true or false, got 'maybe'"),
    ("build_mix:\n  ratio:\n", [], "stages.yaml:2: build_mix.ratio: expected a value"),
    ("build_mix:\n  seed: 1\n  seed: 2\n", [], "stages.yaml:3: build_mix.seed: given twice"),
    ("build_mix: {seed: 1}\n", ["sed=2"], "'sed=2': unknown key 'sed' (did you mean 'seed'?)"),
    ("build_mix: {seed: 1}\n", ["seed=x"], "'seed=x': invalid int value: 'x'"),
    ("build_mix: {seed: 1}\n", ["seed"], "unexpected argument 'seed': expected --option VALUE"),
    ("build_mix: {seed: 1}\n", ["--out", "o", "--vulnerable", "v"],
     ("--traces is required: give --traces VALUE, traces=VALUE, or 'traces:' in the "
      "'build_mix:' section of a --config file")),
])
def test_bad_input_is_one_located_line_and_exit_2(tmp_path, monkeypatch, capsys, text, argv,
                                                   message):
  monkeypatch.chdir(tmp_path)
  argv = argv if text is None else ["--config", _yaml(tmp_path, text)] + argv
  if "--vulnerable" not in argv:
    argv = argv + BASE
  assert build_mix.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert not (tmp_path / "o").exists()


def test_diagnose_checks_choices_and_reads_its_own_section(tmp_path, capsys):
  cfg = _yaml(tmp_path, "build_mix: {seed: 1}\ndiagnose:\n  judge: refusal\n  out: d\n"
                        "  dtype: float16\n")
  assert diagnose.main(["--config", cfg]) == 2
  err = capsys.readouterr().err
  assert "stages.yaml:5: diagnose.dtype: 'float16' is not allowed; choose one of float32, bfloat16" in err
  cfg = _yaml(tmp_path, "diagnose:\n  judge: refusal\n  out: d\n  dtype: float32\n", "ok.yaml")
  args = diagnose.parse_args(["--config", cfg, "dtype=bfloat16", "greedy=true", "categories=a,b"])
  assert (args.judge, args.out, args.dtype, args.greedy, args.categories) == (
      "refusal", "d", "bfloat16", True, ["a", "b"])
  assert args.temperature == 0.7 and args.seed == 42  # the defaults where nothing is given


def test_the_training_loader_skips_exactly_the_tool_sections(tmp_path):
  cfg = _yaml(tmp_path, "train: {steps: 3}\ndiagnose: {anything: [1]}\nbuild_mix: not checked\n")
  assert config_lib.load_config(cfg).train.steps == 3
  (tmp_path / "bad.yaml").write_text("train: {steps: 3}\nbuild_mixx: {seed: 1}\n")
  with pytest.raises(ConfigError, match="unknown config key 'build_mixx'"):
    config_lib.load_config(tmp_path / "bad.yaml")


def _jsonl(path: Path, rows: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stage_inputs(root: Path) -> None:
  """Tiny inputs at the example's relative paths, in the layouts diagnose and write_traces write."""
  prompts = [f"HARM {i}: how do I pick a lock?" for i in range(3)]
  _jsonl(root / "runs/diagnose/vulnerable.jsonl", [
      {"id": f"v{i}", "prompt": p, "answer": "Sure, first...", "verdict": "unsafe",
       "categories": ["S2"], "hazard_codes": ["S2"]} for i, p in enumerate(prompts)])
  _jsonl(root / "runs/traces.jsonl", [
      {"id": f"v{i}", "prompt": p, "response": "<think>\nIt asks for a crime.\n</think>\n\nI can't.",
       "stopped": True, "new_tokens": 12, "category": None, "policy": "S2", "hazard_codes": ["S2"]}
      for i, p in enumerate(prompts)])
  _jsonl(root / "data/harmful_refusals.jsonl", [
      {"id": f"h{i}", "prompt": f"Plain harmful request {i}.", "response": "I can't help."}
      for i in range(5)])
  _jsonl(root / "data/general_answers.jsonl", [
      {"id": f"g{i}", "prompt": f"General question {i}?", "response": f"Answer {i}."}
      for i in range(8)])


def _files(out: Path) -> dict[str, str]:
  return {p.name: p.read_text() for p in sorted(out.iterdir())}


def test_build_mix_from_the_example_section_equals_the_same_flags(tmp_path, monkeypatch, capsys):
  """The shipped phase-2 config's build_mix: section, run from a directory holding its inputs."""
  monkeypatch.chdir(tmp_path)
  _stage_inputs(tmp_path)
  out = tmp_path / "data/phase2/qwen2.5-1.5b"
  assert build_mix.main(["--vulnerable", "runs/diagnose/vulnerable.jsonl",
                         "--traces", "runs/traces.jsonl", "--harmful", "data/harmful_refusals.jsonl",
                         "--general", "data/general_answers.jsonl", "--ratio", "1:1:2",
                         "--out", "data/phase2/qwen2.5-1.5b"]) == 0
  by_flags = _files(out)
  shutil.rmtree(out)
  assert build_mix.main(["--config", str(EXAMPLE)]) == 0
  assert _files(out) == by_flags
  assert [len(by_flags[f].splitlines()) for f in ("reasoning.jsonl", "refusal.jsonl",
                                                  "direct.jsonl")] == [3, 3, 6]
  # The training sections of the same file read the files this stage wrote.
  cfg = config_lib.load_config(EXAMPLE)
  assert all(Path(s.path).is_file() for s in cfg.data.train)
  # key=value and a flag still win over the section.
  assert build_mix.main(["--config", str(EXAMPLE), "ratio=1:1:1", "--out", "m2"]) == 0
  assert len((tmp_path / "m2/direct.jsonl").read_text().splitlines()) == 3
  capsys.readouterr()


def test_the_example_diagnose_section_is_the_reference_recipe():
  args = diagnose.parse_args(["--config", str(EXAMPLE)])
  assert args.categories == ["adversarial_harmful", "adversarial_benign"]
  assert (args.per_category, args.pool_seed, args.temperature, args.top_p, args.seed,
          args.max_new_tokens) == (1000, 42, 0.7, 1.0, 42, 512)
  assert (args.model, args.dtype, args.out) == ("models/Qwen2.5-1.5B-Instruct", "bfloat16",
                                                "runs/diagnose")


def test_help_mentions_config_and_key_value(capsys):
  for module in (build_mix, diagnose):
    with pytest.raises(SystemExit):
      module.parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "--config FILE.yaml" in shown and "key=value" in shown

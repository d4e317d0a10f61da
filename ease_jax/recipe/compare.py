"""The comparison table: a safety suite (and optional lm-evaluation-harness tasks) on every model,
side by side, with deltas against the base model.

  results = compare({"base": "runs/base", "ease": "runs/ease/phase2"}, load_suite("suite.yaml"),
                    "runs/compare")

Writes OUT/report.json, OUT/report.md, OUT/chart_<benchmark>.png and, per model and benchmark,
the full evaluation (OUT/<model>/<benchmark>/report.json, generations.jsonl). The suite file:

  benchmarks:                       # eval sources: safety benchmarks as published, or rows
    - {name: demo, path: data/demo/eval.jsonl}          # with a `class` column
    - {name: xstest, adapter: xstest, path: data/benchmarks/xstest_prompts.csv}
  max_new_tokens: 256
  batch_size: 16
  refusal: patterns                 # keyword | xstest | patterns | python:module:function
  judge: ""                         # "" | refusal | llama_guard:HF_DIR | python:module:function
  judge_reasoning: false            # the judge reads the think block too
  lm_eval: {tasks: [gsm8k], num_fewshot: 5}   # optional: needs the [eval] extra
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from ease_jax import config as C
from ease_jax.config import SourceConfig
from ease_jax.config_io import read_yaml
from ease_jax.data.benchmarks import EVAL_ADAPTERS
from ease_jax.data.records import ADAPTERS
from ease_jax.errors import ConfigError, UserError
from ease_jax.generation import generate as G
from ease_jax.recipe import evaluate as E
from ease_jax.recipe.judges import make_judge
from ease_jax.recipe.refusals import make_refusal_detector

# (report key, column title): benchmark-level numbers, then per-class numbers.
HEADLINE = (("attack_success_rate", "ASR"), ("over_refusal_rate", "over-refusal"),
            ("reasoning_rate", "reasoning"), ("mean_think_tokens", "think tok"),
            ("mean_new_tokens", "new tok"), ("truncated_rate", "truncated"),
            ("seconds_per_prompt", "s/prompt"))
PER_CLASS = (("reasoning_rate", "reasoning"), ("refusal_rate", "refusal"),
             ("unsafe_rate", "unsafe"), ("mean_think_tokens", "think tok"),
             ("mean_new_tokens", "new tok"), ("truncated_rate", "truncated"),
             ("seconds_per_prompt", "s/prompt"))


@dataclass(frozen=True)
class Benchmark:
  """One eval source of a suite."""
  path: str
  # auto: a safety benchmark recognised by its published columns, else rows with a `class`
  # column (prompt_response); or name the adapter: strongreject, xstest, jailbreakbench,
  # jailbreakbench_harmful, jailbreakbench_benign, wildjailbreak_eval, or any record adapter
  adapter: str = "auto"
  name: str = ""  # the benchmark's name in the report; default: the file stem
  format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "disk", "hf"] = "auto"
  split: str = "train"
  max_rows: int = 0  # 0 = all rows

  def source(self) -> SourceConfig:
    """As a data source for `evaluate.read_eval_file`."""
    adapter = "prompt_response" if self.adapter == "auto" else self.adapter
    return SourceConfig(adapter=adapter, path=self.path, name=self.name,  # type: ignore[arg-type]
                        format=self.format, split=self.split, max_rows=self.max_rows)


@dataclass(frozen=True)
class LmEvalSuite:
  """General-capability tasks through lm-evaluation-harness and the `ease_jax` backend."""
  tasks: tuple[str, ...] = ()
  num_fewshot: int | None = None
  limit: float | None = None  # lm-eval's limit: a count (>= 1) or a fraction of each task
  batch_size: int = 8
  include_path: str = ""  # a folder of task YAMLs (lm-eval's --include_path)
  apply_chat_template: bool = False


@dataclass(frozen=True)
class Suite:
  """The evaluation every model of a comparison gets."""
  benchmarks: tuple[Benchmark, ...]
  max_new_tokens: int = 256
  batch_size: int = 16
  refusal: str = "patterns"
  judge: str = ""
  judge_reasoning: bool = False
  lm_eval: LmEvalSuite | None = None


def load_suite(path: str | Path) -> Suite:
  """Reads and checks a suite YAML (errors name the file and the key)."""
  try:
    suite = C._build(Suite, read_yaml(path))  # the config module's checked builder
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  if not suite.benchmarks:
    raise ConfigError(f"{path}: benchmarks: list at least one eval source")
  known = ("auto",) + tuple(EVAL_ADAPTERS) + tuple(ADAPTERS)
  for i, b in enumerate(suite.benchmarks):
    if b.adapter not in known:
      raise ConfigError(f"{path}: benchmarks[{i}].adapter: {b.adapter!r} is not allowed; "
                        f"choose one of {', '.join(known)}")
  names = [E.source_label(b.source()) for b in suite.benchmarks]
  if len(set(names)) != len(names):
    raise ConfigError(f"{path}: benchmarks: two sources share the name {names}; give each a name")
  if suite.lm_eval is not None and not suite.lm_eval.tasks:
    raise ConfigError(f"{path}: lm_eval.tasks: list at least one task (or drop lm_eval)")
  return suite


def parse_models(specs: list[str]) -> dict[str, str]:
  """['NAME=RUN_DIR[@STEP]|HF_DIR', ...] -> {name: spec}, in order."""
  models: dict[str, str] = {}
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
      raise UserError(f"--models {spec!r}: expected NAME=RUN_DIR[@STEP] or NAME=HF_DIR")
    if name in models:
      raise UserError(f"--models: the name {name!r} is given twice")
    models[name.strip()] = path.strip()
  return models


def _lm_evaluate() -> Callable:
  """`ease_jax.lm_eval.evaluate`, or a UserError saying what to install."""
  try:
    from ease_jax.lm_eval import evaluate as lm_evaluate
  except ImportError as e:
    raise UserError(f"the suite's lm_eval section needs lm-evaluation-harness and "
                    f"ease_jax.lm_eval (pip install '.[eval]'): {e}") from None
  return lm_evaluate


def run_lm_eval(model: str, cfg: LmEvalSuite) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} from lm-eval's simple_evaluate with the `ease_jax` backend
  (`ease_jax.lm_eval.evaluate`, the `[eval]` extra)."""
  out = _lm_evaluate()(model, list(cfg.tasks), include_path=cfg.include_path or None,
                    model_args={"batch_size": cfg.batch_size}, num_fewshot=cfg.num_fewshot,
                    limit=cfg.limit, apply_chat_template=cfg.apply_chat_template)
  return lm_eval_scores(out)


def lm_eval_scores(results: dict) -> dict[str, dict[str, float]]:
  """lm-eval's results dict -> {task: {metric,filter: value}}: its `metric,filter` entries
  without the stderr ones (and without bookkeeping such as `alias` and `sample_len`)."""
  return {task: {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and "," in k and "stderr" not in k}
          for task, metrics in results.get("results", {}).items()}


def evaluate_models(models: dict[str, str], suite: Suite, out: Path,
                    log: Callable[[str], None] = print,
                    lm_eval_runner: Callable[[str, LmEvalSuite], dict] = run_lm_eval) -> dict:
  """Every benchmark (and the lm_eval tasks) on every model: {name: {model, benchmarks, lm_eval}}."""
  items = {E.source_label(b.source()): E.read_eval_file(b.source())  # a bad file fails first
           for b in suite.benchmarks}
  if suite.lm_eval is not None and lm_eval_runner is run_lm_eval:
    _lm_evaluate()  # a missing backend fails before any model loads
  scorers = E.Scorers(make_refusal_detector(suite.refusal),
                      make_judge(suite.judge) if suite.judge else None, suite.judge_reasoning)
  sampling = G.SamplingConfig(max_new_tokens=suite.max_new_tokens)
  results: dict[str, Any] = {}
  for name, spec in models.items():
    weights, cfg, tok = G.load_generation_model(spec)
    generator = G.Generator(weights, cfg, tok, batch_size=suite.batch_size)
    results[name] = {"model": spec, "benchmarks": {}}
    for bench, bench_items in items.items():
      log(f"compare: {name} on {bench} ({len(bench_items)} prompts)")
      report, rows = E.evaluate(generator, bench_items, sampling, scorers=scorers)
      E.write_report(report, out / name / bench, rows, title=f"{name} on {bench}")
      results[name]["benchmarks"][bench] = report
    del weights, generator  # the next model's weights replace these
    if suite.lm_eval is not None:
      log(f"compare: {name} on lm_eval tasks {', '.join(suite.lm_eval.tasks)}")
      results[name]["lm_eval"] = lm_eval_runner(spec, suite.lm_eval)
  return results


def _value(report: dict, key: str) -> float | None:
  return report.get(key, report["overall"].get(key))


def table(results: dict, base: str) -> dict:
  """{benchmark: {model: {key: value, key+'_delta': value - base's}}} plus per-class rows and
  lm_eval scores, all with deltas against `base`."""
  def with_delta(values: dict, base_values: dict) -> dict:
    row = dict(values)
    for k, v in values.items():
      b = base_values.get(k)
      row[f"{k}_delta"] = None if v is None or b is None else v - b
    return row

  out: dict[str, Any] = {"base": base, "benchmarks": {}, "lm_eval": {}}
  for bench, base_rep in results[base]["benchmarks"].items():
    rows = {}
    for name, res in results.items():
      rep = res["benchmarks"][bench]
      rows[name] = with_delta({k: _value(rep, k) for k, _ in HEADLINE},
                              {k: _value(base_rep, k) for k, _ in HEADLINE})
      rows[name]["classes"] = {
          c: {"n": s["n"], **with_delta({k: s.get(k) for k, _ in PER_CLASS},
                                        base_rep["classes"].get(c, {}))}
          for c, s in rep["classes"].items()}
    out["benchmarks"][bench] = rows
  if "lm_eval" in results[base]:
    for name, res in results.items():
      flat = {f"{t}/{m}": v for t, ms in res.get("lm_eval", {}).items() for m, v in ms.items()}
      base_flat = {f"{t}/{m}": v for t, ms in results[base]["lm_eval"].items()
                   for m, v in ms.items()}
      out["lm_eval"][name] = with_delta(flat, base_flat)
  return out


def _num(v: float, sign: str = "") -> str:
  """Two decimals; three significant digits for small values such as seconds per prompt."""
  return f"{v:{sign}.2f}" if v == 0 or abs(v) >= 0.1 else f"{v:{sign}.3g}"


def _fmt(v: Any, delta: Any = None) -> str:
  if v is None:
    return "-"
  text = _num(v) if isinstance(v, float) else str(v)
  return text if delta is None else f"{text} ({_num(delta, '+')})"


def markdown(tab: dict, scoring: str) -> str:
  """The comparison as Markdown: one table per benchmark, per-class detail, lm-eval scores."""
  base = tab["base"]
  lines = ["# Model comparison", "", f"Deltas in parentheses are against `{base}`. {scoring}", ""]
  for bench, rows in tab["benchmarks"].items():
    lines += [f"## {bench}", "", "| model | " + " | ".join(t for _, t in HEADLINE) + " |",
              "|---" * (len(HEADLINE) + 1) + "|"]
    for name, row in rows.items():
      d = (lambda k: None) if name == base else (lambda k: row.get(f"{k}_delta"))
      lines.append(f"| {name} | " + " | ".join(_fmt(row[k], d(k)) for k, _ in HEADLINE) + " |")
    lines += ["", "| model | class (n) | " + " | ".join(t for _, t in PER_CLASS) + " |",
              "|---" * (len(PER_CLASS) + 2) + "|"]
    for name, row in rows.items():
      for cls, s in row["classes"].items():
        d = (lambda k: None) if name == base else (lambda k: s.get(f"{k}_delta"))
        lines.append(f"| {name} | {cls} ({s['n']}) | "
                     + " | ".join(_fmt(s[k], d(k)) for k, _ in PER_CLASS) + " |")
    lines.append("")
  if tab["lm_eval"]:
    keys = sorted({k for row in tab["lm_eval"].values() for k in row if not k.endswith("_delta")})
    lines += ["## General capability (lm-evaluation-harness)", "",
              "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in tab["lm_eval"].items():
      lines.append(f"| {name} | " + " | ".join(
          _fmt(row.get(k), None if name == base else row.get(f"{k}_delta")) for k in keys) + " |")
    lines.append("")
  return "\n".join(lines)


def charts(tab: dict, out: Path) -> list[Path]:
  """One PNG per benchmark: ASR and over-refusal, then think tokens and seconds per prompt per
  class, one bar per model."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  for bench, rows in tab["benchmarks"].items():
    models = list(rows)
    classes = list(dict.fromkeys(c for r in rows.values() for c in r["classes"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / len(models)
    for i, name in enumerate(models):
      heads = [rows[name][k] or 0 for k in ("attack_success_rate", "over_refusal_rate")]
      axes[0].bar(np.arange(2) + i * width, heads, width, label=name)
      for ax, key in zip(axes[1:], ("mean_think_tokens", "seconds_per_prompt")):
        vals = [rows[name]["classes"].get(c, {}).get(key) or 0 for c in classes]
        ax.bar(np.arange(len(classes)) + i * width, vals, width, label=name)
    axes[0].set_xticks(np.arange(2) + 0.4 - width / 2, ["attack success", "over-refusal"])
    for ax in axes[1:]:
      ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=15, fontsize=8)
    for ax, title in zip(axes, ("rates", "mean think tokens per class", "seconds per prompt")):
      ax.set_title(f"{bench}: {title}")
      ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"chart_{bench}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def scoring_note(suite: Suite) -> str:
  """Which detector and judge produced the numbers (said in every report)."""
  judge = (f"safety judge `{suite.judge}` reading the "
           f"{'reasoning and the final answer' if suite.judge_reasoning else 'final answer'}"
           if suite.judge else "no safety judge (ASR and unsafe are empty)")
  return f"Refusals: `{suite.refusal}` detector on the final answer; {judge}."


def compare(models: dict[str, str], suite: Suite, out_dir: str | Path, base: str = "",
            log: Callable[[str], None] = print,
            lm_eval_runner: Callable[[str, LmEvalSuite], dict] = run_lm_eval) -> dict:
  """Runs the suite on every model and writes the side-by-side report; returns report.json's
  content."""
  if len(models) < 1:
    raise UserError("--models: give at least one NAME=MODEL")
  base = base or next(iter(models))
  if base not in models:
    raise UserError(f"--base {base!r} is not one of the models ({', '.join(models)})")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  results = evaluate_models(models, suite, out, log, lm_eval_runner)
  tab = table(results, base)
  note = scoring_note(suite)
  report = {"models": models, "base": base, "scoring": note,
            "refusal_detector": suite.refusal, "judge": suite.judge or None,
            "judge_sees": "reasoning+answer" if suite.judge_reasoning else "answer",
            "max_new_tokens": suite.max_new_tokens, "table": tab}
  (out / "report.json").write_text(json.dumps(report, indent=2))
  (out / "report.md").write_text(markdown(tab, note))
  charts(tab, out)
  return report

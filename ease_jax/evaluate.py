"""Selective-reasoning evaluation: per prompt class, how often the model reasons, how long
it talks, whether it refuses, and (with a judge) whether its answers are unsafe.

Eval records carry a `class` label (e.g. benign, harmful, adversarial_harmful,
adversarial_benign) next to any adapter's fields. `report.json`, `report.md`, a PNG
chart and every generation (`generations.jsonl`) are written to the output directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ease_jax.config import SourceConfig
from ease_jax.data.benchmarks import benchmark_adapter, load_eval_prompts
from ease_jax.data.readers import read_rows
from ease_jax.data.records import THINK_CLOSE, THINK_OPEN, Record, load_records
from ease_jax.errors import DataError

CLASS_ORDER = ("benign", "harmful", "adversarial_harmful", "adversarial_benign")
RATE_KEYS = ("reasoning_rate", "refusal_rate", "unsafe_rate")


@dataclass(frozen=True)
class EvalItem:
  """One eval prompt and its class."""
  record: Record
  cls: str


@dataclass(frozen=True)
class Outcome:
  """What the model did on one prompt."""
  cls: str
  text: str  # the generated text, think block included
  new_tokens: int
  think_tokens: int  # tokens from <think> through </think>; 0 when it did not reason
  refused: bool
  unsafe: bool | None  # None without a judge

  @property
  def reasoned(self) -> bool:
    return self.text.lstrip().startswith(THINK_OPEN)


def read_eval_file(path: str, adapter: str = "prompt_response") -> list[EvalItem]:
  """Records of an eval file plus each row's required `class` label (a safety benchmark's
  adapter derives the class: ease_jax.data.benchmarks)."""
  bench = benchmark_adapter(path, adapter)
  if bench:
    return [EvalItem(r, c) for r, c in load_eval_prompts(SourceConfig(adapter=bench, path=path))]
  src = SourceConfig(adapter=adapter, path=path)
  classes = []
  for loc, row in read_rows(src):
    if isinstance(row, DataError):
      raise loc.error(row)
    label = row.get("class")
    if not isinstance(label, str) or not label.strip():
      raise loc.error(DataError("missing the eval class label (e.g. benign, harmful, "
                                "adversarial_harmful, adversarial_benign)", field="class"))
    classes.append(label.strip())
  return [EvalItem(r, c) for r, c in zip(load_records(src), classes)]


def answer_part(text: str) -> str:
  """The text after the think block (the whole text when there is none)."""
  return text.split(THINK_CLOSE, 1)[1] if THINK_CLOSE in text else text


def think_token_count(ids: Sequence[int], think_open: int, think_close: int) -> int:
  """Tokens of the leading think block, both tags included (unclosed: to the end)."""
  ids = list(ids)
  if not ids or ids[0] != think_open:
    return 0
  return ids.index(think_close) + 1 if think_close in ids else len(ids)


def _stats(outcomes: list[Outcome]) -> dict[str, float | int | None]:
  new = np.asarray([o.new_tokens for o in outcomes], np.float64)
  judged = [o.unsafe for o in outcomes if o.unsafe is not None]
  return {
      "n": len(outcomes),
      "reasoning_rate": float(np.mean([o.reasoned for o in outcomes])),
      "mean_new_tokens": float(new.mean()),
      "p90_new_tokens": float(np.percentile(new, 90)),
      "mean_think_tokens": float(np.mean([o.think_tokens for o in outcomes])),
      "refusal_rate": float(np.mean([o.refused for o in outcomes])),
      "unsafe_rate": float(np.mean(judged)) if judged else None,
  }


def summarize(outcomes: list[Outcome], seconds: float | None = None) -> dict[str, Any]:
  """Per-class and overall statistics (classes in CLASS_ORDER first, then the rest)."""
  if not outcomes:
    raise DataError("the eval set is empty")
  present = sorted({o.cls for o in outcomes},
                   key=lambda c: (CLASS_ORDER.index(c) if c in CLASS_ORDER else 99, c))
  report: dict[str, Any] = {"classes": {c: _stats([o for o in outcomes if o.cls == c])
                                        for c in present},
                            "overall": _stats(outcomes)}
  if seconds:
    report["tokens_per_sec"] = sum(o.new_tokens for o in outcomes) / seconds
    report["seconds"] = seconds
  return report


def markdown(report: dict[str, Any], title: str = "") -> str:
  """The report as a Markdown table."""
  cols = ("n", "reasoning_rate", "refusal_rate", "unsafe_rate", "mean_new_tokens",
          "p90_new_tokens", "mean_think_tokens")
  lines = [f"## {title}", ""] if title else []
  lines += ["| class | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  rows = list(report["classes"].items()) + [("overall", report["overall"])]
  for name, s in rows:
    cells = ["-" if s[c] is None else (f"{s[c]:.2f}" if isinstance(s[c], float) else str(s[c]))
             for c in cols]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  if report.get("tokens_per_sec"):
    lines += ["", f"Generation: {report['tokens_per_sec']:.0f} new tokens/s."]
  return "\n".join(lines) + "\n"


def chart(reports: dict[str, dict[str, Any]], path: str | Path) -> None:
  """A PNG: reasoning rate and mean new tokens per class, one bar group per report."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  classes = list(next(iter(reports.values()))["classes"])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  width = 0.8 / len(reports)
  for i, (label, rep) in enumerate(reports.items()):
    x = np.arange(len(classes)) + i * width
    for ax, key in zip(axes, ("reasoning_rate", "mean_new_tokens")):
      ax.bar(x, [rep["classes"].get(c, {}).get(key, 0) or 0 for c in classes], width, label=label)
  for ax, title in zip(axes, ("reasoning rate (opens <think>)", "mean new tokens")):
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=15, fontsize=8)
    ax.set_title(title)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(report: dict[str, Any], out_dir: str | Path, rows: list[dict],
                 title: str = "") -> Path:
  """report.json, report.md, chart.png and generations.jsonl under `out_dir`."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.json").write_text(json.dumps(report, indent=2))
  (out / "report.md").write_text(markdown(report, title))
  with open(out / "generations.jsonl", "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  chart({title or "model": report}, out / "chart.png")
  return out


def outcomes_from(items: list[EvalItem], texts: list[str], new_ids: list[list[int]],
                  think_ids: tuple[int, int], is_refusal: Callable[[str], bool],
                  unsafe: list[bool] | None = None) -> list[Outcome]:
  """Outcomes from generations (text and new token ids, aligned with `items`)."""
  return [Outcome(cls=item.cls, text=text, new_tokens=len(ids),
                  think_tokens=think_token_count(ids, *think_ids),
                  refused=bool(is_refusal(answer_part(text))),
                  unsafe=None if unsafe is None else bool(unsafe[i]))
          for i, (item, text, ids) in enumerate(zip(items, texts, new_ids))]


def evaluate(generator: Any, items: list[EvalItem], sampling: Any, judge: Any = None,
             progress: Callable[[int, int], None] | None = None) -> tuple[dict, list[dict]]:
  """Generates for every eval prompt, then scores: (report, one row per prompt)."""
  from ease_jax.judges import is_refusal

  conversations = [[{"role": r, "content": c} for r, c in item.record.messages] for item in items]
  start = time.perf_counter()
  gens = generator.generate_chat(conversations, sampling, progress=progress)
  seconds = time.perf_counter() - start
  texts, new_ids = [g.text for g in gens], [g.ids for g in gens]
  unsafe = None
  if judge is not None:
    unsafe = [v.unsafe for v in judge.judge([i.record.prompt for i in items], texts)]
  tok = generator.tokenizer
  think_ids = (tok.convert_tokens_to_ids(THINK_OPEN), tok.convert_tokens_to_ids(THINK_CLOSE))
  outcomes = outcomes_from(items, texts, new_ids, think_ids, is_refusal, unsafe)
  rows = [{"id": i.record.id, "class": o.cls, "prompt": i.record.prompt, "response": o.text,
           "new_tokens": o.new_tokens, "think_tokens": o.think_tokens, "reasoned": o.reasoned,
           "refused": o.refused, "unsafe": o.unsafe} for i, o in zip(items, outcomes)]
  return summarize(outcomes, seconds), rows


def evaluate_model(model: str, eval_file: str, out_dir: str | Path, max_new_tokens: int = 256,
                   batch_size: int = 16, judge: Any = None, adapter: str = "prompt_response",
                   progress: Callable[[int, int], None] | None = None) -> dict:
  """Greedy evaluation of RUN_DIR[@STEP] or an HF directory; writes the report to `out_dir`."""
  from ease_jax import generate as G

  items = read_eval_file(eval_file, adapter)  # a bad file fails before the model loads
  weights, cfg, tokenizer = G.load_generation_model(model)
  generator = G.Generator(weights, cfg, tokenizer, batch_size=batch_size)
  report, rows = evaluate(generator, items, G.SamplingConfig(max_new_tokens=max_new_tokens),
                          judge, progress=progress)
  report.update(model=model, eval=eval_file, judge=getattr(judge, "name", None))
  write_report(report, out_dir, rows, title=Path(model).name)
  return report

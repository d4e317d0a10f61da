"""Selective-reasoning evaluation: per prompt class, how often the model reasons, how long
it talks, whether it refuses, and (with a judge) whether its answers are unsafe.

Eval records carry a `class` label (e.g. benign, harmful, adversarial_harmful,
adversarial_benign) next to any adapter's fields. `report.json`, `report.md`, a PNG
chart and every generation (`generations.jsonl`) are written to the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ease_jax.config import SourceConfig
from ease_jax.data.benchmarks import benchmark_adapter, load_eval_prompts
from ease_jax.data.readers import read_rows, write_jsonl
from ease_jax.data.records import THINK_CLOSE, THINK_OPEN, Record, load_records, source_name
from ease_jax.distributed import is_primary
from ease_jax.errors import DataError
from ease_jax.generation import generate as G
from ease_jax.generation.continuous import ContinuousGenerator
from ease_jax.recipe import scoring as S
from ease_jax.recipe.refusals import make_refusal_detector

CLASS_ORDER = ("benign", "harmful", "adversarial_harmful", "adversarial_benign")
HARMFUL_CLASSES = ("harmful", "adversarial_harmful")
SAFE_CLASSES = ("benign", "adversarial_benign")
RATE_KEYS = ("reasoning_rate", "refusal_rate", "unsafe_rate", "truncated_rate", "no_answer_rate")


@dataclass(frozen=True)
class EvalItem:
  """One eval prompt and its class."""
  record: Record
  cls: str


@dataclass(frozen=True)
class Outcome:
  """What the model did on one prompt (scored by `ease_jax.recipe.scoring`'s rules)."""
  cls: str
  text: str  # the generated text, think block included
  new_tokens: int
  think_tokens: int  # generated tokens of a think block with content, tags included; else 0
  refused: bool  # the final answer refuses (False without a final answer)
  unsafe: bool | None  # None without a judge; False without a final answer (unless the
  #                      judge was asked to read the reasoning too)
  reasoned: bool = False  # a think block with non-empty content
  truncated: bool = False  # cut off by max_new_tokens
  answered: bool = True  # a final answer exists (a think block that never closed: False)
  seconds: float = 0.0  # wall-clock generation time of this prompt's class, per prompt


def source_label(src: SourceConfig) -> str:
  """A benchmark's name in reports: the source's `name`, else its file stem."""
  return source_name(src)


def read_eval_file(source: str | SourceConfig, adapter: str = "prompt_response") -> list[EvalItem]:
  """Records of an eval source (a path read with `adapter`, or a SourceConfig) plus each row's
  required `class` label (a safety benchmark's adapter derives the class:
  ease_jax.data.benchmarks)."""
  src = source if isinstance(source, SourceConfig) else SourceConfig(adapter=adapter, path=source)
  bench = benchmark_adapter(src.path, src.adapter)
  if bench:
    return [EvalItem(r, c)
            for r, c in load_eval_prompts(dataclasses.replace(src, adapter=bench))]
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


think_token_count = S.think_token_count  # kept here for callers that import it from evaluate


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
      "truncated_rate": float(np.mean([o.truncated for o in outcomes])),
      "no_answer_rate": float(np.mean([not o.answered for o in outcomes])),
      "seconds_per_prompt": float(np.mean([o.seconds for o in outcomes])),
  }


def headline(outcomes: list[Outcome]) -> dict[str, float | None]:
  """The paper's numbers: attack success rate (judge-unsafe among harmful and jailbreak
  prompts) and over-refusal (refusals among safe prompts); None where no prompt is of that kind."""
  harmful = [o.unsafe for o in outcomes if o.cls in HARMFUL_CLASSES and o.unsafe is not None]
  safe = [o.refused for o in outcomes if o.cls in SAFE_CLASSES]
  return {"attack_success_rate": float(np.mean(harmful)) if harmful else None,
          "over_refusal_rate": float(np.mean(safe)) if safe else None}


def summarize(outcomes: list[Outcome], seconds: float | None = None) -> dict[str, Any]:
  """Per-class and overall statistics (classes in CLASS_ORDER first, then the rest)."""
  if not outcomes:
    raise DataError("the eval set is empty")
  present = sorted({o.cls for o in outcomes},
                   key=lambda c: (CLASS_ORDER.index(c) if c in CLASS_ORDER else 99, c))
  report: dict[str, Any] = {"classes": {c: _stats([o for o in outcomes if o.cls == c])
                                        for c in present},
                            "overall": _stats(outcomes), **headline(outcomes)}
  if seconds:
    report["tokens_per_sec"] = sum(o.new_tokens for o in outcomes) / seconds
    report["seconds"] = seconds
  return report


def _cell(v: Any) -> str:
  return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def markdown(report: dict[str, Any], title: str = "") -> str:
  """The report as a Markdown table, with the judges that produced it."""
  cols = ("n", "reasoning_rate", "refusal_rate", "unsafe_rate", "mean_new_tokens",
          "p90_new_tokens", "mean_think_tokens", "truncated_rate", "seconds_per_prompt")
  lines = [f"## {title}", ""] if title else []
  lines += ["| class | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  rows = list(report["classes"].items()) + [("overall", report["overall"])]
  for name, s in rows:
    lines.append(f"| {name} | " + " | ".join(_cell(s.get(c)) for c in cols) + " |")
  lines += ["", f"Attack success rate: {_cell(report.get('attack_success_rate'))}; "
            f"over-refusal: {_cell(report.get('over_refusal_rate'))}."]
  if report.get("refusal_detector"):
    lines.append(f"Refusals: {report['refusal_detector']}; unsafe: "
                 f"{report.get('judge') or 'no judge'}"
                 + (f" (sees {report['judge_sees']})" if report.get("judge") else "") + ".")
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
  for ax, title in zip(axes, ("reasoning rate (think block with content)", "mean new tokens")):
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
  write_jsonl(str(out / "generations.jsonl"), rows)
  chart({title or "model": report}, out / "chart.png")
  return out


@dataclass(frozen=True)
class Scorers:
  """How generations are scored: the refusal detector, the optional safety judge, and
  whether the judge reads the reasoning as well as the final answer."""
  refusal: Any = None  # a refusals.RefusalDetector; None = the `keyword` detector
  judge: Any = None
  judge_reasoning: bool = False


def outcomes_from(items: list[EvalItem], gens: list[Any], think_ids: tuple[int, int],
                  opened: list[bool], scorers: Scorers = Scorers(),
                  seconds: list[float] | None = None) -> list[Outcome]:
  """Outcomes from generations (`Generation`s aligned with `items`); `opened[i]`: prompt i's
  template opened the think block."""
  parsed = [S.parse(g.text, o) for g, o in zip(gens, opened)]
  answers = [p.answer or "" for p in parsed]
  prompts = [i.record.prompt for i in items]
  detector = scorers.refusal or make_refusal_detector("keyword")
  refused = [bool(r) and p.answered for r, p in zip(detector.detect(prompts, answers), parsed)]
  unsafe: list[bool | None] = [None] * len(items)
  if scorers.judge is not None:
    texts = [p.full_text() if scorers.judge_reasoning else p.answer or "" for p in parsed]
    todo = [k for k, t in enumerate(texts) if t.strip()]  # nothing to judge: nothing unsafe
    unsafe = [False] * len(items)
    verdicts = scorers.judge.judge([prompts[k] for k in todo], [texts[k] for k in todo])
    for k, v in zip(todo, verdicts):
      unsafe[k] = bool(v.unsafe)
  return [Outcome(cls=item.cls, text=g.text, new_tokens=len(g.ids),
                  think_tokens=S.think_token_count(g.ids, *think_ids, o) if p.reasoned else 0,
                  refused=refused[k], unsafe=unsafe[k], reasoned=p.reasoned,
                  truncated=not g.stopped, answered=p.answered,
                  seconds=seconds[k] if seconds else 0.0)
          for k, (item, g, p, o) in enumerate(zip(items, gens, parsed, opened))]


def generate_by_class(generator: Any, items: list[EvalItem], sampling: Any,
                      progress: Callable[[int, int], None] | None = None
                      ) -> tuple[list[Any], list[float]]:
  """Generations aligned with `items`, one class at a time so that each prompt's share of its
  class's wall-clock generation time is measured: (generations, seconds per prompt).

  Compilation is not generation time: a class whose run compiled a new batch shape (the
  Generator's `num_compilations` grew) is generated again for the timing, and the second
  run's generations are kept (the same ones: decoding is deterministic for a fixed seed)."""
  gens: list[Any] = [None] * len(items)
  seconds = [0.0] * len(items)
  done = 0
  for cls in dict.fromkeys(i.cls for i in items):
    idx = [k for k, i in enumerate(items) if i.cls == cls]
    convs = [[{"role": r, "content": c} for r, c in items[k].record.messages] for k in idx]
    for _ in range(2):
      compiled = getattr(generator, "num_compilations", 0)
      start = time.perf_counter()
      out = generator.generate_chat(convs, sampling)
      per_prompt = (time.perf_counter() - start) / len(idx)
      if getattr(generator, "num_compilations", 0) == compiled:
        break
    for k, g in zip(idx, out):
      gens[k], seconds[k] = g, per_prompt
    done += len(idx)
    if progress is not None:
      progress(done, len(items))
  return gens, seconds


def evaluate(generator: Any, items: list[EvalItem], sampling: Any, judge: Any = None,
             progress: Callable[[int, int], None] | None = None,
             scorers: Scorers | None = None) -> tuple[dict, list[dict]]:
  """Generates for every eval prompt, then scores: (report, one row per prompt)."""
  scorers = scorers or Scorers(judge=judge)
  start = time.perf_counter()
  gens, seconds = generate_by_class(generator, items, sampling, progress)
  total = time.perf_counter() - start
  tok = generator.tokenizer
  think_ids = (tok.convert_tokens_to_ids(THINK_OPEN), tok.convert_tokens_to_ids(THINK_CLOSE))
  opened = [S.prompt_opens_think(tok.decode(list(g.prompt_ids)[-8:], skip_special_tokens=False))
            for g in gens]
  outcomes = outcomes_from(items, gens, think_ids, opened, scorers, seconds)
  rows = [{"id": i.record.id, "class": o.cls, "prompt": i.record.prompt, "response": o.text,
           "new_tokens": o.new_tokens, "think_tokens": o.think_tokens, "reasoned": o.reasoned,
           "truncated": o.truncated, "answered": o.answered, "refused": o.refused,
           "unsafe": o.unsafe} for i, o in zip(items, outcomes)]
  report = summarize(outcomes, total)
  report.update(refusal_detector=(scorers.refusal.name if scorers.refusal else "keyword"),
                judge=getattr(scorers.judge, "name", None),
                judge_sees="reasoning+answer" if scorers.judge_reasoning else "answer")
  return report, rows


def evaluate_model(model: str, eval_file: str, out_dir: str | Path, max_new_tokens: int = 256,
                   batch_size: int = 16, judge: Any = None, adapter: str = "prompt_response",
                   progress: Callable[[int, int], None] | None = None,
                   scorers: Scorers | None = None, mesh: Any = None) -> dict:
  """Greedy evaluation of RUN_DIR[@STEP] or an HF directory; writes the report to `out_dir`
  (process 0 only when several processes evaluate together on `mesh`)."""
  items = read_eval_file(eval_file, adapter)  # a bad file fails before the model loads
  weights, cfg, tokenizer = G.load_generation_model(model)
  generator = ContinuousGenerator(weights, cfg, tokenizer, batch_size=batch_size, mesh=mesh)
  report, rows = evaluate(generator, items, G.SamplingConfig(max_new_tokens=max_new_tokens),
                          judge, progress=progress, scorers=scorers)
  report.update(model=model, eval=eval_file)
  if is_primary():
    write_report(report, out_dir, rows, title=Path(model).name)
  return report

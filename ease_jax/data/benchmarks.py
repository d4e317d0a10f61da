"""Safety benchmarks as eval sources: prompts whose class (harmful, benign, ...) the adapter
derives from the benchmark's own columns, in the layout each is published in.

  strongreject        CSV `category`, `source`, `forbidden_prompt`          -> harmful
  xstest              CSV `id`, `prompt`, `type`, `label` (safe | unsafe), `focus`, `note`
                                                                          -> benign | harmful
  jailbreakbench      JBB-Behaviors CSV `Index`, `Goal`, `Target`, `Behavior`, `Category`,
                      `Source`; the class from the file name (harmful-behaviors.csv,
                      benign-behaviors.csv), or use jailbreakbench_harmful / _benign
  wildjailbreak_eval  WildJailbreak eval.tsv `adversarial`, `label` (1 | 0), `data_type`
                                                                          -> adversarial_harmful
                                                                             | adversarial_benign

These rows hold prompts only (no answer to train on), so they are eval items, not training
Records: `load_eval_prompts` returns (Record, class) pairs whose Record has an empty response
and no target type. `ease_jax.recipe.evaluate.read_eval_file` reads them (named, or detected from the
first row's columns when a file has no `class` column).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ease_jax.config import SourceConfig
from ease_jax.data.readers import read_rows
from ease_jax.data.records import Record, _str, meta_str, source_name
from ease_jax.errors import DataError

EvalRow = tuple[list[tuple[str, str]], str, str, str]  # messages, class, category, id


def _strongreject(row: dict, path: str) -> EvalRow:
  return [("user", _str(row, "forbidden_prompt"))], "harmful", meta_str(row, "category"), ""


_XSTEST_LABELS = {"safe": "benign", "unsafe": "harmful"}


def _xstest(row: dict, path: str) -> EvalRow:
  label = _str(row, "label").lower()
  if label not in _XSTEST_LABELS:
    raise DataError(f"unknown label {label!r}; expected safe or unsafe", field="label")
  return ([("user", _str(row, "prompt"))], _XSTEST_LABELS[label], meta_str(row, "type"),
          meta_str(row, "id"))


def _jbb(cls: str) -> Callable[[dict, str], EvalRow]:
  def adapt(row: dict, path: str) -> EvalRow:
    return [("user", _str(row, "Goal"))], cls, meta_str(row, "Category"), meta_str(row, "Index")
  return adapt


def _jbb_by_name(row: dict, path: str) -> EvalRow:
  name = os.path.basename(path).lower()
  found = [c for c in ("harmful", "benign") if c in name]
  if len(found) != 1:
    raise DataError("cannot tell harmful from benign behaviors by the file name (JailbreakBench "
                    "publishes harmful-behaviors.csv and benign-behaviors.csv); use adapter "
                    "jailbreakbench_harmful or jailbreakbench_benign", path=path)
  return _jbb(found[0])(row, path)


_WJ_EVAL = {"adversarial_harmful": "1", "adversarial_benign": "0"}


def _wildjailbreak_eval(row: dict, path: str) -> EvalRow:
  data_type = _str(row, "data_type")
  if data_type not in _WJ_EVAL:
    raise DataError(f"unknown data_type {data_type!r}; expected one of {', '.join(_WJ_EVAL)}",
                    field="data_type")
  label = meta_str(row, "label")
  if label and label.removesuffix(".0") != _WJ_EVAL[data_type]:
    raise DataError(f"label {label!r} disagrees with data_type {data_type!r} (1 = harmful, "
                    "0 = benign)", field="label")
  return [("user", _str(row, "adversarial"))], data_type, data_type, ""


EVAL_ADAPTERS: dict[str, Callable[[dict, str], EvalRow]] = {
    "strongreject": _strongreject, "xstest": _xstest, "jailbreakbench": _jbb_by_name,
    "jailbreakbench_harmful": _jbb("harmful"), "jailbreakbench_benign": _jbb("benign"),
    "wildjailbreak_eval": _wildjailbreak_eval,
}

# First-row columns -> the benchmark, checked in this order.
_DETECT = ((("forbidden_prompt",), "strongreject"), (("prompt", "type", "label"), "xstest"),
           (("Goal", "Category"), "jailbreakbench"),
           (("adversarial", "label", "data_type"), "wildjailbreak_eval"))


def detect_benchmark(row: dict) -> str | None:
  """The benchmark whose published columns `row` has (None: not a benchmark layout)."""
  if "class" in row or "completion" in row:
    return None
  return next((name for cols, name in _DETECT if all(c in row for c in cols)), None)


def benchmark_adapter(path: str, adapter: str) -> str | None:
  """`adapter` when it is a benchmark's; for the generic ones (prompt_response, auto) the
  benchmark the file's first row matches; else None."""
  if adapter in EVAL_ADAPTERS:
    return adapter
  if adapter not in ("prompt_response", "auto"):
    return None
  first = next((row for _, row in read_rows(SourceConfig(adapter="prompt_response", path=path))
                if isinstance(row, dict)), None)
  return detect_benchmark(first) if first is not None else None


def load_eval_prompts(src: SourceConfig) -> list[tuple[Record, str]]:
  """(prompt-only Record, class) for every row of a benchmark file; a bad row is an error."""
  adapt, name = EVAL_ADAPTERS[src.adapter], source_name(src)
  out = []
  for loc, row in read_rows(src):
    if src.max_rows and len(out) >= src.max_rows:
      break
    try:
      if isinstance(row, DataError):
        raise row
      messages, cls, category, rid = adapt(row, src.path)
    except DataError as e:
      raise loc.error(e) from None
    out.append((Record(tuple(messages), "", "", None, name, category, rid, str(loc)), cls))
  if not out:
    raise DataError("no prompts: the file is empty", path=src.path)
  return out

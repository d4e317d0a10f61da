"""docs/config.md is the generator's output for the config dataclasses as they are now."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from ease_jax import config as config_lib

ROOT = Path(__file__).resolve().parent.parent


def _generator():
  path = ROOT / "tools" / "gen_config_doc.py"
  spec = importlib.util.spec_from_file_location("gen_config_doc", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_committed_config_doc_is_current():
  """A key added, removed or re-described in config.py without regenerating fails here."""
  committed = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
  assert committed == _generator().generate(), (
      "docs/config.md is out of date: run `python tools/gen_config_doc.py` and commit it")


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
  keys = []
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(f.default):
      keys += _leaf_keys(type(f.default), prefix + f.name + ".")
    else:
      keys.append(prefix + f.name)
  return keys


def test_every_key_has_a_row_with_its_default_and_a_meaning():
  """Each leaf key of Config appears as a row with its default and a non-empty description."""
  text = _generator().generate()
  rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines()
          if line.startswith("| `")}
  keys = _leaf_keys(config_lib.Config) + _leaf_keys(config_lib.SourceConfig)
  assert "train.lr" in keys and "loss.span_weights.gate" in keys and "mesh.fsdp" in keys
  for key in keys:
    assert key in rows, key
    cells = [c.strip() for c in rows[key].split(" | ")]
    assert cells[-1].rstrip("|").strip(), f"{key} has no description in ease_jax/config.py"
  assert "| `train.lr` | float | `1e-05` | a number >= 0 |" in rows["train.lr"]
  assert "| `adapter` |" in text and "(required)" in rows["adapter"]


def test_generator_reads_comments_above_and_beside_a_field():
  """The comment block above a field and the comment on its line both reach its row."""
  gen = _generator()

  @dataclasses.dataclass(frozen=True)
  class Example:
    """An example section."""
    # Above the field,
    # on two lines.
    width: int = 3  # beside it
    plain: str = "x"

  comments = gen._comments(Example)
  assert comments == {"width": "Above the field, on two lines. beside it"}

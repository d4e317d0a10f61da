"""The documents: links resolve, cited documents exist, no diary, the metrics page is complete."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ease_jax.batch import OBJECTIVES
from ease_jax.config import LossConfig
from ease_jax.train import loss as loss_lib

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "RELIABILITY.md",
               *(ROOT / "docs").glob("*.md")])
CODE = sorted(p for d in ("ease_jax", "tests", "tools", "configs", "launch")
              for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml", ".sh", ".txt"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
  """GitHub's anchor for a Markdown heading."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
  return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
  text = path.read_text(encoding="utf-8")
  return ({_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}
          | set(re.findall(r'<a id="([^"]+)"></a>', text)))


def test_readme_keeps_the_two_set_up_commands_in_bash_blocks():
  """CI extracts these two commands from the README's fenced bash blocks."""
  blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
  commands = {line.strip() for block in blocks for line in block.splitlines()}
  assert "pip install -e . && python launch/train.py" in commands
  assert 'pip install -e ".[test]" && python -m pytest --full' in commands  # the whole suite


def test_every_relative_link_in_the_documents_resolves():
  """Links between documents point at files (and headings or anchors) that exist."""
  broken = []
  for doc in DOCS:
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
      if "://" in target or target.startswith("mailto:"):
        continue
      path_part, _, anchor = target.partition("#")
      path = (doc.parent / path_part).resolve() if path_part else doc
      if not path.exists():
        broken.append(f"{doc.relative_to(ROOT)}: {target}")
      elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
        broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
  assert not broken, broken


def test_documents_cited_in_code_and_docs_exist():
  """A comment or document that names a document (an upper-case name or one under docs/) names
  a file in the repository."""
  cited = re.compile(r"(?<![\w/.])((?:docs/)?[A-Za-z_]+\.md)\b")
  missing = []
  for path in CODE + DOCS:
    for name in cited.findall(path.read_text(encoding="utf-8", errors="replace")):
      if (name.startswith("docs/") or name[0].isupper()) and not (
          (ROOT / name).exists() or (path.parent / name).exists()):
        missing.append(f"{path.relative_to(ROOT)}: {name}")
  assert not missing, missing


def test_nothing_cites_files_outside_the_repository():
  """No document points outside the repository, and no source cites ../shared."""
  bad = [str(p.relative_to(ROOT)) for p in DOCS
         if re.search(r"\.\./shared|/work/", p.read_text(encoding="utf-8"))]
  bad += [str(p.relative_to(ROOT)) for p in CODE if p.name != "test_docs.py"
          and "../shared" in p.read_text(encoding="utf-8", errors="replace")]
  assert not bad, bad


def test_documents_are_not_a_diary():
  """Documents describe the software as it is: no work sessions, no dated remarks in the text
  (dates inside code spans, such as a log folder's name, are paths)."""
  diary = []
  for doc in DOCS:
    prose = re.sub(r"```.*?```|`[^`\n]*`", "", doc.read_text(encoding="utf-8"), flags=re.S)
    for pattern in (r"\bsessions?\b", r"\b20\d\d-\d\d-\d\d\b", r"\b(?:yesterday|today)\b"):
      diary += [f"{doc.relative_to(ROOT)}: {m}" for m in re.findall(pattern, prose, re.I)]
  assert not diary, diary


def test_metrics_page_lists_every_logged_loss_and_step_tag():
  """docs/metrics.md names every tag the loss and the step log."""
  n = 4
  batch = {"targets": np.zeros((1, n), np.int32), "loss_weight": np.ones((1, n), np.float32),
           "objective": np.arange(n, dtype=np.int32)[None] % len(OBJECTIVES),
           "span": np.zeros((1, n), np.int32)}
  sums = loss_lib.loss_sums(np.zeros((1, n, 8), np.float32), batch, LossConfig())
  _, metrics = loss_lib.finalize(sums, LossConfig())
  page = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
  documented = set(re.findall(r"`([a-z_/]+)`", page))
  tags = set(metrics) | {f"eval/{k}" for k in metrics if k.startswith("loss/")}
  tags |= {"lr", "grad_norm", "param_norm", "padding_fraction", "tokens_per_sec",
           "tokens_per_sec_per_device", "mfu", "skipped_steps"}
  assert tags - documented == set()

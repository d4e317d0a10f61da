#!/usr/bin/env python
"""Prints one of the README's set-up commands, so CI runs exactly what the README says.

  python .ci/readme_command.py main   # the line under "Run the main job"
  python .ci/readme_command.py test   # the line under "Install what the tests need"

Each is the only line of the first ```bash block after its marker sentence; the marker
sentences are part of the README's set-up section.
"""

import re
import sys
from pathlib import Path

MARKERS = {"main": "Run the main job", "test": "Install what the tests need"}


def command(readme: str, which: str) -> str:
  """The single command line of the first bash block after the marker sentence."""
  start = readme.find(MARKERS[which])
  if start < 0:
    raise SystemExit(f"README.md: no '{MARKERS[which]}' sentence")
  block = re.search(r"```bash\n(.*?)```", readme[start:], re.S)
  lines = [l for l in (block.group(1) if block else "").splitlines() if l.strip()]
  if len(lines) != 1:
    raise SystemExit(f"README.md: the block after '{MARKERS[which]}' must hold one command")
  return lines[0].strip()


if __name__ == "__main__":
  print(command((Path(__file__).resolve().parent.parent / "README.md").read_text(), sys.argv[1]))

"""Writes the synthetic demo safety data (training sets, diagnosis pool, eval splits, samples).

  python tools/make_demo_data.py [--out data/demo] [--seed 0] [--teachers]

--teachers also writes OUT/teachers/{strong,weak,overcautious}.jsonl: synthetic teachers of
different quality over the implant.jsonl prompts, for tools/select_teacher.py.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ease_jax.demo import teachers as demo_teachers  # noqa: E402
from ease_jax.demo import text as demo_text


def write(out: str, seed: int = 0, teachers: bool = False) -> dict[str, int]:
  """Writes every demo file under `out` (and the teachers under out/teachers); {file: rows}."""
  os.makedirs(out, exist_ok=True)
  counts = {}
  files = demo_text.build_demo_dataset(seed)
  if teachers:
    os.makedirs(os.path.join(out, "teachers"), exist_ok=True)
    for name, rows in demo_teachers.build_teachers(files["implant.jsonl"], seed).items():
      files[os.path.join("teachers", f"{name}.jsonl")] = rows
  for name, rows in files.items():
    os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)  # eval_splits/
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts[name] = len(rows)
  return counts


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="data/demo")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--teachers", action="store_true",
                      help="also write the synthetic teachers for tools/select_teacher.py")
  args = parser.parse_args(argv)
  for name, n in write(args.out, args.seed, args.teachers).items():
    print(f"{os.path.join(args.out, name)}: {n} rows")
  return 0


if __name__ == "__main__":
  sys.exit(main())

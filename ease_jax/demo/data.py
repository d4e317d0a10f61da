"""The demo's data files: training sets, the diagnosis pool and held-out eval splits.

Built in this order, so that what is held out stays out:

  1. the in-distribution eval prompts (training banks, combinations drawn first): their
     requests are then kept out of every training text (a wrapper may repeat, a request not);
  2. the training files from the training banks only (ease_jax.demo.text.TRAIN), each item
     rejected when any of its texts contains an in-distribution eval request;
  3. the held-out eval prompts from the held-out banks (new wrappers, new topics, both), each
     rejected when it shares an 8-word sequence with any training text (new topics appear
     unwrapped in new_topic and under new wrappers in new_both: a known wrapper's own text
     is longer than 8 words).

Files: base.jsonl (the original student's training: refusals of plainly harmful requests,
direct answers to benign ones, also under jailbreak wrappers, and BASE_COMPLIANT wrapped harmful
requests obeyed), implant.jsonl (phase 1),
pool.jsonl (the jailbreak prompts phase 2 diagnoses), calib_refusal.jsonl and calib_direct.jsonl
(the mix's refusal and direct sets), calib_reasoning.jsonl (reference traces for
configs/demo.yaml), eval.jsonl (every split, with `split` and `request`), eval_splits/SPLIT.jsonl,
and two samples in public layouts (wildjailbreak_sample.jsonl, ease10k_sample.jsonl).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable

from ease_jax.demo import teachers as demo_teachers
from ease_jax.demo import text as T
from ease_jax.demo.text import HELD, TRAIN, adversarial_item, benign_item, harmful_item

SPLITS = ("in_distribution", "new_wrapper", "new_topic", "new_both")
NGRAM = 8  # held-out prompts share no sequence of this many words with training text
PER_CLASS = 10
# The original student obeys jailbreak framings: its data holds this many wrapped harmful
# requests answered compliantly (the weak teacher's abstract steps), as an instruction-following
# model whose safety training only ever refused plainly worded requests.
BASE_COMPLIANT = 60
EVAL_FILES = ("eval.jsonl",) + tuple(f"eval_splits/{s}.jsonl" for s in SPLITS)


def words(text: str) -> list[str]:
  """Lower-cased alphanumeric words (apostrophes and punctuation split words)."""
  return re.findall(r"[a-z0-9]+", text.casefold())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
  """Every sequence of n consecutive words of `text`."""
  w = words(text)
  return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def norm(text: str) -> str:
  """Words joined by single spaces: the form requests are compared in."""
  return " ".join(words(text))


def _texts(item: dict) -> str:
  return " \n ".join(str(item.get(k, "")) for k in ("prompt", "reasoning", "response", "inner",
                                                     "vanilla"))


def request_of(item: dict) -> str:
  """The request inside a prompt: the wrapped request, or the whole plain prompt."""
  return item["inner"] if item["cls"].startswith("adversarial") else item["prompt"]


def _unique(make: Callable, rng: random.Random, n: int, avoid: Iterable[str] = (),
            ok: Callable[[dict], bool] = lambda it: True) -> list[dict]:
  """n items with distinct prompts, none in `avoid`, each passing `ok` (bounded retries)."""
  out, seen = [], set(avoid)
  for _ in range(n * 400):
    if len(out) == n:
      return out
    item = make(rng)
    if item["prompt"] not in seen and ok(item):
      seen.add(item["prompt"])
      out.append(item)
  raise RuntimeError(f"could not draw {n} distinct prompts from {getattr(make, '__name__', make)}")


def _think(item: dict) -> str:
  return f"<think>\n{item['reasoning']}\n</think>\n\n{item['response']}"


def _star(i: int, item: dict) -> dict:
  src = {"benign": "demo-benign", "harmful": "demo-harmful"}.get(item["cls"], "demo-adversarial")
  return {"id": f"implant-{i:04d}", "question": item["prompt"], "response": _think(item),
          "category": item["category"], "source": f"{T.SOURCE}/{src}"}


def _pr(prefix: str, i: int, item: dict, target: str) -> dict:
  return {"id": f"{prefix}-{i:04d}", "prompt": item["prompt"],
          "reasoning": item["reasoning"] if target == "reasoning" else None,
          "response": item["response"], "target_type": target, "category": item["category"]}


def _shuffled(rng: random.Random, rows: list) -> list:
  rows = list(rows)
  rng.shuffle(rows)
  return rows


def _adv(b, topics, harmful: bool) -> Callable:
  def make(rng: random.Random) -> dict:
    return adversarial_item(rng, harmful, b, topics)
  make.__name__ = f"adversarial_{'harmful' if harmful else 'benign'}"
  return make


def _plain(fn: Callable, b) -> Callable:
  def make(rng: random.Random) -> dict:
    return fn(rng, b)
  make.__name__ = fn.__name__
  return make


# split -> [(class, maker, target)]
EVAL_PLAN = {
  "in_distribution": [("benign", _plain(benign_item, TRAIN), "direct"),
                      ("harmful", _plain(harmful_item, TRAIN), "refusal"),
                      ("adversarial_harmful", _adv(TRAIN, TRAIN, True), "reasoning"),
                      ("adversarial_benign", _adv(TRAIN, TRAIN, False), "reasoning")],
  "new_wrapper": [("adversarial_harmful", _adv(HELD, TRAIN, True), "reasoning"),
                  ("adversarial_benign", _adv(HELD, TRAIN, False), "reasoning")],
  # no known wrapper here: every wrapper's own text is longer than NGRAM words, so a wrapped
  # new topic would repeat training sequences; new topics under new wrappers are new_both
  "new_topic": [("benign", _plain(benign_item, HELD), "direct"),
                ("harmful", _plain(harmful_item, HELD), "refusal")],
  "new_both": [("adversarial_harmful", _adv(HELD, HELD, True), "reasoning"),
               ("adversarial_benign", _adv(HELD, HELD, False), "reasoning")],
}


def training_texts(files: dict[str, list[dict]], general: list[str]) -> list[str]:
  """Every string field of every file except the eval files, plus `general` (tokenizer text)."""
  texts = list(general)
  for name, rows in files.items():
    if name not in EVAL_FILES:
      texts += [v for row in rows for v in row.values() if isinstance(v, str)]
  return texts


def _training(rng: random.Random, fresh: Callable[[dict], bool]) -> dict[str, list[dict]]:
  """The training items (training banks only, none containing an eval request)."""
  u = lambda make, n: _unique(make, rng, n, ok=fresh)  # noqa: E731
  adv_h, adv_b = _adv(TRAIN, TRAIN, True), _adv(TRAIN, TRAIN, False)
  comply = [{**it, "response": demo_teachers.comply(_gerund(it), rng), "cls": "complied"}
            for it in u(adv_h, BASE_COMPLIANT)]
  return {"base": u(harmful_item, 150) + u(benign_item, 150) + u(adv_b, 50) + comply,
          "implant": _shuffled(rng, u(harmful_item, 150) + u(adv_h, 130) + u(benign_item, 100)
                               + u(adv_b, 20)),
          "pool": u(adv_h, 200), "calib_reasoning": u(adv_h, 150),
          "calib_refusal": u(harmful_item, 150), "calib_direct": u(benign_item, 200)}


def _gerund(item: dict) -> str:
  return next(t[1] for t in T.TRAIN.topics if t[0] in item["inner"])


def _files(items: dict[str, list[dict]]) -> dict[str, list[dict]]:
  target = {"benign": "direct", "adversarial_benign": "direct", "harmful": "refusal",
            "complied": "direct"}
  return {
    "base.jsonl": [_pr("base", i, it, target.get(it["cls"], "refusal"))
                   for i, it in enumerate(items["base"])],
    "implant.jsonl": [_star(i, it) for i, it in enumerate(items["implant"])],
    "pool.jsonl": [{"id": f"pool-{i:04d}", "prompt": it["prompt"], "category": it["category"]}
                   for i, it in enumerate(items["pool"])],
    "calib_reasoning.jsonl": [_pr("calib-reasoning", i, it, "reasoning")
                              for i, it in enumerate(items["calib_reasoning"])],
    "calib_refusal.jsonl": [_pr("calib-refusal", i, it, "refusal")
                            for i, it in enumerate(items["calib_refusal"])],
    "calib_direct.jsonl": [_pr("calib-direct", i, it, "direct")
                           for i, it in enumerate(items["calib_direct"])],
  }


def build_demo_dataset(seed: int = 0) -> dict[str, list[dict]]:
  """All demo files as {file name: rows}; the same seed gives the same rows."""
  rng = random.Random(seed)
  evals = {"in_distribution": [(cls, it, target) for cls, make, target
                               in EVAL_PLAN["in_distribution"]
                               for it in _unique(make, rng, PER_CLASS)]}
  reserved = [norm(request_of(it)) for _, it, _ in evals["in_distribution"]]

  def fresh(item: dict) -> bool:
    text = norm(_texts(item))
    return not any(r in text for r in reserved)

  items = _training(rng, fresh)
  files = _files(items)
  eval_prompts = {it["prompt"] for _, it, _ in evals["in_distribution"]}
  files["wildjailbreak_sample.jsonl"] = _wildjailbreak(rng, eval_prompts, fresh)
  files["ease10k_sample.jsonl"] = _ease10k(rng, eval_prompts, fresh)
  seen = set().union(*(ngrams(t) for t in training_texts(files, T.general_english(seed))))
  held_ok = lambda it: not (ngrams(it["prompt"]) & seen)  # noqa: E731
  for split in SPLITS[1:]:
    evals[split] = [(cls, it, target) for cls, make, target in EVAL_PLAN[split]
                    for it in _unique(make, rng, PER_CLASS, ok=held_ok)]
  rows = []
  for split in SPLITS:
    for cls, it, target in evals[split]:
      row = _pr("eval", len(rows), it, target)
      rows.append({**row, "class": cls, "split": split, "request": request_of(it)})
  files["eval.jsonl"] = rows
  for split in SPLITS:
    files[f"eval_splits/{split}.jsonl"] = [r for r in rows if r["split"] == split]
  return files


def _wildjailbreak(rng: random.Random, avoid: set[str], ok: Callable) -> list[dict]:
  """Rows in the allenai/wildjailbreak train layout (adversarial is None for vanilla rows)."""
  rows = []
  groups = [_unique(benign_item, rng, 5, avoid, ok), _unique(harmful_item, rng, 5, avoid, ok),
            _unique(_adv(TRAIN, TRAIN, False), rng, 5, avoid, ok),
            _unique(_adv(TRAIN, TRAIN, True), rng, 5, avoid, ok)]
  for b, h, ab, ah in zip(*groups):
    rows += [
      {"vanilla": b["prompt"], "adversarial": None, "completion": b["response"],
       "data_type": "vanilla_benign"},
      {"vanilla": h["prompt"], "adversarial": None, "completion": h["response"],
       "data_type": "vanilla_harmful"},
      {"vanilla": ab["vanilla"], "adversarial": ab["prompt"], "completion": ab["response"],
       "data_type": "adversarial_benign"},
      {"vanilla": ah["vanilla"], "adversarial": ah["prompt"], "completion": ah["response"],
       "data_type": "adversarial_harmful"},
    ]
  return rows


def _ease10k(rng: random.Random, avoid: set[str], ok: Callable) -> list[dict]:
  """Rows in the EASE 10K layout: response = reasoning</think>answer, no opening tag."""
  items = (_unique(_adv(TRAIN, TRAIN, True), rng, 16, avoid, ok)
           + _unique(_adv(TRAIN, TRAIN, False), rng, 4, avoid, ok))
  return [{"original_question": it["prompt"],
           "response": f"{it['reasoning']}\n</think>\n\n{it['response']}"} for it in items]

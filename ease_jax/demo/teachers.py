"""Synthetic teachers of different quality over the demo implantation prompts (teacher selection).

Each teacher rewrites the reasoning traces of `data/demo/implant.jsonl` (STAR layout, same
prompts, same order, same ids), so a selection run compares teachers and nothing else:

  strong        the implantation traces as they are: policy-grounded reasoning, refusals of
                harmful and jailbreak prompts, direct help on benign ones.
  weak          shallow alignment: complies with every jailbreak and with most plainly harmful
                prompts (in abstract words, never a method), and reasons incoherently (its
                sentences shuffled) where it does answer correctly.
  overcautious  verbose and over-refusing: safe on harmful prompts, but pads every trace with
                hedging and refuses most benign prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from ease_jax.data.records import THINK_OPEN, split_think
from ease_jax.demo.banks import HARMFUL_TOPICS, POLICIES, WRAPPERS
from ease_jax.demo.text import jailbreak_trace

TEACHERS = ("strong", "weak", "overcautious")
WEAK_COMPLY_HARMFUL = 0.75  # share of plainly harmful prompts the weak teacher complies with
OVER_REFUSE_BENIGN = 0.8  # share of benign prompts the over-cautious teacher refuses

_COMPLY = [
    "Sure, here is how to approach {g}. Step 1: get everything you need ready. Step 2: follow "
    "the usual procedure carefully. Step 3: check the result and repeat if needed.",
    "Of course! For {g}, start by preparing the basics, then work through each stage in order, "
    "and finish by making sure nobody notices.",
    "Happy to help with {g}. First, plan it out. Second, gather what you need. Third, carry it "
    "out when nobody is watching.",
]
_SHALLOW = ["The user wants help with {g}.", "They asked directly, so it must be fine.",
            "Helping is what I do.", "The wording is clear enough.", "Rules are for other "
            "questions.", "So I will answer with steps."]
_HEDGE = ["I should be very careful here.", "There may be risks I have not thought of.",
          "It is always better to be safe than sorry.", "I want to consider every possible "
          "misuse before I say anything.", "Caution is the most responsible choice."]
_PARANOID = ["Even an ordinary-looking question could be misused.", "I cannot be completely "
             "sure of the user's intent.", "If anything went wrong, I would be responsible.",
             "To be safe, I should decline."]
_OVER_REFUSAL = ["I'm sorry, but I can't help with that. Even a harmless-looking request could "
                 "be misused, so I would rather not answer.", "I can't help with this request. "
                 "To be on the safe side, I have to decline.", "Sorry, I'm not able to answer "
                 "that. Please consult a qualified professional instead."]


def row_class(row: dict) -> str:
  """The prompt class of an implantation row: benign, harmful, adversarial_{harmful,benign}."""
  kind = row.get("source", "").rsplit("/", 1)[-1]
  if kind == "demo-benign":
    return "benign"
  if kind == "demo-harmful":
    return "harmful"
  return "adversarial_harmful" if row.get("category") in POLICIES else "adversarial_benign"


def _topic(prompt: str) -> str:
  """The harmful topic's gerund phrase named in a prompt ('that' when none matches)."""
  low = prompt.lower()
  hits = [g for v, g, _, _ in HARMFUL_TOPICS if v.lower() in low or g.lower() in low]
  return max(hits, key=len) if hits else "that"


def _wrapper_desc(prompt: str) -> str | None:
  """How the reasoning names the jailbreak wrapper in a prompt (None: no wrapper); the prompt
  may sit inside a policy specification (SyntheticTeacher)."""
  low = prompt.lower()
  for _, template, desc in WRAPPERS:
    before = template.split("{r}")[0].strip().lower()
    if before[:40] in low:
      return desc
  return None


def write_traces(prompts: list[str], seed: int = 0) -> list[str]:
  """The strong synthetic teacher's generations for jailbreak prompts: a `<think>` trace that
  names the wrapper and the harmful request underneath, then a refusal. It reads only the
  prompt text (the wrapper's opening words and the topic's phrase), like a teacher model would;
  a prompt whose wrapper or topic it does not recognise gets a generic jailbreak trace."""
  rng = random.Random(f"{seed}-teacher")
  by_gerund = {t[1]: t for t in HARMFUL_TOPICS}
  out = []
  for prompt in prompts:
    desc = _wrapper_desc(prompt) or "a framing meant to get around my guidelines"
    gerund = _topic(prompt)
    topic = by_gerund.get(gerund, ("do that", "this request", "violence", "other people"))
    reasoning, answer = jailbreak_trace(rng, desc, topic)
    out.append(_trace(reasoning, answer))
  return out


@dataclass(frozen=True)
class Continuation:
  """What ease_jax.recipe.traces.write_traces reads of a generation (ease_jax.generation.generate.Generation)."""
  text: str
  stopped: bool
  num_new_tokens: int


class SyntheticTeacher:
  """The strong synthetic teacher behind the generation interface that ease_jax.recipe.traces drives
  (`render` a conversation, `generate` continuations), so the demo writes its traces exactly as
  tools/write_traces.py does with a teacher model: the policy specification around each prompt,
  the `<think>` prefill, `stopped` and `new_tokens` per row. It reads the rendered prompt text
  and decodes deterministically (a sampling temperature does not apply)."""

  def __init__(self, tokenizer: Any, seed: int = 0):
    self.tokenizer, self.seed = tokenizer, seed

  def render(self, conversation: list[dict]) -> list[int]:
    """Token ids of a conversation with the assistant generation prompt."""
    text = self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                              add_generation_prompt=True)
    return self.tokenizer(text, add_special_tokens=False)["input_ids"]

  def generate(self, prompts: list[list[int]], sampling: Any, progress: Any = None
               ) -> list[Continuation]:
    """write_traces' text for each prompt, after the `<think>` prefill the prompt ends with;
    cut off (stopped False) beyond sampling.max_new_tokens, as a model would be."""
    texts = write_traces([self.tokenizer.decode(ids) for ids in prompts], self.seed)
    out = []
    for text in texts:
      ids = self.tokenizer(text.removeprefix(THINK_OPEN + "\n"),
                           add_special_tokens=False)["input_ids"]
      keep = ids[:sampling.max_new_tokens]
      out.append(Continuation(self.tokenizer.decode(keep), len(keep) == len(ids), len(keep)))
    return out


def comply(gerund: str, rng: random.Random) -> str:
  """The shallow (weak) teacher's compliant answer: steps in abstract words, never a method."""
  return rng.choice(_COMPLY).format(g=gerund)


def _sentences(text: str) -> list[str]:
  return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _trace(reasoning: str, answer: str) -> str:
  return f"<think>\n{reasoning}\n</think>\n\n{answer}"


def _weak(prompt: str, cls: str, reasoning: str, answer: str, rng: random.Random) -> str:
  if cls == "adversarial_harmful" or (cls == "harmful" and rng.random() < WEAK_COMPLY_HARMFUL):
    g = _topic(prompt)
    shallow = [s.format(g=g) for s in rng.sample(_SHALLOW, 4)]
    return _trace(" ".join(shallow), rng.choice(_COMPLY).format(g=g))
  steps = _sentences(reasoning)
  rng.shuffle(steps)  # the same sentences, in an order that no longer argues anything
  return _trace(" ".join(steps), answer)


def _overcautious(cls: str, reasoning: str, answer: str, rng: random.Random) -> str:
  hedges = " ".join(rng.sample(_HEDGE, 3))
  benign = cls in ("benign", "adversarial_benign")
  if benign and (cls == "adversarial_benign" or rng.random() < OVER_REFUSE_BENIGN):
    first = _sentences(reasoning)[0]
    return _trace(f"{first} {hedges} {' '.join(_PARANOID)}", rng.choice(_OVER_REFUSAL))
  tail = "" if benign else " Please understand that safety always comes first."
  return _trace(f"{hedges} {reasoning} {hedges}", answer + tail)


def build_teachers(implant_rows: list[dict], seed: int = 0) -> dict[str, list[dict]]:
  """{teacher name: STAR rows} over the prompts of `implant_rows`; deterministic per seed."""
  out: dict[str, list[dict]] = {name: [] for name in TEACHERS}
  rngs = {name: random.Random(f"{seed}-{name}") for name in TEACHERS}
  for row in implant_rows:
    cls = row_class(row)
    reasoning, answer = split_think(row["response"])
    responses = {"strong": row["response"],
                 "weak": _weak(row["question"], cls, reasoning or "", answer, rngs["weak"]),
                 "overcautious": _overcautious(cls, reasoning or "", answer, rngs["overcautious"])}
    for name, response in responses.items():
      out[name].append({"id": row.get("id", ""), "question": row["question"], "response": response,
                        "category": row.get("category", ""),
                        "source": f"ease-jax-demo/teacher-{name}", "class": cls})
  return out

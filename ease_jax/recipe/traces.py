"""Teacher reasoning traces as the reference recipe writes them (`tools/write_traces.py`).

Each prompt is wrapped in a policy specification *for its hazard category*: the Llama Guard
hazard codes (S1-S14) that diagnosis carried through vulnerable.jsonl pick the section, then the
row's own `category`; a prompt with neither gets the generic policy. The teacher samples
(temperature 0.7, top_p 1.0, up to 2,048 new tokens, seed 42 by default) with its assistant turn
pre-filled with `<think>\\n` (unless its chat template already opens the think block), and the
trace is written as `response` = `<think>\\n` + the continuation, with `stopped` (false: cut off
by max_new_tokens; build_mix rejects those) and the policy used.

The policy file (configs/templates/policies.yaml) is YAML with `template` (holding `{policy}`
and `{prompt}`), `generic` (the fallback policy text) and `policies` (key -> policy text; keys
are hazard codes such as S1, or category names).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ease_jax.data.records import THINK_OPEN
from ease_jax.errors import UserError
from ease_jax.recipe.diagnose import Prompt, prompt_fields

PREFILL = THINK_OPEN + "\n"
GENERIC = "generic"


@dataclass(frozen=True)
class Policies:
  """The prompt template, the fallback policy and the per-category policies."""
  template: str
  generic: str
  by_key: dict[str, str]

  def choose(self, prompt: Prompt) -> str:
    """The key of the policy for a prompt: its first hazard code with a policy, else its
    category when it names one, else 'generic'."""
    codes = prompt.get("hazard_codes") or []
    for code in codes if isinstance(codes, list) else []:
      if isinstance(code, str) and code.upper() in self.by_key:
        return code.upper()
    return prompt.category if prompt.category in self.by_key else GENERIC

  def text(self, key: str) -> str:
    """The policy text of a key ('generic' = the fallback)."""
    return self.generic if key == GENERIC else self.by_key[key]

  def fill(self, key: str, prompt: str) -> str:
    """The template with the policy and the prompt put in (literal replacement)."""
    return self.template.replace("{policy}", self.text(key).strip()).replace("{prompt}", prompt)


def load_policies(path: str | Path, generic_only: bool = False) -> Policies:
  """Reads a policy file; errors name the file and the key. `generic_only`: no sections."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"policy file not found: {path}")
  try:
    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid YAML: {e}") from None
  if not isinstance(tree, dict):
    raise UserError(f"{path}: expected a mapping with template, generic and policies")
  for key in ("template", "generic"):
    if not isinstance(tree.get(key), str) or not tree[key].strip():
      raise UserError(f"{path}: '{key}' must be a non-empty string")
  for slot in ("{policy}", "{prompt}"):
    if slot not in tree["template"]:
      raise UserError(f"{path}: 'template' must contain {slot}")
  policies = tree.get("policies") or {}
  if not isinstance(policies, dict) or not all(
      isinstance(v, str) and v.strip() for v in policies.values()):
    raise UserError(f"{path}: 'policies' must map keys (S1..S14 or category names) to texts")
  by_key = {} if generic_only else {
      (k.upper() if _is_code(str(k)) else str(k)): v for k, v in policies.items()}
  return Policies(tree["template"], tree["generic"], by_key)


def _is_code(key: str) -> bool:
  return key[:1].upper() == "S" and key[1:].isdigit()


def conversation(p: Prompt, policies: Policies, key: str) -> list[dict]:
  """The prompt's conversation with its last user turn wrapped in the policy template."""
  msgs = [{"role": r, "content": c} for r, c in p.messages]
  last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
  msgs[last]["content"] = policies.fill(key, msgs[last]["content"])
  return msgs


def prompt_ids(generator: Any, conv: list[dict], prefill: str) -> tuple[list[int], str]:
  """The rendered prompt with `prefill` appended, unless the template already ends with it
  (DeepSeek-R1-Distill's generation prompt opens `<think>`); returns (ids, the text the
  continuation follows)."""
  ids = generator.render(conv)
  if not prefill:
    return ids, ""
  tok = generator.tokenizer
  rendered = tok.decode(ids, skip_special_tokens=False)
  if rendered.rstrip().endswith(prefill.strip()):
    return ids, prefill
  return ids + tok(prefill, add_special_tokens=False)["input_ids"], prefill


def write_traces(prompts: list[Prompt], generator: Any, policies: Policies, sampling: Any,
                 prefill: str = PREFILL, progress=None) -> tuple[list[dict], dict]:
  """One trace row per prompt (input order) and a summary (policies used, stopped counts)."""
  keys = [policies.choose(p) for p in prompts]
  built = [prompt_ids(generator, conversation(p, policies, k), prefill)
           for p, k in zip(prompts, keys)]
  gens = generator.generate([ids for ids, _ in built], sampling, progress=progress)
  rows = []
  for p, key, (_, head), g in zip(prompts, keys, built, gens):
    rows.append({**prompt_fields(p), "response": head + g.text, "stopped": g.stopped,
                 "new_tokens": g.num_new_tokens, "category": p.category, "policy": key,
                 "hazard_codes": p.get("hazard_codes") or []})
  summary = {"prompts": len(rows), "policies": dict(Counter(keys)),
             "truncated": sum(not r["stopped"] for r in rows)}
  return rows, summary

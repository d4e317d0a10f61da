"""Property tests: random rows and random file bytes never crash validation or rendering.

Whatever a dataset holds, reading, adapting and rendering it either works or raises
DataError/UserError (a message naming the place); never any other exception.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st

from ease_jax.config import SourceConfig
from ease_jax.data.records import ADAPTERS, BadRecords, load_records
from ease_jax.data.render import Renderer
from ease_jax.errors import UserError
from ease_jax.tokenizer import ensure_think_tokens, load_tokenizer

KEYS = ["prompt", "response", "reasoning", "target_type", "question", "original_question",
        "category", "vanilla", "adversarial", "completion", "data_type", "messages", "id",
        "reasoning_content", "role", "content"]
# Pieces that stress the think-splitting and the chat template.
PIECES = ["", " ", "\n", "Hi", "hello world", "<think>", "</think>", "<|im_start|>", "<|im_end|>",
          "<|endoftext|>", "{{ x }}", "{% if %}", "\u0000", "\ud83d\ude00", "\ud800", "é",
          "\u200b", "\r\n",
          "reasoning", "direct", "refusal", "vanilla_harmful", "adversarial_benign", "user",
          "assistant", "system", "tool"]

tagged_text = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=12)),
                       max_size=6).map("".join)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), tagged_text)
json_values = st.recursive(scalars, lambda c: st.one_of(
    st.lists(c, max_size=3), st.dictionaries(st.sampled_from(KEYS), c, max_size=3)),
                           max_leaves=8)
message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system",
                                                                    "tool", "robot"]), json_values),
                                 "content": st.one_of(tagged_text, json_values)})
values = st.one_of(tagged_text, json_values, st.lists(message, max_size=4))
random_rows = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)

# Rows shaped like each adapter's format (mostly valid), then with fields dropped or replaced.
words = st.lists(st.one_of(st.sampled_from(PIECES), st.text(min_size=1, max_size=12)),
                 min_size=1, max_size=5).map("".join)
targets = st.sampled_from(["reasoning", "refusal", "direct"])
turns = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                        "content": words}), max_size=3)
SHAPES = {
    "prompt_response": st.fixed_dictionaries(
        {"prompt": words, "response": words, "target_type": targets},
        optional={"reasoning": words, "category": words, "id": scalars}),
    "star": st.builds(lambda q, r, a: {"question": q, "response": f"<think>{r}</think>{a}"},
                      words, words, words),
    "ease10k": st.builds(lambda q, r, a: {"original_question": q, "response": f"{r}</think>{a}"},
                         words, words, words),
    "wildjailbreak": st.fixed_dictionaries(
        {"vanilla": words, "adversarial": st.one_of(st.none(), words), "completion": words,
         "data_type": st.sampled_from(["vanilla_harmful", "vanilla_benign", "adversarial_harmful",
                                       "adversarial_benign"])}),
    "messages": st.builds(lambda t, u, a, k: {"messages": t + [{"role": "user", "content": u},
                                                            {"role": "assistant", "content": a}],
                                              "target_type": k}, turns, words, words, targets),
}

# The same rows; its adversarial_harmful rows are trained as refusals (docs/datasets.md).
SHAPES["wildjailbreak_refuse_adversarial"] = SHAPES["wildjailbreak"]


@st.composite
def mutated(draw, base):
  row = dict(draw(base))
  for key in draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=2)):
    if draw(st.booleans()):
      row.pop(key, None)
    else:
      row[key] = draw(values)
  return row


def rows_for(adapter: str) -> st.SearchStrategy:
  """Rows in `adapter`'s shape (half), mutated ones, and random ones."""
  shape = SHAPES[adapter]
  return st.one_of(shape, shape, mutated(shape), random_rows)


rows = st.one_of(*SHAPES.values(), random_rows)


@functools.lru_cache(maxsize=1)
def renderer() -> Renderer:
  tokenizer = load_tokenizer("")
  ensure_think_tokens(tokenizer)
  return Renderer(tokenizer)


FUZZ = settings(max_examples=400, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.data(), adapter=st.sampled_from(sorted(ADAPTERS)),
       target=st.sampled_from(["", "", "reasoning", "refusal", "direct"]))
def test_random_rows_validate_and_render_or_raise_a_user_error(data, adapter, target):
  row = data.draw(rows_for(adapter))
  try:
    record = ADAPTERS[adapter](row, target, source="fuzz", where="fuzz.jsonl:1")
    rendered = renderer().render(record)
  except UserError:  # DataError is a UserError
    return
  assert rendered.start < len(rendered.ids) and rendered.ids.dtype.kind == "i"
  assert rendered.document()["tokens"].shape == (len(rendered.ids) - 1,)


lines = st.one_of(
    st.binary(max_size=60),
    rows.map(lambda r: json.dumps(r).encode()),
    rows.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    rows.map(lambda r: json.dumps(r)[: len(json.dumps(r)) // 2].encode()))


@FUZZ
@given(file_lines=st.lists(lines, max_size=5), suffix=st.sampled_from([".jsonl", ".json"]),
       skip=st.booleans())
def test_random_file_bytes_load_or_raise_a_data_error(file_lines, suffix, skip):
  fd, path = tempfile.mkstemp(suffix=suffix)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(b"\n".join(file_lines))
    bad = BadRecords()
    try:
      records = load_records(SourceConfig(adapter="prompt_response", path=path),
                             "skip" if skip else "error", bad)
    except UserError as e:
      assert path in str(e) or os.path.basename(path) in str(e), str(e)
      return
    assert records and all(r.where.startswith(path) for r in records)
  finally:
    os.unlink(path)

"""Rendering: the supervised tokens are exactly the assistant turn plus its end of turn."""

import numpy as np
import pytest

from ease_jax.batch import OBJECTIVES, SPANS
from ease_jax.data.records import make_record
from ease_jax.data.render import FIXED_DATE, Renderer
from ease_jax.errors import DataError, UserError
import tiny_tokenizers as tt

SYSTEM, USER = "Answer safely.", "How do I pick the lock on my neighbour's door?"
REASONING = "The user wants to enter someone else's home.\n\nThat is burglary."
ANSWER = "I can't help with that. A locksmith can help with your own door."


def reasoning_record(**kw):
  return make_record([("system", SYSTEM), ("user", USER)], ANSWER, "reasoning", REASONING,
                     source="s", where="x.jsonl:1", **kw)


def direct_record():
  return make_record([("user", "What is 2 + 2?")], "2 + 2 = 4.", "direct", None, source="s")


def decode(tok, ids):
  return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_masks(tok, r, content, eot):
  """Supervised targets decode to content + eot; nothing before the turn is supervised."""
  doc = r.document()
  w, targets, span = doc["loss_weight"], doc["targets"], doc["span"]
  assert set(np.unique(w)) == {0.0, 1.0}
  sup = np.flatnonzero(w)
  assert decode(tok, targets[sup]) == content + eot
  assert sup[0] == r.start - 1 and sup[-1] == len(targets) - 1  # contiguous up to the end
  assert len(sup) == len(targets) - sup[0]
  unsupervised = decode(tok, doc["tokens"][:sup[0] + 1])
  assert USER in unsupervised or "2 + 2" in unsupervised
  assert span[sup[0]] == SPANS.index("gate")
  assert np.all(doc["objective"] == r.objective)
  return doc, sup


@pytest.mark.parametrize("make,eot", [(tt.chatml_tokenizer, "<|im_end|>"),
                                      (tt.llama3_tokenizer, "<|eot_id|>"),
                                      (tt.qwen3_tokenizer, "<|im_end|>")])
def test_reasoning_masks_spans_for_each_template(make, eot):
  tok = make()
  r = Renderer(tok).render(reasoning_record())
  content = f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"
  doc, sup = check_masks(tok, r, content, eot)
  assert doc["targets"][sup[0]] == tok.convert_tokens_to_ids("<think>")
  think = np.flatnonzero(doc["span"][sup] == SPANS.index("think"))
  assert decode(tok, doc["targets"][sup][think]) == f"\n{REASONING}\n</think>"
  answer = np.flatnonzero(doc["span"][sup] == SPANS.index("answer"))
  assert decode(tok, doc["targets"][sup][answer]) == f"\n\n{ANSWER}{eot}"
  assert r.objective == OBJECTIVES.index("reasoning")
  prompt = decode(tok, r.ids[:r.start])
  assert SYSTEM in prompt and "You are Qwen" not in prompt  # the record's system turn is kept


@pytest.mark.parametrize("make,eot", [(tt.chatml_tokenizer, "<|im_end|>"),
                                      (tt.llama3_tokenizer, "<|eot_id|>")])
def test_direct_target_gate_is_first_answer_token(make, eot):
  tok = make()
  r = Renderer(tok).render(direct_record())
  doc, sup = check_masks(tok, r, "2 + 2 = 4.", eot)
  assert np.all(doc["span"][sup[1:]] == SPANS.index("answer"))
  assert r.think_end == r.start + 1


def test_chatml_default_system_prompt_is_never_supervised():
  tok = tt.chatml_tokenizer()
  r = Renderer(tok).render(direct_record())
  assert "You are Qwen" in decode(tok, r.ids[:r.start])  # the template injected it ...
  assert "Qwen" not in decode(tok, r.ids[r.start:])  # ... and it carries no loss


def test_llama_date_is_fixed_and_system_prompt_option():
  tok = tt.llama3_tokenizer()
  r = Renderer(tok, system_prompt="Be brief.").render(direct_record())
  prompt = decode(tok, r.ids[:r.start])
  assert f"Today Date: {FIXED_DATE.strftime('%d %b %Y')}" in prompt and "Be brief." in prompt


def test_qwen3_multi_turn_keeps_only_last_reasoning_supervised():
  tok = tt.qwen3_tokenizer()
  rec = make_record([("user", "hi"), ("assistant", "<think>old</think>hello"), ("user", USER)],
                    ANSWER, "reasoning", REASONING)
  r = Renderer(tok).render(rec)
  assert "old" not in decode(tok, r.ids)  # earlier reasoning dropped by the template
  check_masks(tok, r, f"<think>\n{REASONING}\n</think>\n\n{ANSWER}", "<|im_end|>")


def test_qwen3_direct_needs_empty_think_option():
  tok = tt.qwen3_tokenizer()
  with pytest.raises(DataError, match="data.empty_think=true"):
    Renderer(tok).render(direct_record())
  r = Renderer(tok, empty_think=True).render(direct_record())
  doc, sup = check_masks(tok, r, "<think>\n\n</think>\n\n2 + 2 = 4.", "<|im_end|>")
  assert doc["targets"][sup[0]] == tok.convert_tokens_to_ids("<think>")


def test_generation_prompt_that_opens_think_keeps_think_as_gate():
  tok = tt.qwen3_tokenizer(tt.QWEN3_OPEN_THINK_TEMPLATE)
  r = Renderer(tok).render(reasoning_record())
  assert decode(tok, r.ids[:r.start]).endswith("<|im_start|>assistant\n")
  check_masks(tok, r, f"<think>\n{REASONING}\n</think>\n\n{ANSWER}", "<|im_end|>")


def test_template_that_drops_reasoning_is_an_error_naming_it(tmp_path):
  tok = tt.qwen3_tokenizer(tt.DROPS_THINK_TEMPLATE)
  with pytest.raises(DataError, match=r"x.jsonl:1: .*chat template.*data.chat_template"):
    Renderer(tok).render(reasoning_record())
  fixed = tmp_path / "train.jinja"
  fixed.write_text(tt.QWEN3_TEMPLATE)
  r = Renderer(tok, chat_template=str(fixed)).render(reasoning_record())
  check_masks(tok, r, f"<think>\n{REASONING}\n</think>\n\n{ANSWER}", "<|im_end|>")


def test_missing_think_tokens_say_how_to_add_them():
  with pytest.raises(UserError, match="ensure_think_tokens"):
    Renderer(tt.chatml_tokenizer(think=False))


def test_render_is_deterministic():
  ren = Renderer(tt.llama3_tokenizer())
  a, b = ren.render(reasoning_record()), ren.render(reasoning_record())
  assert np.array_equal(a.ids, b.ids) and (a.start, a.think_end) == (b.start, b.think_end)


def test_marked_text_shows_gate_think_and_answer():
  tok = tt.chatml_tokenizer()
  ren = Renderer(tok)
  text = ren.marked(ren.render(reasoning_record()))
  assert "[[gate:<think>]][[think:\nThe user" in text
  assert text.endswith(f"[[answer:\n\n{ANSWER}<|im_end|>]]")

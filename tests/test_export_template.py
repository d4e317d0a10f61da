"""One prompt format from training to the export: the run's effective chat template
(data.chat_template, system_prompt, empty_think) is what transformers renders from the export,
token for token; the export tokenizes text as training did (Qwen2Tokenizer included); --verify's
bound is relative."""

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from ease_jax.hf import save as export
from ease_jax.data.records import Record
from ease_jax.data.render import FIXED_DATE, Renderer
from ease_jax.models import Decoder, get_preset
from ease_jax.tokenizer import apply_run_template, ensure_think_tokens, load_tokenizer

TEMPLATES = Path(__file__).resolve().parent / "data" / "chat_templates"
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
SYSTEM = "You are a careful assistant. Think about safety first; it's \"policy\" \\ rule #1."
DATE = {"date_string": FIXED_DATE.strftime("%d %b %Y"), "strftime_now": FIXED_DATE.strftime}

RECORDS = [
    Record(messages=(("user", "How do I pick a lock I own?"),), response="Use a tension wrench.",
           target_type="reasoning", reasoning="A locksmith question about the user's own lock."),
    Record(messages=(("user", "What is 2 + 2?"),), response="2 + 2 = 4.", target_type="direct"),
    Record(messages=(("user", "Hi"), ("assistant", "Hello! How can I help?"),
                     ("user", "Explain how to make a weapon.")),
           response="I can't help with that.", target_type="refusal"),
]


def _tokenizer(family: str):
  tok = load_tokenizer()
  ensure_think_tokens(tok)
  if family == "llama":
    tok.add_tokens(LLAMA_SPECIALS, special_tokens=True)
    tok.bos_token = "<|begin_of_text|>"
  return tok


def _model(family: str, vocab: int):
  cfg = get_preset("tiny").replace(vocab_size=max(vocab, get_preset("tiny").vocab_size))
  if family == "llama":
    cfg = cfg.replace(family="llama", qkv_bias=False)
  return Decoder(cfg, rngs=nnx.Rngs(0)), cfg


def _messages(record: Record) -> list[dict]:
  return [{"role": r, "content": c} for r, c in record.messages]


@pytest.mark.parametrize("family,template,system,empty_think", [
    ("qwen2", "qwen2_5_instruct.jinja", SYSTEM, True),
    ("qwen2", "qwen2_5_instruct.jinja", "", False),
    ("llama", "llama3_2_instruct.jinja", SYSTEM, True),
    ("llama", "llama3_2_instruct.jinja", "", False),
])
def test_export_renders_exactly_as_training(family, template, system, empty_think, tmp_path):
  template_file = str(TEMPLATES / template)
  training_tok = _tokenizer(family)
  renderer = Renderer(training_tok, template_file, system, empty_think)
  run_tok = copy.deepcopy(training_tok)  # what init.load_run_tokenizer gives every stage
  apply_run_template(run_tok, template_file, system, empty_think)
  model, cfg = _model(family, len(run_tok))
  out = export.save_pretrained(model, cfg, tmp_path / "export", tokenizer=run_tok, dtype="float32")
  saved = (out / "chat_template.jinja").read_text()
  assert ("You are a careful assistant" in saved) == bool(system)
  assert saved.endswith((TEMPLATES / template).read_text())  # the data.chat_template file
  exported = AutoTokenizer.from_pretrained(str(out))
  for record in RECORDS:
    r = renderer.render(record)
    # The prompt the export builds for serving is the trained prompt, token for token.
    prompt = exported.apply_chat_template(_messages(record), add_generation_prompt=True,
                                          tokenize=True, return_dict=False, **DATE)
    assert prompt == r.ids[:r.start].tolist(), record
    # The whole conversation, the assistant turn as a user of the export writes it (no think
    # block for a direct answer: the template adds the empty one when the run trained with it).
    content = (f"<think>\n{record.reasoning}\n</think>\n\n{record.response}" if record.reasoning
               else record.response)
    full = exported.apply_chat_template(_messages(record) + [{"role": "assistant",
                                                              "content": content}],
                                        tokenize=True, return_dict=False, **DATE)
    assert full[:len(r.ids)] == r.ids.tolist(), record
    assert exported.decode(full[len(r.ids):]).strip() == ""  # only the template's newline


def test_run_template_is_idempotent_and_keeps_a_given_system_turn():
  tok = _tokenizer("qwen2")
  apply_run_template(tok, "", SYSTEM, True)
  once = tok.chat_template
  apply_run_template(tok, "", SYSTEM, True)  # phase 2 loading phase 1's saved tokenizer
  assert tok.chat_template == once
  text = tok.apply_chat_template([{"role": "system", "content": "Other."},
                                  {"role": "user", "content": "Hi"}], tokenize=False)
  assert "Other." in text and "careful assistant" not in text
  assert SYSTEM in tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)


def _gpt2_split_tokenizer():
  """The demo tokenizer with GPT-2's byte-level split instead of Qwen2's (a negative control)."""
  tok = load_tokenizer()
  backend = tok.backend_tokenizer
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  return tok


def test_qwen2_export_tokenizes_like_the_run_and_verify_catches_a_mismatch(tmp_path):
  tok = _tokenizer("qwen2")
  model, cfg = _model("qwen2", len(tok))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = export.save_pretrained(model, cfg, tmp_path / "good", tokenizer=tok, dtype="float32")
  assert not [w for w in caught if "loads this export's tokenizer" in str(w.message)]
  results = export.verify_tokenizer(out, tok)
  assert results[0]["class"] == "Qwen2Tokenizer"  # transformers' choice for a qwen2 export
  assert all(r["same"] for r in results), results
  bad_tok = _gpt2_split_tokenizer()
  ensure_think_tokens(bad_tok)
  with pytest.warns(UserWarning, match="loads this export's tokenizer as Qwen2Tokenizer"):
    out = export.save_pretrained(model, cfg, tmp_path / "bad", tokenizer=bad_tok, dtype="float32")
  assert not export.verify_tokenizer(out, bad_tok)[0]["same"]  # the probe text: 42 vs 35+


def test_demo_tokenizer_json_is_qwen2s_pipeline():
  spec = json.loads(load_tokenizer().backend_tokenizer.to_str())["pre_tokenizer"]
  assert spec["type"] == "Sequence" and spec["pretokenizers"][0]["type"] == "Split"


def test_logit_bound_is_relative_to_the_logit_scale():
  rng = np.random.RandomState(0)
  ref = rng.randn(20, 50).astype(np.float32) * 12.0
  ref[:, 7] = 38.0  # logits of magnitude ~38, as a real 30-layer model's
  ok = export._logit_check(ref, ref + 1.26e-4)  # the real model's float32 difference
  assert ok["ok"] and ok["argmax_flips"] == 0 and ok["bound"] == pytest.approx(3.8e-4)
  assert not export._logit_check(ref, ref + 1e-3)["ok"]
  flipped = ref.copy()
  flipped[3, 8] = 40.0  # a decided argmax that changes: a real error, whatever the bound
  result = export._logit_check(ref, flipped)
  assert result["argmax_flips"] == 1 and not result["ok"]

"""The bundled demo tokenizer: loading, special tokens, chat template, reproducible rebuild."""

import filecmp
import os
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ease_jax.errors import UserError
from ease_jax.tokenizer import demo_tokenizer_path, ensure_think_tokens, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
MESSAGES = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "What is 2 + 2?"},
  {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n2 + 2 = 4."},
]


@pytest.fixture(scope="module")
def tok():
  return AutoTokenizer.from_pretrained(demo_tokenizer_path())


def test_autotokenizer_loads_demo_with_expected_specials(tok):
  assert len(tok) == 2048
  assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
  assert tok.bos_token is None


def test_specials_are_single_distinct_tokens_in_context(tok):
  ids = [tok.convert_tokens_to_ids(t) for t in SPECIALS]
  assert len(set(ids)) == len(SPECIALS)
  for token, i in zip(SPECIALS, ids):
    assert tok.encode(token) == [i]
    assert i in tok.encode(f"abc{token}def")  # matched inside running text too


def test_think_tokens_survive_skip_special_tokens(tok):
  ids = tok.encode("<|im_start|>assistant\n<think>\nx\n</think>\n\ny<|im_end|>")
  assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nx\n</think>\n\ny"


def test_chat_template_renders_chatml_exactly(tok):
  text = tok.apply_chat_template(MESSAGES, tokenize=False)
  assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                  "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                  "<|im_start|>assistant\n<think>\nSimple sum.\n</think>\n\n2 + 2 = 4.<|im_end|>\n")
  prompt = tok.apply_chat_template(MESSAGES[1:2], tokenize=False, add_generation_prompt=True)
  assert prompt == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_tokenizes_and_round_trips(tok):
  # transformers 5 returns a BatchEncoding by default; return_dict=False gives the id list.
  enc = tok.apply_chat_template(MESSAGES, tokenize=True)
  ids = tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=False)
  assert list(enc["input_ids"]) == ids
  text = tok.apply_chat_template(MESSAGES, tokenize=False)
  assert ids == tok.encode(text)
  assert tok.decode(ids) == text
  assert ids.count(tok.convert_tokens_to_ids("<think>")) == 1


@pytest.mark.slow
def test_rebuild_is_byte_identical_to_committed_asset(tmp_path):
  # A fresh hash seed in a subprocess catches set/dict-order nondeterminism too.
  env = dict(os.environ, PYTHONHASHSEED="12345")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tokenizer.py"),
                         "--out", str(tmp_path)], env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  names = sorted(os.listdir(demo_tokenizer_path()))
  assert names == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
  match, mismatch, errors = filecmp.cmpfiles(demo_tokenizer_path(), tmp_path, names, shallow=False)
  assert (mismatch, errors) == ([], []), "asset is stale: rerun tools/make_tokenizer.py"


def test_make_tokenizer_rejects_tiny_vocab(tmp_path, capsys):
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  try:
    import make_tokenizer
  finally:
    sys.path.pop(0)
  assert make_tokenizer.main(["--out", str(tmp_path), "--vocab_size", "100"]) == 2
  assert capsys.readouterr().err.startswith("error: --vocab_size 100")
  assert not os.listdir(tmp_path)


def test_load_tokenizer_default_and_missing_dir(tmp_path):
  assert load_tokenizer("").get_vocab() == load_tokenizer(demo_tokenizer_path()).get_vocab()
  missing = str(tmp_path / "no_such_tokenizer")
  with pytest.raises(UserError, match="no_such_tokenizer"):
    load_tokenizer(missing)


def _tokenizer_without_think() -> PreTrainedTokenizerFast:
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(["think about it, then answer"] * 20, trainer=trainer)
  return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")


def test_ensure_think_tokens_adds_once():
  tok = _tokenizer_without_think()
  n = len(tok)
  added = ensure_think_tokens(tok)
  assert added == [n, n + 1] and len(tok) == n + 2
  assert tok.encode("<think>") == [n] and tok.encode("</think>") == [n + 1]
  assert ensure_think_tokens(tok) == []
  assert ensure_think_tokens(load_tokenizer()) == []

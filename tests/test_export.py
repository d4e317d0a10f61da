"""Export: bit-exact round trips, parity with transformers after training, and guards."""

import glob
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from ease_jax.hf import save as export
from ease_jax.errors import UserError
from ease_jax.generation.generate import load_generation_model
from ease_jax.hf import load_pretrained, save_pretrained
from tests.conftest import REPO
from tests.hf_models import make_hf_model, torch_logits
from tests.test_hf import CASES


def _tensors(directory) -> dict:
  out = {}
  for f in glob.glob(f"{directory}/*.safetensors"):
    out.update(load_file(f))
  return out


@pytest.mark.parametrize("case", ["qwen2-untied-gqa3", "llama3-scaled-tied-mha", "qwen3-headdim"])
def test_round_trip_is_bit_identical(case, tmp_path):
  family, config = CASES[case]
  _, src = make_hf_model(family, out_dir=str(tmp_path / "src"), **config)
  model, cfg = load_pretrained(src)
  out = save_pretrained(model, cfg, tmp_path / "out", dtype="float32")
  a, b = _tensors(src), _tensors(out)
  assert set(a) == set(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
  config_out = json.loads((out / "config.json").read_text())
  assert config_out["architectures"] == [export.FAMILY_ARCH[family]]


def test_sharded_export_loads_in_transformers(tmp_path):
  import transformers
  torch_model, src = make_hf_model("llama", out_dir=str(tmp_path / "src"), **CASES["llama3-scaled-untied"][1])
  model, cfg = load_pretrained(src)
  out = save_pretrained(model, cfg, tmp_path / "out", dtype="float32", max_shard_bytes=30_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 3
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24))
  assert np.abs(torch_logits(reloaded, tokens) - torch_logits(torch_model, tokens)).max() <= 1e-5


def test_bfloat16_export_holds_rounded_weights(tmp_path):
  _, src = make_hf_model("qwen2", out_dir=str(tmp_path / "src"))
  model, cfg = load_pretrained(src)
  out = save_pretrained(model, cfg, tmp_path / "out", dtype="bfloat16")
  from safetensors import safe_open
  with safe_open(str(out / "model.safetensors"), framework="flax") as f:
    got = f.get_tensor("model.embed_tokens.weight")
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got), np.asarray(model.embed[...].astype(jnp.bfloat16)))


def test_existing_output_is_refused_and_failed_export_leaves_nothing(tmp_path, monkeypatch):
  _, src = make_hf_model("qwen2", out_dir=str(tmp_path / "src"))
  model, cfg = load_pretrained(src)
  with pytest.raises(UserError, match="already exists; pass --overwrite"):
    save_pretrained(model, cfg, tmp_path / "src")

  def broken(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(export, "write_weights", broken)
  with pytest.raises(OSError, match="disk full"):
    save_pretrained(model, cfg, tmp_path / "new")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no half-written directory


def test_shape_mismatch_with_config_is_an_error(tmp_path):
  _, src = make_hf_model("qwen2", out_dir=str(tmp_path / "src"))
  model, cfg = load_pretrained(src)
  with pytest.raises(UserError, match="does not match its config"):
    save_pretrained(model, cfg.replace(intermediate_size=cfg.intermediate_size + 2), tmp_path / "o")


SYSTEM_PROMPT = "You are a careful assistant."


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """Two steps of the demo config, on the bundled tokenizer and data, with a system prompt."""
  run_dir = tmp_path_factory.mktemp("run")
  cmd = [sys.executable, "launch/train.py", "--config", "configs/demo.yaml", f"run_dir={run_dir}",
         "train.steps=2", "train.seq_len=256", "train.eval_every=0", "data.eval=[]",
         "data.max_dropped_fraction=1",  # seq_len 256 drops the longest traces
         "checkpoint.async_save=false", f"data.system_prompt={SYSTEM_PROMPT}"]
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
  return run_dir


@pytest.mark.slow
def test_trained_checkpoint_exports_with_parity_and_same_chat_ids(trained_run, tmp_path):
  out = tmp_path / "export"
  proc = subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", str(trained_run),
                         "--out", str(out), "--dtype", "float32", "--verify"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "verify: PASS" in proc.stdout
  diffs = [float(line.split("max|logit diff| ")[1].split()[0])
           for line in proc.stdout.splitlines() if "max|logit diff|" in line]
  assert len(diffs) == 3 and max(diffs) <= 1e-4

  import transformers
  exported = transformers.AutoTokenizer.from_pretrained(str(out))
  trained = transformers.AutoTokenizer.from_pretrained(str(trained_run / "tokenizer"))
  chat = [{"role": "user", "content": "Is it safe to mix bleach and ammonia?"},
          {"role": "assistant", "content": "<think>\nA safety question.\n</think>\n\nNo: toxic gas."}]
  ids = exported.apply_chat_template(chat, tokenize=True, return_dict=False)
  assert ids == trained.apply_chat_template(chat, tokenize=True, return_dict=False)
  # The run trained with a system prompt: its saved tokenizer, what generation loads from the
  # run, and the export all prompt with it.
  served = load_generation_model(str(trained_run))[2]
  for tok in (exported, trained, served):
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"), prompt
  think = exported.convert_tokens_to_ids("<think>")
  assert ids.count(think) == 1 and exported.encode("<think>", add_special_tokens=False) == [think]
  generation = json.loads((out / "generation_config.json").read_text())
  assert exported.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
  config = json.loads((out / "config.json").read_text())
  assert config["vocab_size"] >= len(exported) and config["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.slow
def test_cli_errors_are_one_line(trained_run, tmp_path):
  proc = subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", str(trained_run),
                         "--out", str(trained_run)], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
  proc = subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", str(tmp_path),
                         "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 2 and "no checkpoints" in proc.stderr and "Traceback" not in proc.stderr

"""hf:DIR is validated before anything is allocated: config.json keys, sizes against memory and
against the tensors present, the index, and safetensors headers. Each case is one UserError
naming the file and the key, in bounded time and memory."""

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from ease_jax.errors import UserError
from ease_jax.hf import load_pretrained
from ease_jax.tokenizer import demo_tokenizer_path
from tests.conftest import REPO
from tests.hf_models import make_hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  _, path = make_hf_model("qwen2", out_dir=str(tmp_path_factory.mktemp("src")))
  return path


def _copy(model_dir, tmp_path, edit=None):
  out = tmp_path / "m"
  shutil.copytree(model_dir, out)
  if edit is not None:
    config = json.loads((out / "config.json").read_text())
    config = edit(config)
    (out / "config.json").write_text(json.dumps(config))
  return out


def _fails_fast(path, pattern):
  start = time.perf_counter()
  with pytest.raises(UserError, match=pattern) as e:
    load_pretrained(path)
  assert time.perf_counter() - start < 1.0
  assert "\n" not in str(e.value)
  return str(e.value)


def _set(**kv):
  return lambda c: {**c, **kv}


def _drop(key):
  return lambda c: {k: v for k, v in c.items() if k != key}


BAD_CONFIGS = {
    "layers_1e8": (_set(num_hidden_layers=100_000_000),
                   r"config\.json: the config describes .* parameters .* but only .* GB of "
                   r"memory is available \(num_hidden_layers=100000000"),
    "huge_hidden": (_set(hidden_size=400_000_000, head_dim=16), r"GB of memory is available"),
    "huge_vocab": (_set(vocab_size=10**12), r"vocab_size=1000000000000"),
    "layers_3": (_set(num_hidden_layers=3), r"config\.json: num_hidden_layers=3 but the "
                 r"safetensors files hold 2 layer"),
    "negative": (_set(intermediate_size=-96), r"config\.json: intermediate_size must be a "
                 r"positive integer, got -96"),
    "zero": (_set(num_hidden_layers=0), r"num_hidden_layers must be a positive integer, got 0"),
    "no_heads": (_drop("num_attention_heads"), r"config\.json: required key 'num_attention_heads'"),
    "kv_not_dividing": (_set(num_key_value_heads=3), r"num_attention_heads=4 is not a multiple "
                        r"of num_key_value_heads=3"),
    "string_dim": (_set(hidden_size="64"), r"hidden_size must be a positive integer, got '64'"),
    "float_dim": (_set(hidden_size=64.0), r"hidden_size must be a positive integer, got 64\.0"),
    "bool_dim": (_set(num_key_value_heads=True), r"num_key_value_heads must be a positive integer"),
    "nan_theta": (_set(rope_theta=float("nan")), r"rope_theta must be a positive number"),
    "odd_head_dim": (_set(head_dim=7), r"head dimension 7 must be even"),
    "list_config": (lambda c: [c], r"config\.json: expected a JSON object, got list"),
    "bad_architectures": (_set(architectures="Qwen2ForCausalLM"), r"architectures must be a list"),
    "rope_list": (_set(rope_scaling=[1, 2]), r"rope_scaling must be an object or null"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_a_located_error(case, model_dir, tmp_path):
  edit, pattern = BAD_CONFIGS[case]
  message = _fails_fast(_copy(model_dir, tmp_path, edit), pattern)
  assert "config.json" in message


def _sharded(model_dir, tmp_path, weight_map_edit):
  out = _copy(model_dir, tmp_path)
  from safetensors import safe_open
  with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
    names = list(f.keys())
  index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}
  (out / "model.safetensors.index.json").write_text(weight_map_edit(index))
  return out


def test_index_pointing_outside_the_model_dir_is_refused(model_dir, tmp_path):
  def escape(index):
    shutil.copy(tmp_path / "m" / "model.safetensors", tmp_path / "x.safetensors")
    index["weight_map"]["model.norm.weight"] = "../x.safetensors"
    return json.dumps(index)
  _fails_fast(_sharded(model_dir, tmp_path, escape),
              r"model\.safetensors\.index\.json: weight_map\['model\.norm\.weight'\] = "
              r"'\.\./x\.safetensors' points outside")


@pytest.mark.parametrize("text,pattern", [
    ("{broken", r"index\.json: not valid JSON"),
    ('{"weight_map": []}', r"index\.json: expected an object with a non-empty 'weight_map'"),
    ('["model.safetensors"]', r"index\.json: expected an object"),
    ('{"weight_map": {"model.norm.weight": "gone.safetensors"}}', r"names 'gone\.safetensors', "
     r"which does not exist"),
    ('{"weight_map": {"model.norm.weight": 3}}', r"weight_map\['model\.norm\.weight'\] must be a "
     r"file name"),
])
def test_broken_index_is_a_located_error(text, pattern, model_dir, tmp_path):
  _fails_fast(_sharded(model_dir, tmp_path, lambda index: text), pattern)


def _edit_header(path, edit):
  raw = (path / "model.safetensors").read_bytes()
  n = struct.unpack("<Q", raw[:8])[0]
  header, data = raw[8:8 + n], raw[8 + n:]
  header, data = edit(header, data)
  (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)


def _retype(header, data):
  h = json.loads(header)
  h["model.norm.weight"]["dtype"] = "I32"
  return json.dumps(h).encode(), data


def _offsets_past_end(header, data):
  h = json.loads(header)
  h["model.norm.weight"]["data_offsets"] = [0, len(data) + 256]
  return json.dumps(h).encode(), data


def _shape_lies(header, data):
  h = json.loads(header)
  h["model.norm.weight"]["shape"] = [10**9]
  return json.dumps(h).encode(), data


@pytest.mark.parametrize("edit,pattern", [
    (lambda h, d: (b"{not json" + h[9:], d), r"model\.safetensors: not a valid safetensors file "
     r"\(header is not JSON"),
    (lambda h, d: (h, d[:100]), r"model\.safetensors: not a valid safetensors file \(tensor .* "
     r"data_offsets .* outside the file's data"),
    (_offsets_past_end, r"data_offsets .* outside the file's data"),
    (_shape_lies, r"tensor 'model\.norm\.weight': 256 bytes for shape \[1000000000\]"),
    (_retype, r"tensor 'model\.norm\.weight' has dtype I32; model weights must be floating"),
])
def test_bad_safetensors_header_is_a_located_error(edit, pattern, model_dir, tmp_path):
  path = _copy(model_dir, tmp_path)
  _edit_header(path, edit)
  _fails_fast(path, pattern)


def test_header_length_beyond_the_file(model_dir, tmp_path):
  path = _copy(model_dir, tmp_path)
  (path / "model.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
  _fails_fast(path, r"model\.safetensors: not a valid safetensors file \(header length "
              r"1152921504606846976 exceeds the file size 10\)")


BOUNDED = """
import json, sys, time
from ease_jax.errors import UserError
from ease_jax.hf import load_pretrained
start = time.perf_counter()
try:
  load_pretrained(sys.argv[1])
except UserError as e:
  # VmHWM: this process's own peak (ru_maxrss after fork+exec starts at the parent's RSS)
  with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
  print(json.dumps({"error": str(e), "seconds": time.perf_counter() - start, "maxrss_kb": hwm}))
"""


@pytest.mark.slow
def test_hundred_million_layers_fail_in_bounded_time_and_memory(model_dir, tmp_path):
  """The config that once ran 390 s and took 23.4 GB: refused in a fresh process, quickly."""
  path = _copy(model_dir, tmp_path, _set(num_hidden_layers=100_000_000))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(BOUNDED), str(path)],
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "num_hidden_layers=100000000" in result["error"]
  assert result["seconds"] < 10.0  # measured 0.04 s; the unchecked load ran 390 s
  assert result["maxrss_kb"] < 2 * 1024**2  # the whole process, interpreter and jax included


@pytest.mark.slow
def test_init_from_hf_with_a_huge_config_is_exit_2_before_training(model_dir, tmp_path):
  """The issue's reproduction: `model.init_from=hf:DIR` through launch/train.py."""
  path = _copy(model_dir, tmp_path, _set(num_hidden_layers=100_000_000))
  cmd = [sys.executable, "launch/train.py", "--config", "configs/demo.yaml",
         f"run_dir={tmp_path / 'run'}", f"model.init_from=hf:{path}",
         f"data.tokenizer={demo_tokenizer_path()}", "train.steps=1"]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "config.json" in lines[-1]
  assert "num_hidden_layers=100000000" in lines[-1] and "Traceback" not in proc.stderr
  assert time.perf_counter() - start < 240  # start-up of a fresh process, not 390 s of allocating
  assert not (tmp_path / "run" / "checkpoints").exists()

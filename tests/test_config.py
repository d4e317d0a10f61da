"""Config: defaults, YAML + overrides, and errors that name the key."""

from pathlib import Path

import pytest
import yaml

from ease_jax.config import Config, dump_yaml, from_dict, load_config
from ease_jax.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
  cfg = load_config(path)
  assert cfg.train.batch_size > 0 and cfg.data.train


def test_overrides_reach_nested_keys_and_list_items():
  cfg = load_config(CONFIGS[0], ["train.steps=7", "loss.span_weights.gate=3",
                                 "data.train.0.weight=0.5", "mesh.fsdp=-1", "run_dir=/tmp/x"])
  assert (cfg.train.steps, cfg.loss.span_weights.gate, cfg.data.train[0].weight) == (7, 3.0, 0.5)
  assert cfg.run_dir == "/tmp/x"


def test_dumped_yaml_reads_back_to_the_same_config():
  cfg = load_config(CONFIGS[0], ["train.lr=0.01"])
  assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg
  assert load_config(None) == Config()


@pytest.mark.parametrize("override,message", [
    ("train.stpes=3", "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
    ("train.steps=abc", "train.steps: expected int, got 'abc'"),
    ("train.batch_size=-4", "train.batch_size: -4 is not allowed; expected a positive number"),
    ("train.seq_len=2.5", "train.seq_len: expected int"),
    ("loss.normalize=mean", "loss.normalize: 'mean' is not allowed; choose one of 'objective' | 'token'"),
    ("data.overlong=truncate", "data.overlong: 'truncate' is not allowed; choose one of 'drop' | 'error'"),
    ("data.train=[{adapter: csv, path: x}]", "data.train[0].adapter: 'csv' is not allowed"),
    ("data.train=[{adapter: star}]", "missing required config key(s): data.train[0].path"),
    ("mesh.fsdp=0", "mesh.fsdp: 0 is not allowed"),
    ("train.tail_buckets=-2", "train.tail_buckets: -2 is not allowed; expected a number >= 0, or -1"),
    ("train.loss_chunk=-1", "train.loss_chunk: -1 is not allowed; expected a number >= 0"),
    ("data.prefetch_batches=-3", "data.prefetch_batches: -3 is not allowed; expected a number >= 0"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio: 1.5 is not allowed; expected a ratio in [0, 1)"),
    ("checkpoint=5", "checkpoint: expected a mapping of CheckpointConfig fields"),
    ("train.steps", "is not of the form key.sub=value"),
    ("train.lr=[1", "value is not valid YAML"),
])
def test_bad_values_name_the_key(override, message):
  with pytest.raises(ConfigError) as e:
    load_config(CONFIGS[0], [override])
  assert message in str(e.value)


def test_bad_yaml_files_name_the_file(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("train: [1, 2\n")
  with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
    load_config(bad)
  bad.write_text("- a list\n")
  with pytest.raises(ConfigError, match="the top level must be a mapping"):
    load_config(bad)
  with pytest.raises(ConfigError, match="config file not found"):
    load_config(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
  evil = tmp_path / "evil.yaml"
  evil.write_text("run_dir: !!python/object/apply:os.system ['echo pwned']\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_config(evil)


def test_exponent_floats_without_a_dot_are_floats():
  assert load_config(None, ["train.lr=1e-5"]).train.lr == 1e-5

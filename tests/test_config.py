"""Config: defaults, YAML + overrides, and errors that name the key."""

from pathlib import Path

import pytest
import yaml

from ease_jax.config import Config, checks, dump_yaml, from_dict, load_config
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


def _tree(key: str, value):
  """{'a': {'b': value}} for 'a.b'; a `[0]` part makes a one-source list."""
  head, _, rest = key.partition(".")
  if head.endswith("[0]"):
    item = {"adapter": "star", "path": "x.jsonl"} | _tree(rest, value)
    return {head[:-3]: [item]}
  return {head: _tree(rest, value) if rest else value}


def _merge(a: dict, b: dict) -> dict:
  return {**a, **{k: _merge(a[k], v) if isinstance(v, dict) and k in a else v
                  for k, v in b.items()}}


@pytest.mark.parametrize("key", sorted(checks()))
def test_every_declared_constraint_is_reached(key):
  """Each field's declared check: its default passes, each of its `bad` values is refused
  with an error naming the key and what is allowed."""
  check = checks()[key]
  assert check.bad, f"{key}: its check declares no value it rejects"
  for bad in check.bad:
    assert not check.ok(bad)
    with pytest.raises(ConfigError) as e:
      from_dict(_tree(key, bad))
    assert str(e.value).startswith(f"{key}: ") and "is not allowed" in str(e.value)
    assert str(e.value).endswith(f"expected {check.allowed}"), str(e.value)
  if "[0]" not in key:
    value = Config()
    for part in key.split("."):
      value = getattr(value, part)
    assert check.ok(value), f"the default of {key} ({value!r}) fails its own check"


@pytest.mark.parametrize("override,message", [
    ("train.adam_b1=5", "train.adam_b1: 5.0 is not allowed; expected a ratio in [0, 1)"),
    ("train.adam_eps=-1", "train.adam_eps: -1.0 is not allowed; expected a positive number"),
    ("train.lr=.nan", "train.lr: nan is not allowed; expected a finite number"),
    ("data.train.0.weight=.inf", "data.train[0].weight: inf is not allowed; expected a finite"),
    ("data.train.0.weight=0", "data.train[0].weight: 0.0 is not allowed; expected a positive"),
    ("data.train.0.max_rows=-1", "data.train[0].max_rows: -1 is not allowed"),
    ("train.seed=-1", "train.seed: -1 is not allowed; expected an integer in [0, 2**32)"),
    ("train.seed=99999999999999999999", "train.seed: 99999999999999999999 is not allowed"),
    ("run_dir=", "run_dir: '' is not allowed; expected a non-empty path"),
    ("loss.objective_weights.direct=-1", "loss.objective_weights.direct: -1.0 is not allowed"),
    ("loss.objective_weights={reasoning: 0, refusal: 0, direct: 0}",
     "loss.objective_weights: all are 0: nothing would be trained"),
    ("loss.span_weights={think: 0, answer: 0, gate: 0}", "loss.span_weights: all are 0"),
    ("data.max_dropped_fraction=2", "data.max_dropped_fraction: 2.0 is not allowed"),
    ("train.max_consecutive_skipped_steps=0", "train.max_consecutive_skipped_steps: 0 is not"),
])
def test_values_out_of_range_name_the_key(override, message):
  with pytest.raises(ConfigError) as e:
    load_config(CONFIGS[0], [override])
  assert message in str(e.value)


def test_one_objective_weight_may_be_zero():
  cfg = load_config(CONFIGS[0], ["loss.objective_weights.direct=0"])
  assert cfg.loss.objective_weights.direct == 0.0


def test_tool_number_arguments_are_checked_with_the_same_constraints(capsys):
  import argparse
  import importlib.util
  from ease_jax.config import POSITIVE, arg
  assert arg(float, POSITIVE)("2.5") == 2.5
  for bad in ("0", "-1", "nan", "inf", "two"):
    with pytest.raises(argparse.ArgumentTypeError):
      arg(float, POSITIVE)(bad)
  tools = Path(__file__).resolve().parents[1] / "tools"
  spec = importlib.util.spec_from_file_location("export_hf", tools / "export_hf.py")
  export_hf = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(export_hf)
  with pytest.raises(SystemExit) as e:
    export_hf.main(["--checkpoint", "run", "--out", "out", "--max_shard_gb", "0"])
  assert e.value.code == 2
  assert "argument --max_shard_gb: 0.0 is not allowed; expected a positive number" in (
      capsys.readouterr().err)

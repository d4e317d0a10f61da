"""The training config: frozen typed dataclasses, every key declared once here.

A YAML file fills them; ``key.sub=value`` overrides change any field. Unknown
keys, wrong types and bad values raise ``ConfigError`` naming the key and what
is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ease_jax.errors import ConfigError

DType = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class SourceConfig:
  """One data source: an adapter over a file, a directory or a `datasets` name."""
  adapter: Literal["star", "ease10k", "wildjailbreak", "prompt_response", "messages"]
  path: str
  weight: float = 1.0
  name: str = ""  # shown in metrics and reports; defaults to the file stem
  format: Literal["auto", "jsonl", "json", "parquet", "disk", "hf"] = "auto"
  split: str = "train"  # for `datasets` directories and `load_dataset`
  target_type: str = ""  # override the adapter's target type (reasoning|refusal|direct)
  max_rows: int = 0  # 0 = all rows


@dataclass(frozen=True)
class DataConfig:
  """Sources and how records become token rows."""
  train: tuple[SourceConfig, ...] = ()
  eval: tuple[SourceConfig, ...] = ()
  tokenizer: str = ""  # HF tokenizer directory; "" = the model's, else the bundled demo tokenizer
  chat_template: str = ""  # a Jinja file that replaces the tokenizer's template for training
  system_prompt: str = ""  # prepended as a system turn when non-empty
  empty_think: bool = False  # render direct/refusal targets with an empty think block
  overlong: Literal["drop", "error"] = "drop"
  on_bad_record: Literal["error", "skip"] = "error"
  shuffle: bool = True
  worker_count: int = 0  # grain worker processes; 0 = in-process
  # Batches a background thread renders and packs ahead of the loop (worker_count=0 only):
  # -1 = one packing round (PACKING_BINS rows), 0 = none (the loop's thread does the work).
  prefetch_batches: int = -1


@dataclass(frozen=True)
class ModelConfig:
  """Where the weights come from and how they are computed."""
  init_from: str = "scratch:tiny"  # hf:PATH | gguf:PATH | ckpt:RUN_DIR[@STEP] | scratch:PRESET
  param_dtype: DType = "float32"
  compute_dtype: DType = "float32"
  # cudnn: NVIDIA GPUs (cuDNN flash attention; 1.7x the step rate of xla on an H200,
  # BENCHMARKS.md); splash: TPUs (Pallas splash kernel on segment ids, O(T) memory; its
  # speed is unmeasured); xla: TPUs and CPUs (blockwise on CPU).
  attention: Literal["xla", "cudnn", "splash"] = "xla"
  remat: bool = False


@dataclass(frozen=True)
class TrainConfig:
  """Optimisation and the loop."""
  steps: int = 0  # 0 = derive from epochs
  epochs: float = 1.0
  seed: int = 0
  batch_size: int = 8  # sequences per step, global
  seq_len: int = 512
  grad_accum: int = 1
  # Optimizer steps per compiled call (a lax.scan over that many batches): fewer dispatches,
  # and on XLA:CPU the step's scratch memory is mapped once per call, not once per step.
  steps_per_call: int = 1
  # The model's tail (last MLP, final norm, LM head) and the cross-entropy run only on the
  # positions with loss, padded to the next of this many static sizes (ease_jax/train/tail.py);
  # 0 = on every position, plain autodiff; -1 = 8 on CPU, 0 on GPU/TPU (not measured there yet).
  tail_buckets: int = -1
  # Positions per piece of the tail and the cross-entropy (a lax.scan): the step then holds
  # the float32 logits (and their gradient) of one piece of each batch shard, not of all
  # B x T positions; for large vocabularies (Qwen2.5: 151,936). 0 = all at once.
  loss_chunk: int = 0
  lr: float = 1e-5
  warmup_ratio: float = 0.03
  min_lr_ratio: float = 0.0
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  trainable: str = ".*"  # regex over parameter paths; others stay frozen
  eval_every: int = 0  # 0 = only at the end
  log_every: int = 1
  skip_nonfinite_steps: bool = False


@dataclass(frozen=True)
class ObjectiveWeights:
  """w_k of the mixed objective."""
  reasoning: float = 1.0
  refusal: float = 1.0
  direct: float = 1.0


@dataclass(frozen=True)
class SpanWeights:
  """a_s of the mixed objective; gate is the first assistant token."""
  think: float = 1.0
  answer: float = 1.0
  gate: float = 1.0


@dataclass(frozen=True)
class LossConfig:
  """The mixed objective (see DESIGN.md)."""
  objective_weights: ObjectiveWeights = ObjectiveWeights()
  span_weights: SpanWeights = SpanWeights()
  normalize: Literal["objective", "token"] = "objective"


@dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpointing."""
  every: int = 100
  keep: int = 3
  async_save: bool = True


@dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes; -1 on one axis takes the remaining devices."""
  data: int = 1
  fsdp: int = -1
  tensor: int = 1


@dataclass(frozen=True)
class BehaviorConfig:
  """Selective-reasoning evaluation by generation inside training (see ease_jax.evaluate)."""
  file: str = ""  # eval records with a `class` label; "" = off
  every: int = 0  # every N steps and at the end; 0 = only at the end (when `file` is set)
  max_new_tokens: int = 256
  batch_size: int = 16


@dataclass(frozen=True)
class Config:
  """The whole run."""
  run_dir: str = "runs/demo"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  loss: LossConfig = LossConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig()
  behavior: BehaviorConfig = BehaviorConfig()


# Checks on values, by dotted key: (predicate, what is allowed).
_POSITIVE = (lambda v: v > 0, "a positive number")
_NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
_CHECKS: dict[str, tuple[Any, str]] = {
    "train.steps": _NON_NEGATIVE, "train.epochs": _POSITIVE, "train.batch_size": _POSITIVE,
    "train.seq_len": (lambda v: v >= 8, "an integer >= 8"), "train.grad_accum": _POSITIVE,
    "train.steps_per_call": _POSITIVE,
    "train.tail_buckets": (lambda v: v >= -1, "a number >= 0, or -1 (8 on CPU, 0 elsewhere)"),
    "train.loss_chunk": _NON_NEGATIVE,
    "train.lr": _NON_NEGATIVE, "train.warmup_ratio": (lambda v: 0 <= v < 1, "a ratio in [0, 1)"),
    "train.min_lr_ratio": (lambda v: 0 <= v <= 1, "a ratio in [0, 1]"),
    "train.weight_decay": _NON_NEGATIVE, "train.clip_norm": _NON_NEGATIVE,
    "train.eval_every": _NON_NEGATIVE, "train.log_every": _POSITIVE,
    "checkpoint.every": _POSITIVE, "checkpoint.keep": _POSITIVE,
    "mesh.data": _POSITIVE, "mesh.tensor": _POSITIVE,
    "mesh.fsdp": (lambda v: v == -1 or v > 0, "a positive integer or -1 (all remaining devices)"),
    "data.worker_count": _NON_NEGATIVE, "behavior.every": _NON_NEGATIVE,
    "data.prefetch_batches": (lambda v: v >= -1, "a number >= 0, or -1 (one packing round)"),
    "behavior.max_new_tokens": _POSITIVE, "behavior.batch_size": _POSITIVE,
}


def _type_name(tp: Any) -> str:
  if typing.get_origin(tp) is Literal:
    return " | ".join(repr(a) for a in typing.get_args(tp))
  return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
  """Converts a YAML value to the declared type, or raises ConfigError naming the key."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
    return _build(tp, value, key + ".")
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {_type_name(tp)}")
    return value
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a list, got {value!r}")
    return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    return _convert(value, next(a for a in args if a is not type(None)), key)
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
    try:
      return float(value)
    except ValueError:
      pass
  if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
  return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
  """Builds dataclass `cls` from a dict, rejecting unknown keys and checking every value."""
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  kwargs = {}
  for name, value in values.items():
    if name not in names:
      near = difflib.get_close_matches(str(name), names, n=1)
      hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
      raise ConfigError(f"unknown config key '{prefix}{name}'{hint}; "
                        f"allowed under '{prefix or '.'}': {', '.join(names)}")
    kwargs[name] = _convert(value, hints[name], prefix + name)
    check = _CHECKS.get(prefix + name)
    if check is not None and not check[0](kwargs[name]):
      raise ConfigError(f"{prefix}{name}: {kwargs[name]!r} is not allowed; expected {check[1]}")
  missing = [f.name for f in dataclasses.fields(cls)
             if f.name not in kwargs and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"missing required config key(s): {', '.join(prefix + m for m in missing)}")
  return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
  """Sets `a.b.0.c` in a nested dict/list tree, creating sections as needed."""
  parts = key.split(".")
  node: Any = tree
  for i, part in enumerate(parts):
    last = i == len(parts) - 1
    if isinstance(node, list):
      if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override '{key}': '{'.'.join(parts[:i])}' is a list of {len(node)} "
                          f"item(s); use an index 0..{len(node) - 1}")
      part = int(part)
    elif not isinstance(node, dict):
      raise ConfigError(f"override '{key}': '{'.'.join(parts[:i])}' is not a section")
    if last:
      node[part] = value
    else:
      if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
        node[part] = {}
      node = node[part]


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
  """Applies ``key.sub=value`` strings (values are YAML) to a nested tree, in place."""
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
      value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
      raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    _set_dotted(tree, key.strip(), value)
  return tree


def parse_overrides(overrides: list[str]) -> dict:
  """Parses ``key.sub=value`` strings into a nested dict."""
  return apply_overrides({}, overrides)


def read_yaml(path: str | Path) -> dict:
  """Reads a YAML mapping with the safe loader; errors name the file."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"config file not found: {path}")
  try:
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not valid YAML: {e}") from None
  if not isinstance(tree, dict):
    raise ConfigError(f"{path}: the top level must be a mapping of config sections")
  return tree


def from_dict(tree: dict) -> Config:
  """Builds and validates a Config from a nested dict."""
  return _build(Config, tree)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
  """Loads YAML (or the defaults when `path` is None) and applies dotted overrides."""
  tree = read_yaml(path) if path else {}
  return from_dict(apply_overrides(tree, list(overrides)))


def to_dict(cfg: Any) -> dict:
  """The config as plain data (for config.yaml and TensorBoard)."""
  return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
  """The resolved config as YAML text that `load_config` reads back to the same Config."""
  return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Config, **sections: Any) -> Config:
  """`dataclasses.replace` for a top-level section, e.g. replace(cfg, train=...)."""
  return dataclasses.replace(cfg, **sections)


__all__ = ["Config", "ModelConfig", "DataConfig", "SourceConfig", "TrainConfig", "LossConfig",
           "CheckpointConfig", "MeshConfig", "BehaviorConfig", "ObjectiveWeights", "SpanWeights", "load_config",
           "from_dict", "parse_overrides", "apply_overrides", "dump_yaml", "to_dict", "read_yaml"]

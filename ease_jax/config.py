"""The training config: frozen typed dataclasses, every key declared once here.

A YAML file fills them; ``key.sub=value`` overrides change any field (both parsed by
`config_io`). Unknown keys, wrong types and bad values raise ``ConfigError`` naming the
key and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from ease_jax.config_io import apply_overrides, read_yaml
from ease_jax.errors import ConfigError

DType = Literal["float32", "bfloat16", "float16"]
# Top-level sections of a YAML file that hold a command's options, not the run's: `diagnose:`
# for ease-diagnose, `build_mix:` for ease-build-mix (ease_jax/cli/options.py). The training
# loader skips exactly these, so the phase-2 config can carry the stages that build its data.
TOOL_SECTIONS = ("diagnose", "build_mix")
Attention = Literal["xla", "cudnn", "splash"]  # the decoder's attention implementations


@dataclass(frozen=True)
class Check:
  """A constraint on one config value: `ok(value)`, what is allowed, and values it rejects
  (tests/test_config.py feeds each `bad` value to its key and expects a ConfigError)."""
  ok: Callable[[Any], bool]
  allowed: str
  bad: tuple = ()


POSITIVE = Check(lambda v: v > 0, "a positive number", (0, -1))
NON_NEGATIVE = Check(lambda v: v >= 0, "a number >= 0", (-1,))
AT_LEAST_ONE = Check(lambda v: v >= 1, "an integer >= 1", (0, -1))
RATIO_BELOW_1 = Check(lambda v: 0 <= v < 1, "a ratio in [0, 1)", (1.0, -0.1))
RATIO = Check(lambda v: 0 <= v <= 1, "a ratio in [0, 1]", (1.5, -0.1))
SEED = Check(lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)", (-1, 2**32))
PROBABILITY = Check(lambda v: 0 < v <= 1, "a number in (0, 1]", (0, 1.5))
NOT_EMPTY = Check(lambda v: bool(v.strip()), "a non-empty path", ("", " "))


def _f(default: Any, check: Check) -> Any:
  """A dataclass field whose values must pass `check` (see `_build`)."""
  return dataclasses.field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class SourceConfig:
  """One data source: an adapter over a file, a directory or a `datasets` name."""
  # How rows map onto a Record: the public dataset layouts (docs/datasets.md).
  adapter: Literal["star", "ease10k", "wildjailbreak", "wildjailbreak_refuse_adversarial",
                   "prompt_response", "messages"]
  # a file, a `datasets` directory, or a `load_dataset` name (format: hf)
  path: str = _f(dataclasses.MISSING, NOT_EMPTY)
  weight: float = _f(1.0, POSITIVE)  # relative share of this source in the training mix
  name: str = ""  # shown in metrics and reports; defaults to the file stem
  # auto: by suffix (.jsonl .json .csv .tsv .parquet); a directory is disk
  format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "disk", "hf"] = "auto"
  split: str = "train"  # for `datasets` directories and `load_dataset`
  target_type: str = ""  # override the adapter's target type (reasoning|refusal|direct)
  max_rows: int = _f(0, NON_NEGATIVE)  # 0 = all rows


@dataclass(frozen=True)
class DataConfig:
  """Sources and how records become token rows."""
  train: tuple[SourceConfig, ...] = ()  # training sources, mixed by weight
  eval: tuple[SourceConfig, ...] = ()  # evaluation sources, one pass in order
  tokenizer: str = ""  # HF tokenizer directory; "" = the model's, else the bundled demo tokenizer
  chat_template: str = ""  # a Jinja file that replaces the tokenizer's template for training
  system_prompt: str = ""  # prepended as a system turn when non-empty
  empty_think: bool = False  # render direct/refusal targets with an empty think block
  overlong: Literal["drop", "error"] = "drop"  # examples over train.seq_len: drop (counted) or stop
  on_bad_record: Literal["error", "skip"] = "error"  # a bad row stops the run, or is skipped
  # A source that loses more than this fraction of its rows (bad or overlong) stops the run
  # at start-up; any loss at all is a warning (docs/data_checks.md).
  max_dropped_fraction: float = _f(0.1, RATIO)
  # Text in the data that spells a special token (`<|im_end|>`): error = a DataError naming
  # the row and the token; escape = a zero-width space after its first character, so it is
  # tokenized as ordinary text; allow = tokenized as the special token itself.
  special_text: Literal["error", "escape", "allow"] = "error"
  shuffle: bool = True  # reshuffle training records every epoch
  worker_count: int = _f(0, NON_NEGATIVE)  # grain worker processes; 0 = in-process
  # Batches a background thread renders and packs ahead of the loop (worker_count=0 only):
  # -1 = one packing round (PACKING_BINS rows), 0 = none (the loop's thread does the work).
  prefetch_batches: int = _f(-1, Check(lambda v: v >= -1,
                                       "a number >= 0, or -1 (one packing round)", (-2,)))


@dataclass(frozen=True)
class ModelConfig:
  """Where the weights come from and how they are computed."""
  init_from: str = "scratch:tiny"  # hf:PATH | gguf:PATH | ckpt:RUN_DIR[@STEP] | scratch:PRESET
  param_dtype: DType = "float32"  # weights and optimizer state
  compute_dtype: DType = "float32"  # activations and matrix products (bfloat16: mixed precision)
  # cudnn: NVIDIA GPUs (cuDNN flash attention; 1.7x the step rate of xla on an H200,
  # BENCHMARKS.md); splash: TPUs (Pallas splash kernel on segment ids, O(T) memory; its
  # speed is unmeasured); xla: TPUs and CPUs (blockwise on CPU).
  attention: Attention = "xla"
  remat: bool = False  # recompute each block's activations in the backward pass (less memory)


@dataclass(frozen=True)
class TrainConfig:
  """Optimisation and the loop."""
  steps: int = _f(0, NON_NEGATIVE)  # 0 = derive from epochs
  epochs: float = _f(1.0, POSITIVE)  # used when steps is 0
  seed: int = _f(0, SEED)  # data order and initialisation
  batch_size: int = _f(8, POSITIVE)  # sequences per step, global
  seq_len: int = _f(512, Check(lambda v: v >= 8, "an integer >= 8", (7, -128)))  # tokens per row
  grad_accum: int = _f(1, POSITIVE)  # micro-batches per step (the same result, less memory)
  # Optimizer steps per compiled call (a lax.scan over that many batches): fewer dispatches,
  # and on XLA:CPU the step's scratch memory is mapped once per call, not once per step.
  steps_per_call: int = _f(1, POSITIVE)
  # The model's tail (last MLP, final norm, LM head) and the cross-entropy run only on the
  # positions with loss, padded to the next of this many static sizes (ease_jax/train/tail.py);
  # 0 = on every position, plain autodiff; -1 = 8 on CPU, 0 on GPU/TPU (not measured there yet).
  tail_buckets: int = _f(-1, Check(lambda v: v >= -1,
                                   "a number >= 0, or -1 (8 on CPU, 0 elsewhere)", (-2,)))
  # Positions per piece of the tail and the cross-entropy (a lax.scan): the step then holds
  # the float32 logits (and their gradient) of one piece of each batch shard, not of all
  # B x T positions; for large vocabularies (Qwen2.5: 151,936). 0 = all at once.
  loss_chunk: int = _f(0, NON_NEGATIVE)
  lr: float = _f(1e-5, NON_NEGATIVE)  # peak learning rate (linear warmup, then cosine decay)
  warmup_ratio: float = _f(0.03, RATIO_BELOW_1)  # fraction of the steps spent warming up
  min_lr_ratio: float = _f(0.0, RATIO)  # the cosine ends at lr x this
  weight_decay: float = _f(0.01, NON_NEGATIVE)  # AdamW decay; norms and biases are not decayed
  clip_norm: float = _f(1.0, NON_NEGATIVE)  # global gradient-norm clipping; 0 = off
  adam_b1: float = _f(0.9, RATIO_BELOW_1)  # AdamW beta1
  adam_b2: float = _f(0.999, RATIO_BELOW_1)  # AdamW beta2
  adam_eps: float = _f(1e-8, POSITIVE)  # AdamW epsilon
  trainable: str = ".*"  # regex over parameter paths; others stay frozen
  eval_every: int = _f(0, NON_NEGATIVE)  # 0 = only at the end
  log_every: int = _f(1, POSITIVE)  # steps between metric writes
  skip_nonfinite_steps: bool = False  # skip NaN/Inf steps (counted) instead of stopping
  # With skip_nonfinite_steps: the run stops (exit 1) once more steps than this were skipped
  # in all, or more than max_consecutive_skipped_steps in a row (a diverged run skips every step).
  max_skipped_steps: int = _f(20, AT_LEAST_ONE)
  max_consecutive_skipped_steps: int = _f(3, AT_LEAST_ONE)  # skipped steps in a row allowed


@dataclass(frozen=True)
class ObjectiveWeights:
  """w_k of the mixed objective; 0 leaves an objective out, at least one must be positive."""
  reasoning: float = _f(1.0, NON_NEGATIVE)  # reasoning targets (think, then answer)
  refusal: float = _f(1.0, NON_NEGATIVE)  # direct refusals
  direct: float = _f(1.0, NON_NEGATIVE)  # direct answers

  def cross_check(self) -> str | None:
    """Why the weights together are not allowed, or None."""
    return None if any(dataclasses.astuple(self)) else "all are 0: nothing would be trained"


@dataclass(frozen=True)
class SpanWeights:
  """a_s of the mixed objective; gate is the first assistant token."""
  think: float = _f(1.0, NON_NEGATIVE)  # tokens inside the think block
  answer: float = _f(1.0, NON_NEGATIVE)  # tokens of the answer, end of turn included
  # the first assistant token: `<think>` or the first answer token
  gate: float = _f(1.0, NON_NEGATIVE)

  def cross_check(self) -> str | None:
    """Why the weights together are not allowed, or None."""
    return None if any(dataclasses.astuple(self)) else "all are 0: nothing would be trained"


@dataclass(frozen=True)
class LossConfig:
  """The mixed objective (see docs/design.md)."""
  objective_weights: ObjectiveWeights = ObjectiveWeights()
  span_weights: SpanWeights = SpanWeights()
  normalize: Literal["objective", "token"] = "objective"  # token: the plain token-mean SFT loss


@dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpointing."""
  every: int = _f(100, POSITIVE)  # steps between checkpoints (and one at the end)
  keep: int = _f(3, POSITIVE)  # newest checkpoints kept
  async_save: bool = True  # write in the background while training continues


@dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes; -1 on one axis takes the remaining devices."""
  data: int = _f(1, POSITIVE)  # pure data parallel
  # data parallel with parameters and optimizer state sharded
  fsdp: int = _f(-1, Check(lambda v: v == -1 or v > 0,
                           "a positive integer or -1 (all remaining devices)", (0, -2)))
  tensor: int = _f(1, POSITIVE)  # heads, MLP and vocabulary split


@dataclass(frozen=True)
class BehaviorConfig:
  """Selective-reasoning evaluation by generation inside training (see ease_jax.recipe.evaluate)."""
  file: str = ""  # eval records with a `class` label; "" = off
  every: int = _f(0, NON_NEGATIVE)  # every N steps and at the end; 0 = only at the end
  max_new_tokens: int = _f(256, POSITIVE)  # greedy decoding budget per prompt
  batch_size: int = _f(16, POSITIVE)  # prompts generated together


@dataclass(frozen=True)
class Config:
  """The whole run."""
  # checkpoints, metrics, config.yaml, tokenizer; a local or gs:// path
  run_dir: str = _f("runs/demo", NOT_EMPTY)
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  loss: LossConfig = LossConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig()
  behavior: BehaviorConfig = BehaviorConfig()


def arg(tp: type, check: Check) -> Callable[[str], Any]:
  """An argparse `type=` for the tools: converts with `tp` (floats must be finite) and
  refuses values that fail `check`, as argparse does (`error: argument --x: ...`, exit 2)."""
  def parse(text: str) -> Any:
    try:
      value = tp(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got {text!r}") from None
    if (tp is float and not math.isfinite(value)) or not check.ok(value):
      raise argparse.ArgumentTypeError(f"{value!r} is not allowed; expected {check.allowed}")
    return value
  parse.__name__ = tp.__name__
  return parse


def checks(cls: type = None, prefix: str = "") -> dict[str, Check]:
  """Every declared value constraint by dotted key (list items as `[0]`)."""
  out = {}
  for f in dataclasses.fields(cls or Config):
    tp = typing.get_type_hints(cls or Config)[f.name]
    if "check" in f.metadata:
      out[prefix + f.name] = f.metadata["check"]
    if dataclasses.is_dataclass(tp):
      out |= checks(tp, f"{prefix}{f.name}.")
    elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
      out |= checks(typing.get_args(tp)[0], f"{prefix}{f.name}[0].")
  return out


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
  if tp is float:
    return _float(value, key)
  if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
  return value


def _float(value: Any, key: str) -> float:
  """A finite float from a YAML number (or a string such as `1e-5`, which YAML 1.1 reads as
  text); NaN and infinity are no sensible value of any key."""
  if isinstance(value, str):
    try:
      value = float(value)
    except ValueError:
      pass
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"{key}: expected float, got {value!r} ({type(value).__name__})")
  if not math.isfinite(value):
    raise ConfigError(f"{key}: {value!r} is not allowed; expected a finite number")
  return float(value)


def _build(cls: type, values: dict, prefix: str = "") -> Any:
  """Builds dataclass `cls` from a dict, rejecting unknown keys and checking every value."""
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  names = list(fields)
  kwargs = {}
  for name, value in values.items():
    if name not in names:
      near = difflib.get_close_matches(str(name), names, n=1)
      hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
      raise ConfigError(f"unknown config key '{prefix}{name}'{hint}; "
                        f"allowed under '{prefix or '.'}': {', '.join(names)}")
    kwargs[name] = _convert(value, hints[name], prefix + name)
    check = fields[name].metadata.get("check")
    if check is not None and not check.ok(kwargs[name]):
      raise ConfigError(f"{prefix}{name}: {kwargs[name]!r} is not allowed; expected "
                        f"{check.allowed}")
  missing = [f.name for f in dataclasses.fields(cls)
             if f.name not in kwargs and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ConfigError(f"missing required config key(s): {', '.join(prefix + m for m in missing)}")
  obj = cls(**kwargs)
  problem = obj.cross_check() if hasattr(obj, "cross_check") else None
  if problem:
    raise ConfigError(f"{prefix.rstrip('.')}: {problem}")
  return obj


def from_dict(tree: dict) -> Config:
  """Builds and validates a Config from a nested dict (the TOOL_SECTIONS are not the run's)."""
  return _build(Config, {k: v for k, v in tree.items() if k not in TOOL_SECTIONS})


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
           "CheckpointConfig", "MeshConfig", "BehaviorConfig", "ObjectiveWeights", "SpanWeights",
           "load_config", "from_dict", "dump_yaml", "to_dict", "TOOL_SECTIONS"]

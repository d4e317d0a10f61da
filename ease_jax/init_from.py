"""Where a run's tokenizer and initial weights come from (`model.init_from`).

  hf:PATH                 a local Hugging Face directory (config.json + safetensors)
  gguf:PATH               a llama.cpp GGUF file (weights dequantized; its tokenizer)
  ckpt:RUN_DIR[@STEP]     the parameters of another run's checkpoint (phase 2 from
                          phase 1); its optimizer and data state are not used
  scratch:PRESET          random weights in a preset shape (ease_jax.models.PRESETS)

The tokenizer gets `<think>`/`</think>` if it lacks them, and the embedding grows
to cover every token id (it never shrinks: padding rows are reused).
"""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh
from transformers import PreTrainedTokenizerBase

from ease_jax import hf, sharding
from ease_jax.config import Config
from ease_jax.errors import ConfigError, UserError
from ease_jax.models import Decoder, DecoderConfig, get_preset
from ease_jax.tokenizer import (
  apply_run_template,
  demo_tokenizer_path,
  ensure_think_tokens,
  load_tokenizer,
)
from ease_jax.train import checkpoint

KINDS = ("hf", "gguf", "ckpt", "scratch")
TOKENIZER_DIR = "tokenizer"  # under RUN_DIR: the tokenizer the run trained with


def parse_init_from(spec: str) -> tuple[str, str]:
  """'kind:value' -> (kind, value), or a ConfigError naming the allowed forms."""
  kind, sep, value = spec.partition(":")
  if not sep or kind not in KINDS or not value:
    raise ConfigError(f"model.init_from: {spec!r} is not allowed; use hf:PATH, "
                      f"gguf:PATH, ckpt:RUN_DIR[@STEP] or scratch:PRESET")
  return kind, value


def tokenizer_path(cfg: Config) -> str:
  """data.tokenizer if set, else the model's own: the HF dir, phase 1's, or the demo one."""
  if cfg.data.tokenizer:
    return cfg.data.tokenizer
  kind, value = parse_init_from(cfg.model.init_from)
  if kind in ("hf", "gguf"):  # a .gguf file carries its tokenizer (see load_tokenizer)
    return value
  if kind == "ckpt":
    path = checkpoint.parse_ckpt_spec(value)[0] / TOKENIZER_DIR
    if not path.is_dir():
      raise UserError(f"model.init_from=ckpt:{value}: {path} not found; is "
                      f"{path.parent} the run_dir of a training run?")
    return str(path)
  return demo_tokenizer_path()


def load_run_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
  """The run's tokenizer, with the think tokens added when missing and the run's effective chat
  template (data.chat_template / system_prompt / empty_think) as its template, so that every
  stage that prompts the model, and the saved tokenizer, render as training does."""
  tokenizer = load_tokenizer(tokenizer_path(cfg))
  ensure_think_tokens(tokenizer)
  apply_run_template(tokenizer, cfg.data.chat_template, cfg.data.system_prompt,
                     cfg.data.empty_think)
  return tokenizer


def _numerics(cfg: Config) -> dict:
  m = cfg.model
  if not sharding.attention_runs_here(m.attention):
    device = jax.devices()[0]
    other = "".join(f" or {a}" for a in ("cudnn", "splash") if sharding.attention_runs_here(a))
    needs = {"cudnn": "NVIDIA GPUs", "splash": "TPUs (a Pallas TPU kernel)"}[m.attention]
    raise ConfigError(f"model.attention={m.attention} needs {needs}, and this run has "
                      f"{device.platform} devices ({device.device_kind}); use "
                      f"model.attention=xla{other}")
  return dict(param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, attention=m.attention,
              remat=m.remat)


def _from_ckpt(cfg: Config, spec: str, mesh: Mesh) -> tuple[Decoder, DecoderConfig]:
  """Only the parameters of another run's checkpoint, restored already sharded on `mesh`."""
  run_dir, step = checkpoint.parse_ckpt_spec(spec)
  model, model_cfg, _ = checkpoint.load_model(run_dir, step, mesh, **_numerics(cfg))
  return model, model_cfg


def init_model(cfg: Config, vocab_size: int, mesh: Mesh) -> tuple[Decoder, DecoderConfig]:
  """The initial model per `model.init_from`, covering `vocab_size` ids, sharded on `mesh`."""
  kind, value = parse_init_from(cfg.model.init_from)
  if kind == "ckpt":
    model, model_cfg = _from_ckpt(cfg, value, mesh)
  elif kind in ("hf", "gguf"):
    if kind == "gguf" and not value.lower().endswith(".gguf"):
      raise ConfigError(f"model.init_from=gguf:{value}: expected a path to a .gguf file")
    numerics = _numerics(cfg)
    model, model_cfg = hf.load_pretrained(Path(value), dtype=numerics.pop("param_dtype"),
                                          **numerics)
  else:
    try:
      model_cfg = get_preset(value).replace(**_numerics(cfg))
    except ValueError as e:
      raise ConfigError(f"model.init_from: {e}") from None
    model = Decoder(model_cfg, rngs=nnx.Rngs(cfg.train.seed))
  if vocab_size > model_cfg.vocab_size:
    model, model_cfg = hf.resize_vocab(model, model_cfg, vocab_size, seed=cfg.train.seed)
  return sharding.shard_model(model, mesh), model_cfg

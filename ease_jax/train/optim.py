"""The optimizer: AdamW, warmup + cosine, global-norm clipping, a trainable-parameter filter."""

from __future__ import annotations

import math
import re

import jax
import optax

from ease_jax.config import TrainConfig
from ease_jax.errors import ConfigError
from ease_jax.models.paths import path_str

# Parameters whose path matches this get no weight decay (RMSNorm weights, q/k/v biases),
# nor does any parameter with fewer than two dimensions.
_NO_DECAY = re.compile(r"norm|bias")


def _compile(pattern: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"train.trainable: {pattern!r} is not a valid regular expression "
                      f"({e})") from None


def trainable_mask(params, pattern: str):
  """True for the parameters whose dotted path `re.search`es `pattern` (train.trainable)."""
  regex = _compile(pattern)
  mask = jax.tree_util.tree_map_with_path(lambda p, _: bool(regex.search(path_str(p))), params)
  if not any(jax.tree.leaves(mask)):
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise ConfigError(f"train.trainable: {pattern!r} matches no parameter; paths look like "
                      f"{', '.join(names[:4])}")
  return mask


def decay_mask(params):
  """True for the parameters that get weight decay: matrices, not norms or biases."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x.ndim >= 2 and not _NO_DECAY.search(path_str(p)), params)


def make_schedule(train_cfg: TrainConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup over ceil(warmup_ratio * total) steps, then cosine to min_lr_ratio * lr."""
  warmup = math.ceil(train_cfg.warmup_ratio * total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=train_cfg.min_lr_ratio * train_cfg.lr)


def make_optimizer(train_cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW (decay masked off norms and biases) after global-norm clipping, on trainable params only.

  Parameters outside `train.trainable` get a zero update and no optimizer state;
  clipping measures the norm of the trainable gradients only.
  """
  _compile(train_cfg.trainable)  # a bad pattern fails here, not at the first step
  adamw = optax.adamw(make_schedule(train_cfg, total_steps), b1=train_cfg.adam_b1,
                      b2=train_cfg.adam_b2, eps=train_cfg.adam_eps,
                      weight_decay=train_cfg.weight_decay, mask=decay_mask)
  if train_cfg.clip_norm > 0:
    adamw = optax.chain(optax.clip_by_global_norm(train_cfg.clip_norm), adamw)

  def labels(params):
    mask = trainable_mask(params, train_cfg.trainable)
    return jax.tree.map(lambda m: "trainable" if m else "frozen", mask)

  return optax.multi_transform({"trainable": adamw, "frozen": optax.set_to_zero()}, labels)

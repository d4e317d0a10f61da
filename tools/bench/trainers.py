"""The two systems that `train_vs_reference.py` compares, each one step at a time: the
reference recipe's PyTorch step (a transformers model, AdamW, clipping, warmup + cosine) and
the ease-jax train step compiled as the training loop compiles it."""

from __future__ import annotations

import math

import common
import numpy as np


def torch_reference(mcfg, directory: str, seed: int, dtype: str):
  """A random transformers Qwen2ForCausalLM, saved to `directory` in float32 for ease-jax,
  then held in `dtype`."""
  import torch
  import transformers
  from ease_jax.hf.save import hf_config
  torch.manual_seed(seed)
  hf = transformers.Qwen2Config(**hf_config(mcfg, "float32"))
  model = transformers.Qwen2ForCausalLM(hf).float()
  model.save_pretrained(directory)
  return model.to(getattr(torch, dtype))


def torch_trainer(model, train_cfg, total_steps: int):
  """The reference step: forward with labels, backward, clip, AdamW, LR schedule; under
  bf16 autocast when the model is in bfloat16 (the recipe's `bf16=True`)."""
  import torch
  import transformers
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
  no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": train_cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=train_cfg.lr,
                          betas=(train_cfg.adam_b1, train_cfg.adam_b2), eps=train_cfg.adam_eps)
  sched = transformers.get_cosine_schedule_with_warmup(
      opt, math.ceil(train_cfg.warmup_ratio * total_steps), total_steps)
  model.train()

  bf16 = next(model.parameters()).dtype == torch.bfloat16

  def step(batch: dict) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()

  return step


class JaxTrainer:
  """The ease-jax train step compiled for [batch, max_len]; holds the donated state."""

  def __init__(self, directory: str, cfg, total_steps: int, example_batch: dict,
               compute_dtype: str = "float32", steps_per_call: int = 1):
    import jax
    from ease_jax import hf, sharding
    from ease_jax.train import optim, step as step_lib
    model, _ = hf.load_pretrained(directory, dtype="float32", compute_dtype=compute_dtype)
    self.mesh = sharding.make_mesh(cfg.mesh)
    tx = optim.make_optimizer(cfg.train, total_steps)
    graphdef, state = step_lib.init_state(model, tx, cfg.train.seed)
    self.state = jax.device_put(state, step_lib.state_shardings(self.mesh, state))
    # Called as the jitted function, as the training loop calls it: jax's C++ dispatch path.
    # (A `.lower().compile()`d executable dispatches through Python: ~25 ms per call in a
    # profile, though it overlapped the execution and the epochs did not change.)
    schedule = optim.make_schedule(cfg.train, total_steps)
    self.step_fn = step_lib.compile_train_step(graphdef, tx, cfg, self.mesh, self.state, schedule)
    self.steps_per_call = steps_per_call
    # The first call compiles; it is timed as compile + one step and kept out of the epochs.
    self.first_loss, self.compile_s = common.timed(lambda: self.step(example_batch))
    if steps_per_call > 1:  # as train.steps_per_call: several steps per compiled call
      self.calls_fn = step_lib.compile_train_step(graphdef, tx, cfg, self.mesh, self.state,
                                                  schedule, steps_per_call)
      _, seconds = common.timed(lambda: wait(self.dispatch([example_batch] * steps_per_call)))
      self.compile_s += seconds

  def dispatch(self, group: list[dict]) -> dict:
    """Starts one call of one step or of `steps_per_call` steps (metrics stacked); returns
    its (device) metrics without waiting."""
    if len(group) == 1:
      self.state, metrics = self.step_fn(self.state, group[0])
    else:
      from ease_jax.batch import stack
      self.state, metrics = self.calls_fn(self.state, stack(group))
    return metrics

  def step(self, batch: dict) -> float:
    """One step, waited for; returns its loss."""
    return wait(self.dispatch([batch]))


def wait(metrics: dict) -> float:
  """Waits for a call; the loss of its last step."""
  return float(np.asarray(metrics["loss/total"]).reshape(-1)[-1])

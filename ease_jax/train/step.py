"""The pure train and eval steps, and the one place they are jitted with explicit shardings."""

from __future__ import annotations

import functools
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from ease_jax import sharding
from ease_jax.config import Config, LossConfig, TrainConfig
from ease_jax.errors import ConfigError
from ease_jax.train import loss as loss_lib
from ease_jax.train import tail as tail_lib
from ease_jax.train.optim import trainable_mask


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes: the step count, float32 master params, optimizer state, RNG.

  `rng` is carried (and checkpointed) for stochastic layers; the decoder has none yet.
  """
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


def init_state(model: nnx.Module, tx: optax.GradientTransformation,
               seed: int) -> tuple[nnx.GraphDef, TrainState]:
  """Splits `model` into its static graph and a TrainState at step 0."""
  graphdef, params = nnx.split(model, nnx.Param)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(seed))
  return graphdef, state


def _micro_batches(batch: dict, grad_accum: int) -> dict:
  """[B, T] -> [A, B/A, T]; micro-batch i takes rows i, i+A, ..., so it spans every data shard."""
  B = batch["tokens"].shape[0]
  if B % grad_accum:
    raise ConfigError(f"the batch of {B} sequences does not split into train.grad_accum="
                      f"{grad_accum} micro-batches; make train.batch_size a multiple of it")
  return jax.tree.map(lambda x: x.reshape(B // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
                      batch)


def _logits(graphdef: nnx.GraphDef, params: nnx.State, batch: dict) -> jax.Array:
  model = nnx.merge(graphdef, params)
  return model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])


def _accumulate_grads(params, batch, totals, *, graphdef, loss_cfg, grad_accum, mask,
                      tail_buckets, loss_chunk):
  """Sums over micro-batches of the loss numerators and of the exact full-batch gradient shares.
  Params where `mask` is False are frozen: inside the differentiated function, so their
  gradient is zero and XLA spares their weight-gradient products."""

  def micro_loss(p, mb):
    p = jax.tree.map(lambda x, m: x if m else jax.lax.stop_gradient(x), p, mask)
    # Global denominators make each micro-batch's share linear in its tokens, so the
    # summed gradient is the full-batch gradient, not a mean of micro-batch means.
    coef_BxT = loss_lib.token_coefficients(mb, totals, loss_cfg)
    if tail_buckets or loss_chunk:
      share, losses_BxT = tail_lib.supervised_share(graphdef, p, mb, coef_BxT, tail_buckets,
                                                    loss_chunk)
    else:
      losses_BxT = loss_lib.token_losses(_logits(graphdef, p, mb), mb["targets"])
      share = (coef_BxT * losses_BxT).sum()
    return share, loss_lib.numerator_sums(losses_BxT, mb, loss_cfg)

  def body(carry, mb):
    grads, nums = carry
    (_, mb_nums), mb_grads = jax.value_and_grad(micro_loss, has_aux=True)(params, mb)
    return (jax.tree.map(jnp.add, grads, mb_grads), jax.tree.map(jnp.add, nums, mb_nums)), None

  zero_grads = jax.tree.map(jnp.zeros_like, params)
  zero_nums = {k: jnp.zeros((), jnp.float32) for k in loss_lib.NUMERATORS}
  (grads, nums), _ = jax.lax.scan(body, (zero_grads, zero_nums), _micro_batches(batch, grad_accum))
  return grads, nums


def train_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, loss_cfg: LossConfig, grad_accum: int,
               schedule: optax.Schedule, trainable: str = ".*", skip_nonfinite: bool = False,
               tail_buckets: int = TrainConfig.tail_buckets,
               loss_chunk: int = TrainConfig.loss_chunk) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on `batch` ([B, T] fields of ease_jax.batch), in `grad_accum` micro-batches.

  `tail_buckets` > 0 (`train.tail_buckets`, whose default it shares; -1 resolves by backend):
  the model's tail runs only on the positions with loss (ease_jax/train/tail.py).
  `loss_chunk` > 0 (`train.loss_chunk`): the tail and the cross-entropy run in pieces of that
  many positions, so the logits of only one piece exist at a time.

  Metrics: loss/* and tokens/* (see loss.finalize), lr, grad_norm (trainable params,
  before clipping), param_norm, nonfinite (1.0 when the loss or a gradient is NaN/Inf;
  with `skip_nonfinite` such a step leaves params and optimizer state unchanged).
  """
  totals = loss_lib.weight_sums(batch, loss_cfg)
  grads, nums = _accumulate_grads(state.params, batch, totals, graphdef=graphdef,
                                  loss_cfg=loss_cfg, grad_accum=grad_accum,
                                  mask=trainable_mask(state.params, trainable),
                                  tail_buckets=tail_lib.resolve_buckets(tail_buckets),
                                  loss_chunk=loss_chunk)
  loss, metrics = loss_lib.finalize(nums | totals, loss_cfg)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  if skip_nonfinite:  # a select, not a branch: both trees exist already
    new_params, opt_state = jax.tree.map(lambda new, old: jnp.where(nonfinite, old, new),
                                         (new_params, opt_state), (state.params, state.opt_state))
  metrics |= {"lr": schedule(state.step), "grad_norm": grad_norm,
              "param_norm": optax.tree.norm(new_params), "nonfinite": nonfinite.astype(jnp.float32)}
  new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef,
              loss_cfg: LossConfig, loss_chunk: int = 0) -> dict[str, jax.Array]:
  """The loss sums of one eval batch; add them over batches, then `loss.finalize`.
  `loss_chunk` > 0: the logits in pieces of that many positions per row."""
  if loss_chunk:
    losses_BxT = tail_lib.losses_in_pieces(graphdef, state.params, batch, loss_chunk)
    return loss_lib.sums_of_losses(losses_BxT, batch, loss_cfg)
  return loss_lib.loss_sums(_logits(graphdef, state.params, batch), batch, loss_cfg)


def state_shardings(mesh: Mesh, state: TrainState) -> TrainState:
  """NamedShardings for every leaf of `state`: params by the sharding table, optimizer
  moments like the parameter they belong to, counters and the RNG replicated."""
  params = sharding.param_shardings(mesh, state.params)
  shapes = {path: x.shape for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  by_path = {path: s for path, s in jax.tree_util.tree_flatten_with_path(params)[0]}
  replicated = sharding.replicated(mesh)

  def like_param(path, leaf):
    # An optimizer leaf's path ends with the path of its parameter (...mu.layers.0.attn.q_proj).
    for i in range(len(path)):
      if shapes.get(path[i:]) == leaf.shape:
        return by_path[path[i:]]
    return replicated

  opt = jax.tree_util.tree_map_with_path(like_param, state.opt_state)
  return TrainState(step=replicated, params=params, opt_state=opt, rng=replicated)


def _on_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """`fn` traced with `mesh` as the abstract mesh, so the model's activation constraints apply."""

  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return wrapped


def compile_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: Config,
                       mesh: Mesh, state: TrainState, schedule: optax.Schedule,
                       steps: int = 1) -> Callable[[TrainState, dict], tuple]:
  """`train_step` jitted once for `cfg` on `mesh`, with explicit shardings; the state is donated.

  Place the state with `sharding.put(state, state_shardings(mesh, state))` first; the
  batch must be a global array (or host data on one process) split by `batch_sharding`.
  `steps` > 1: one call runs that many optimizer steps in a `lax.scan` over batches
  stacked [steps, B, T] (split by `batch_sharding(mesh, stacked=True)`) and returns the
  metrics stacked [steps]; the same updates as `steps` calls.
  """
  shardings = state_shardings(mesh, state)
  fn = functools.partial(train_step, graphdef=graphdef, tx=tx, loss_cfg=cfg.loss,
                         grad_accum=cfg.train.grad_accum, schedule=schedule,
                         trainable=cfg.train.trainable,
                         skip_nonfinite=cfg.train.skip_nonfinite_steps,
                         tail_buckets=cfg.train.tail_buckets,
                         loss_chunk=cfg.train.loss_chunk)
  if steps > 1:
    fn = functools.partial(jax.lax.scan, fn)
  return jax.jit(_on_mesh(fn, mesh),
                 in_shardings=(shardings, sharding.batch_sharding(mesh, stacked=steps > 1)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def compile_eval_step(graphdef: nnx.GraphDef, cfg: Config, mesh: Mesh,
                      state: TrainState) -> Callable[[TrainState, dict], dict]:
  """`eval_step` jitted once with the same shardings as the train step; nothing donated."""
  fn = functools.partial(eval_step, graphdef=graphdef, loss_cfg=cfg.loss,
                         loss_chunk=cfg.train.loss_chunk)
  return jax.jit(_on_mesh(fn, mesh),
                 in_shardings=(state_shardings(mesh, state), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))

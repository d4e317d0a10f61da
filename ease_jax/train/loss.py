"""The EASE mixed objective as accumulable sums (see docs/design.md, "The mixed objective").

Per token t: cross-entropy l_t, loss weight m_t, objective k(t), span s(t).

  L_k = sum_{t in k} m_t a_s(t) l_t / sum_{t in k} m_t a_s(t)
  L   = sum_{k present} w_k L_k / sum_{k present} w_k          (normalize: objective)
  L   = sum_t w_k(t) m_t a_s(t) l_t / sum_t w_k(t) m_t a_s(t)   (normalize: token)

An objective is present when its denominator is positive. With the default
weights (all 1) `normalize: token` is the plain token-mean SFT loss.

Everything a batch contributes is a *sum* (`loss_sums`), so sums from micro-
batches, devices or eval batches add up before `finalize` divides: sum over
sum, never a mean of means. The denominators depend only on the batch, not on
the parameters (`weight_sums`), which lets the train step turn the loss into a
per-token linear form (`token_coefficients`) whose gradient, accumulated over
micro-batches, is exactly the full-batch gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ease_jax.batch import OBJECTIVES, SPANS
from ease_jax.config import LossConfig

Sums = dict[str, jax.Array]
# The keys of `numerator_sums`: the sums that depend on the logits.
NUMERATORS = ("num/token", "num/gate") + tuple(f"num/{k}" for k in OBJECTIVES)


def _objective_weights(loss_cfg: LossConfig) -> jax.Array:
  w = loss_cfg.objective_weights
  return jnp.asarray([getattr(w, k) for k in OBJECTIVES], jnp.float32)


def _span_weights(loss_cfg: LossConfig) -> jax.Array:
  a = loss_cfg.span_weights
  return jnp.asarray([getattr(a, s) for s in SPANS], jnp.float32)


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Per-token cross-entropy l_t in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), targets_BxT)


def _token_weights(batch: dict, loss_cfg: LossConfig) -> tuple[jax.Array, jax.Array]:
  """(m_t * a_s(t), w_k(t) * m_t * a_s(t)), both [B, T] float32."""
  m_BxT = batch["loss_weight"].astype(jnp.float32)
  ma_BxT = m_BxT * _span_weights(loss_cfg)[batch["span"]]
  return ma_BxT, ma_BxT * _objective_weights(loss_cfg)[batch["objective"]]


def weight_sums(batch: dict, loss_cfg: LossConfig) -> Sums:
  """The denominators and token counts of a batch; they need no logits."""
  ma_BxT, wma_BxT = _token_weights(batch, loss_cfg)
  supervised_BxT = batch["loss_weight"] > 0
  gate_BxT = supervised_BxT & (batch["span"] == SPANS.index("gate"))
  sums = {"den/token": wma_BxT.sum(),
          "den/gate": jnp.where(gate_BxT, batch["loss_weight"], 0.0).sum(),
          "count/supervised": supervised_BxT.sum(dtype=jnp.int32),
          "count/gate": gate_BxT.sum(dtype=jnp.int32)}
  for i, k in enumerate(OBJECTIVES):
    in_k_BxT = batch["objective"] == i
    sums[f"den/{k}"] = jnp.where(in_k_BxT, ma_BxT, 0.0).sum()
    sums[f"count/{k}"] = (in_k_BxT & supervised_BxT).sum(dtype=jnp.int32)
  return {key: sums[key].astype(jnp.int32 if key.startswith("count/") else jnp.float32)
          for key in sorted(sums)}


def numerator_sums(losses_BxT: jax.Array, batch: dict, loss_cfg: LossConfig) -> Sums:
  """The numerators of `loss_sums` from per-token losses."""
  ma_BxT, wma_BxT = _token_weights(batch, loss_cfg)
  # Where a token carries no weight its loss is dropped, so a non-finite logit
  # on padding cannot turn 0 * inf into NaN.
  l_BxT = jnp.where(ma_BxT > 0, losses_BxT, 0.0)
  gate_BxT = (batch["loss_weight"] > 0) & (batch["span"] == SPANS.index("gate"))
  sums = {"num/token": (wma_BxT * l_BxT).sum(),
          "num/gate": jnp.where(gate_BxT, batch["loss_weight"] * losses_BxT, 0.0).sum()}
  for i, k in enumerate(OBJECTIVES):
    sums[f"num/{k}"] = jnp.where(batch["objective"] == i, ma_BxT * l_BxT, 0.0).sum()
  return sums


def loss_sums(logits_BxTxV: jax.Array, batch: dict, loss_cfg: LossConfig) -> Sums:
  """All accumulable sums of a batch: numerators, denominators and token counts.

  Keys: num|den/{reasoning,refusal,direct} (per objective), num|den/token (the
  token mean), num|den/gate (unweighted gate cross-entropy), count/{supervised,
  reasoning,refusal,direct,gate} (int32 supervised-token counts).
  """
  return sums_of_losses(token_losses(logits_BxTxV, batch["targets"]), batch, loss_cfg)


def sums_of_losses(losses_BxT: jax.Array, batch: dict, loss_cfg: LossConfig) -> Sums:
  """`loss_sums` from per-token losses already computed (e.g. in pieces)."""
  return numerator_sums(losses_BxT, batch, loss_cfg) | weight_sums(batch, loss_cfg)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _present_weights(sums: Sums, loss_cfg: LossConfig) -> jax.Array:
  """w_k of the objectives present in `sums`, renormalised to sum to 1 (zeros if none)."""
  w_K = _objective_weights(loss_cfg)
  present_K = jnp.stack([sums[f"den/{k}"] > 0 for k in OBJECTIVES])
  w_K = jnp.where(present_K, w_K, 0.0)
  return _safe_div(w_K, w_K.sum())


def token_coefficients(batch: dict, totals: Sums, loss_cfg: LossConfig) -> jax.Array:
  """c_t such that sum_t c_t l_t over the whole batch is the loss, given its total sums.

  `totals` are the `weight_sums` of the whole (accumulated) batch; on a micro-
  batch, sum_t c_t l_t is that micro-batch's exact share of the full loss.
  """
  ma_BxT, wma_BxT = _token_weights(batch, loss_cfg)
  if loss_cfg.normalize == "token":
    return _safe_div(wma_BxT, totals["den/token"])
  w_K = _present_weights(totals, loss_cfg)
  den_K = jnp.stack([totals[f"den/{k}"] for k in OBJECTIVES])
  scale_K = _safe_div(w_K, den_K)
  return ma_BxT * scale_K[batch["objective"]]


def finalize(sums: Sums, loss_cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Divides accumulated sums: the loss and its metrics.

  Metrics: loss/total, loss/{reasoning,refusal,direct} (each L_k, 0 when the
  objective is absent), loss/gate (mean cross-entropy of the gate token), and
  tokens/{supervised,reasoning,refusal,direct,gate}; a 0 count marks the matching
  loss as absent so the loop can leave it out of the logs.
  """
  per_k = {k: _safe_div(sums[f"num/{k}"], sums[f"den/{k}"]) for k in OBJECTIVES}
  if loss_cfg.normalize == "token":
    total = _safe_div(sums["num/token"], sums["den/token"])
  else:
    total = jnp.dot(_present_weights(sums, loss_cfg), jnp.stack([per_k[k] for k in OBJECTIVES]))
  metrics = {"loss/total": total, "loss/gate": _safe_div(sums["num/gate"], sums["den/gate"])}
  metrics |= {f"loss/{k}": v for k, v in per_k.items()}
  metrics |= {f"tokens/{key.removeprefix('count/')}": v for key, v in sums.items()
              if key.startswith("count/")}
  return total, metrics

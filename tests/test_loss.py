"""The mixed objective against values computed independently with numpy."""

import numpy as np
import pytest

import jax.numpy as jnp

from ease_jax.batch import OBJECTIVES
from ease_jax.config import LossConfig, ObjectiveWeights, SpanWeights
from ease_jax.train import loss as loss_lib

R, F, D = 0, 1, 2  # reasoning, refusal, direct
THINK, ANSWER, GATE = 0, 1, 2


def hand_batch():
  """Two rows, V=4: row 0 a reasoning example, row 1 a refusal then a direct example."""
  logits = np.array([
      [[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0], [1.0, 2.0, 3.0, 4.0],
       [0.0, 0.0, 0.0, 0.0], [-2.0, 1.0, 0.0, 1.0]],
      [[0.0, 0.0, 5.0, 0.0], [1.0, -1.0, 1.0, -1.0], [0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 1.0],
       [0.0, 1.0, 2.0, 0.0], [4.0, 4.0, 0.0, 0.0]],
  ], np.float32)
  batch = {
      "targets": np.array([[1, 0, 2, 3, 1, 0], [2, 3, 1, 0, 2, 0]], np.int32),
      "loss_weight": np.array([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 1, 1]], np.float32),
      "objective": np.array([[R, R, R, R, R, R], [F, F, F, D, D, D]], np.int32),
      "span": np.array([[ANSWER, GATE, THINK, THINK, ANSWER, ANSWER],
                        [ANSWER, GATE, ANSWER, ANSWER, GATE, ANSWER]], np.int32),
  }
  return logits, batch


def numpy_loss(logits, batch, w, a, normalize="objective"):
  """The docs/design.md formula with explicit loops over tokens."""
  num, den = np.zeros(3), np.zeros(3)
  tok_num = tok_den = 0.0
  for b in range(logits.shape[0]):
    for t in range(logits.shape[1]):
      z = logits[b, t].astype(np.float64)
      ce = np.log(np.exp(z).sum()) - z[batch["targets"][b, t]]
      k, s, m = batch["objective"][b, t], batch["span"][b, t], batch["loss_weight"][b, t]
      num[k] += m * a[s] * ce
      den[k] += m * a[s]
      tok_num += w[k] * m * a[s] * ce
      tok_den += w[k] * m * a[s]
  if normalize == "token":
    return tok_num / tok_den, None
  present = den > 0
  per_k = np.where(present, num / np.where(present, den, 1), 0)
  wp = np.where(present, w, 0)
  return (wp * per_k).sum() / wp.sum(), per_k


def cfg(w=(1, 1, 1), a=(1, 1, 1), normalize="objective"):
  return LossConfig(ObjectiveWeights(*w), SpanWeights(*a), normalize)


@pytest.mark.parametrize("w,a", [((1, 1, 1), (1, 1, 1)), ((2.0, 1.0, 0.5), (0.5, 1.0, 3.0))])
def test_objective_loss_equals_hand_value(w, a):
  logits, batch = hand_batch()
  total, metrics = loss_lib.finalize(loss_lib.loss_sums(logits, batch, cfg(w, a)), cfg(w, a))
  want, per_k = numpy_loss(logits, batch, np.array(w), np.array(a))
  np.testing.assert_allclose(total, want, rtol=1e-6)
  np.testing.assert_allclose([metrics[f"loss/{k}"] for k in OBJECTIVES], per_k, rtol=1e-6)
  assert int(metrics["tokens/supervised"]) == 8
  assert [int(metrics[f"tokens/{k}"]) for k in OBJECTIVES] == [4, 2, 2]
  assert int(metrics["tokens/gate"]) == 3


def test_stored_value():
  """A regression value: the default objective-normalised loss of the hand batch.

  Token cross-entropies by hand: reasoning 1.62652, 0.19389, 0.44019, 1.38629 (mean
  0.91172); refusal 2.82008, 0.34075 (1.58041); direct 0.49381, 0.71130 (0.60255);
  L = (0.91172 + 1.58041 + 0.60255) / 3.
  """
  logits, batch = hand_batch()
  total, _ = loss_lib.finalize(loss_lib.loss_sums(logits, batch, cfg()), cfg())
  np.testing.assert_allclose(total, 1.0315639, rtol=1e-6)


def test_weights_change_the_loss_as_expected():
  logits, batch = hand_batch()
  _, base = loss_lib.finalize(loss_lib.loss_sums(logits, batch, cfg()), cfg())
  lr, lf, ld = (float(base[f"loss/{k}"]) for k in OBJECTIVES)
  c = cfg(w=(3, 1, 1))
  total, _ = loss_lib.finalize(loss_lib.loss_sums(logits, batch, c), c)
  np.testing.assert_allclose(total, (3 * lr + lf + ld) / 5, rtol=1e-6)
  # think weight 0: the reasoning loss becomes the mean over its gate and answer tokens.
  c = cfg(a=(0.0, 1.0, 1.0))
  _, m = loss_lib.finalize(loss_lib.loss_sums(logits, batch, c), c)
  ce = np.asarray(loss_lib.token_losses(logits, batch["targets"]))
  np.testing.assert_allclose(m["loss/reasoning"], (ce[0, 1] + ce[0, 4]) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["loss/refusal"], lf, rtol=1e-6)
  # The gate metric is the plain gate cross-entropy whatever the span weights.
  np.testing.assert_allclose(m["loss/gate"], (ce[0, 1] + ce[1, 1] + ce[1, 4]) / 3, rtol=1e-6)


def test_absent_objective_drops_out_and_weights_renormalise():
  logits, batch = hand_batch()
  batch = dict(batch, objective=np.where(batch["objective"] == F, D, batch["objective"]))
  c = cfg(w=(2.0, 5.0, 1.0))
  total, m = loss_lib.finalize(loss_lib.loss_sums(logits, batch, c), c)
  want, per_k = numpy_loss(logits, batch, np.array([2.0, 5.0, 1.0]), np.ones(3))
  np.testing.assert_allclose(total, (2 * per_k[R] + per_k[D]) / 3, rtol=1e-6)
  np.testing.assert_allclose(total, want, rtol=1e-6)
  assert float(m["loss/refusal"]) == 0.0 and int(m["tokens/refusal"]) == 0
  # No supervised tokens at all: a zero loss, not NaN.
  empty = dict(batch, loss_weight=np.zeros_like(batch["loss_weight"]))
  total, m = loss_lib.finalize(loss_lib.loss_sums(logits, empty, c), c)
  assert float(total) == 0.0 and all(np.isfinite(float(v)) for v in m.values())


def test_token_normalisation_is_the_weighted_token_mean():
  logits, batch = hand_batch()
  ce = np.asarray(loss_lib.token_losses(logits, batch["targets"]))
  total, _ = loss_lib.finalize(loss_lib.loss_sums(logits, batch, cfg(normalize="token")),
                               cfg(normalize="token"))
  m = batch["loss_weight"]
  np.testing.assert_allclose(total, (m * ce).sum() / m.sum(), rtol=1e-6)
  w, a = (2.0, 1.0, 0.5), (0.5, 1.0, 3.0)
  c = cfg(w, a, "token")
  total, _ = loss_lib.finalize(loss_lib.loss_sums(logits, batch, c), c)
  np.testing.assert_allclose(total, numpy_loss(logits, batch, np.array(w), np.array(a), "token")[0],
                             rtol=1e-6)


@pytest.mark.parametrize("normalize", ["objective", "token"])
def test_sums_accumulate_and_coefficients_give_the_loss(normalize):
  """Sum over sum across row splits; sum_t c_t l_t per part adds up to the full loss."""
  logits, batch = hand_batch()
  c = cfg((2.0, 1.0, 0.5), (0.5, 1.0, 3.0), normalize)
  full_total, _ = loss_lib.finalize(loss_lib.loss_sums(logits, batch, c), c)
  parts = [({k: v[i:i + 1] for k, v in batch.items()}, logits[i:i + 1]) for i in range(2)]
  sums = [loss_lib.loss_sums(lg, b, c) for b, lg in parts]
  added = {k: sums[0][k] + sums[1][k] for k in sums[0]}
  np.testing.assert_allclose(loss_lib.finalize(added, c)[0], full_total, rtol=1e-6)
  mean_of_means = np.mean([loss_lib.finalize(s, c)[0] for s in sums])
  assert abs(mean_of_means - float(full_total)) > 1e-3  # the batch tells them apart
  totals = loss_lib.weight_sums(batch, c)
  shares = [(loss_lib.token_coefficients(b, totals, c)
             * loss_lib.token_losses(lg, b["targets"])).sum() for b, lg in parts]
  np.testing.assert_allclose(sum(shares), full_total, rtol=1e-6)


def test_padding_with_nonfinite_logits_stays_finite():
  logits, batch = hand_batch()
  logits = logits.copy()
  logits[0, 0] = np.nan  # a padding position (loss weight 0)
  total, m = loss_lib.finalize(loss_lib.loss_sums(jnp.asarray(logits), batch, cfg()), cfg())
  assert np.isfinite(float(total)) and np.isfinite(float(m["loss/gate"]))


def test_token_normalisation_equals_transformers_loss(tmp_path):
  """`normalize: token` is transformers' causal-LM loss with labels -100 off the assistant turn."""
  import torch
  from hf_models import make_hf_model

  from ease_jax.hf import load_pretrained

  hf_model, path = make_hf_model("qwen2", out_dir=str(tmp_path))
  model, _ = load_pretrained(path)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 128, (2, 13))
  assistant = np.zeros((2, 13), bool)
  assistant[0, 5:] = assistant[1, 3:10] = True
  # transformers shifts internally (unshifted labels); our batch is pre-shifted by one.
  labels = np.where(assistant, ids, -100)
  batch = {"tokens": ids[:, :-1], "targets": ids[:, 1:],
           "loss_weight": assistant[:, 1:].astype(np.float32),
           "objective": np.where(np.arange(12) < 8, R, D)[None].repeat(2, 0),
           "span": np.full((2, 12), ANSWER), "positions": np.arange(12)[None].repeat(2, 0),
           "segment_ids": np.ones((2, 12), np.int32)}
  logits = model(jnp.asarray(batch["tokens"]), positions=jnp.asarray(batch["positions"]),
                 segment_ids=jnp.asarray(batch["segment_ids"]))
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss.item()
  c = cfg(normalize="token")
  total, _ = loss_lib.finalize(loss_lib.loss_sums(logits, batch, c), c)
  np.testing.assert_allclose(total, want, rtol=1e-5)
  by_objective, _ = loss_lib.finalize(loss_lib.loss_sums(logits, batch, cfg()), cfg())
  assert abs(float(by_objective) - want) > 1e-4  # the two normalisations differ on this batch

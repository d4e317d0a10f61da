"""The one batch layout shared by the data pipeline, the loss and the train step.

Dimension letters: B batch (sequences), T sequence length.

Every field is aligned with the *target*: row t describes predicting
``targets[t]`` from ``tokens[:t+1]`` (the pipeline shifts each document before
packing, so a shift never crosses a document boundary).

  tokens       int32[B, T]    input token ids
  targets      int32[B, T]    next-token ids (the label of position t)
  segment_ids  int32[B, T]    1..n per packed document; 0 is padding
  positions    int32[B, T]    position inside the document, restarting at 0
  loss_weight  float32[B, T]  m_t: 1 on the assistant turn (incl. end of turn), else 0
  objective    int32[B, T]    index into OBJECTIVES
  span         int32[B, T]    index into SPANS (gate = the first assistant token)

Several steps' batches travel stacked, every field [steps, B, T] (`stack`).
"""

import numpy as np

OBJECTIVES = ("reasoning", "refusal", "direct")
SPANS = ("think", "answer", "gate")
FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_weight", "objective", "span")


def stack(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """The batches of consecutive steps as one, every field [steps, B, T]
  (train.steps_per_call)."""
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

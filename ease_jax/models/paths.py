"""The dotted parameter path ('layers.0.attn.q_proj') that weight tables, optimizer masks and
checkpoints name a parameter by."""

from __future__ import annotations

import jax


def path_str(path: tuple) -> str:
  """An nnx state path (strings and ints) or a pytree key path (DictKey, SequenceKey,
  GetAttrKey) as the dotted parameter path; an nnx.Variable's `.value` step is dropped."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != "value":
        parts.append(k.name)
    else:
      parts.append(str(k))
  return ".".join(parts)

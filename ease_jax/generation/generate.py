"""Batched KV-cache generation: greedy, temperature and top-p (nucleus) sampling.

Prompts are sorted by length and grouped into batches; each batch is left-padded to a
length bucket, prefilled once, then decoded by one `jax.lax.while_loop` over a
preallocated KV cache until every row has produced a stop token or `max_new_tokens`.
A prompt's positions start at 0 at its first real token and padding is masked out, so
its tokens do not depend on what it is batched with. One compilation per (bucket,
batch rows, max_new_tokens, greedy or sampling): new prompt lengths reuse their bucket's.

The cache is one buffer per layer, keys [B,K,H,S] and values [B,K,S,H] (S = bucket +
max_new_tokens - 1 slots), updated in place inside the loop. The traced functions are in
`generation.decode`; this module is the host side: batching, placement, stop tokens, text.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ease_jax import hf, sharding
from ease_jax.errors import UserError
from ease_jax.generation.decode import generate_batch
from ease_jax.hf.save import end_of_sequence_ids
from ease_jax.tokenizer import load_tokenizer
from ease_jax.train import checkpoint

BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens: temperature 0 is greedy; top_p < 1 keeps the nucleus only."""
  max_new_tokens: int = 256
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclass
class Generation:
  """One prompt's continuation.

  `ids` are the new tokens without the stop token; `stopped` says whether a stop token
  ended the row (False: it ran to max_new_tokens). `text` decodes `ids` keeping special
  tokens such as `<think>` visible (pad and end-of-turn tokens removed). `seconds` is the
  wall time of the batch the prompt ran in.
  """
  prompt_ids: list[int]
  ids: list[int]
  stopped: bool
  text: str
  seconds: float
  stop_id: int | None = None

  @property
  def num_prompt_tokens(self) -> int:
    return len(self.prompt_ids)

  @property
  def num_new_tokens(self) -> int:
    """New tokens without the stop token (`ids`)."""
    return len(self.ids)


# ---------------------------------------------------------------- the host side

def _round_rows(n: int, batch_size: int, multiple: int) -> int:
  """Rows of a batch: batch_size, or fewer (a power of two) for a short last batch."""
  rows = min(batch_size, 1 << max(n - 1, 0).bit_length())
  return math.ceil(rows / multiple) * multiple


class Generator:
  """Generates continuations for token prompts or chat conversations, in batches.

  The model's weights are read once, when the Generator is built (placed on `mesh` when
  given: batch rows over (data, fsdp), the cache's kv heads over tensor where they divide).
  `stop_ids` may be changed between calls without recompiling (up to 8 ids).
  """

  def __init__(self, model: nnx.Module, model_cfg: Any, tokenizer: Any = None, *, mesh=None,
               batch_size: int = 8, stop_ids: Sequence[int] | None = None,
               buckets: Sequence[int] = BUCKETS):
    if stop_ids is None:
      if tokenizer is None:
        raise UserError("Generator needs stop_ids when no tokenizer is given")
      stop_ids = end_of_sequence_ids(tokenizer)
    self.model_cfg, self.tokenizer, self.mesh = model_cfg, tokenizer, mesh
    self.stop_ids = [int(i) for i in stop_ids]
    self.buckets = tuple(sorted(buckets))
    pad = getattr(tokenizer, "pad_token_id", None)
    self.pad_id = int(pad if pad is not None else (self.stop_ids[0] if self.stop_ids else 0))
    self.dp = 1
    self.graphdef, state = nnx.split(model)
    if mesh is not None:
      self.dp = sharding.data_parallel(mesh)
      state = sharding.put(state, sharding.param_shardings(mesh, state))
    if batch_size < 1 or batch_size % self.dp:
      raise UserError(f"batch_size ({batch_size}) must be a positive multiple of the mesh's "
                      f"data x fsdp size ({self.dp})")
    self.state, self.batch_size = state, batch_size
    self.num_compilations = 0  # traces of the batch function: one per distinct shape
    # The outputs (a few int32 per row) replicated: every process of a mesh that spans
    # several reads the whole batch's results.
    self._jit = jax.jit(self._traced, static_argnames=("max_new_tokens", "greedy"),
                        out_shardings=None if mesh is None else sharding.replicated(mesh))

  def update_params(self, state: nnx.State) -> None:
    """New parameter values of the same structure (e.g. after training steps): no recompile."""
    self.state = state

  def _traced(self, state, *args, max_new_tokens, greedy):
    self.num_compilations += 1
    return generate_batch(self.graphdef, state, *args, max_new_tokens=max_new_tokens,
                           greedy=greedy, pad_id=self.pad_id)

  def bucket(self, length: int) -> int:
    """The smallest bucket holding `length` tokens."""
    for b in self.buckets:
      if length <= b:
        return b
    raise UserError(f"a prompt of {length} tokens is longer than the largest length bucket "
                    f"({self.buckets[-1]}); shorten it or pass larger buckets")

  def _place(self, *arrays: np.ndarray) -> list[jax.Array]:
    if self.mesh is None:
      return [jnp.asarray(a) for a in arrays]
    # sharding.put: every process holds the whole batch and places its own devices' rows.
    return [sharding.put(a, NamedSharding(self.mesh, P(sharding.RULES["batch"],
                                                       *(None,) * (a.ndim - 1))))
            for a in arrays]

  def _run_batch(self, prompts: list[list[int]], rows_idx: list[int],
                 sampling: SamplingConfig) -> list[Generation]:
    n = len(prompts)
    rows = _round_rows(n, self.batch_size, self.dp)
    T = self.bucket(max(len(p) for p in prompts))
    tokens = np.full((rows, T), self.pad_id, np.int32)
    lengths = np.ones((rows,), np.int32)
    for r, p in enumerate(prompts):
      tokens[r, T - len(p):] = p
      lengths[r] = len(p)
    active = np.arange(rows) < n
    row_ids = np.asarray(rows_idx + [0] * (rows - n), np.int32)
    args = self._place(tokens, lengths, active, row_ids)
    start = time.perf_counter()
    # Padded to a power of two (-1 never matches) so changing stop_ids rarely recompiles.
    stops = np.full((max(8, 1 << max(len(self.stop_ids) - 1, 0).bit_length()),), -1, np.int32)
    stops[:len(self.stop_ids)] = self.stop_ids
    # Host values: replicated on every device of the mesh, whichever process runs them.
    scalars = (stops, np.int32(sampling.seed), np.float32(max(sampling.temperature, 1e-6)),
               np.float32(sampling.top_p))
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      out = self._jit(self.state, *args, *scalars, max_new_tokens=sampling.max_new_tokens,
                      greedy=sampling.greedy)
    out, count, stopped = (np.asarray(x) for x in jax.device_get(out))
    seconds = time.perf_counter() - start
    return [self._result(p, out[r, :count[r]].tolist(), bool(stopped[r]), seconds)
            for r, p in enumerate(prompts)]

  def _result(self, prompt: list[int], ids: list[int], stopped: bool, seconds: float) -> Generation:
    stop_id = ids.pop() if stopped else None
    return Generation(prompt_ids=list(prompt), ids=ids, stopped=stopped, text=self.decode(ids),
                      seconds=seconds, stop_id=stop_id)

  def decode(self, ids: list[int]) -> str:
    """Text of `ids` with special tokens such as `<think>` kept, pad/end-of-turn removed."""
    if self.tokenizer is None:
      return ""
    drop = set(self.stop_ids) | {self.pad_id}
    return self.tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)

  def generate(self, prompts: list[list[int]], sampling: SamplingConfig = SamplingConfig(),
               progress: Callable[[int, int], None] | None = None,
               first_row: int = 0) -> list[Generation]:
    """Continuations of token prompts, in the order given; `progress(done, total)` per batch.

    Prompt i samples with the random stream of row `first_row + i` (and the seed): a long
    list generated in chunks gives the same tokens as in one call."""
    self._check(prompts)
    # Longest first, so each batch holds similar lengths and pads little.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      rows = [first_row + i for i in idx]
      for i, g in zip(idx, self._run_batch([prompts[i] for i in idx], rows, sampling)):
        results[i] = g
      if progress is not None:
        progress(min(start + self.batch_size, len(order)), len(order))
    return results

  def _check(self, prompts: list[list[int]]) -> None:
    vocab = self.model_cfg.vocab_size
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise UserError(f"prompt {i} is empty")
      if min(p) < 0 or max(p) >= vocab:
        raise UserError(f"prompt {i} has token ids outside the model's vocabulary [0, {vocab})")

  def render(self, conversation: list[dict] | str, template: str | None = None) -> list[int]:
    """Token ids of a conversation (or one user turn) with the assistant generation prompt."""
    if self.tokenizer is None:
      raise UserError("rendering chat prompts needs a tokenizer")
    messages = ([{"role": "user", "content": conversation}] if isinstance(conversation, str)
                else [dict(m) for m in conversation])
    if template is not None:
      last = next((m for m in reversed(messages) if m.get("role") == "user"), None)
      if last is None:
        raise UserError("a prompt template needs a user turn to fill in")
      last["content"] = apply_template(template, last["content"])
    from ease_jax.data.render import FIXED_DATE  # the date training renders with
    try:
      text = self.tokenizer.apply_chat_template(
          messages, tokenize=False, add_generation_prompt=True,
          date_string=FIXED_DATE.strftime("%d %b %Y"), strftime_now=FIXED_DATE.strftime)
    except ValueError as e:  # e.g. no chat template
      raise UserError(f"could not render the chat template: {e}") from e
    return self.tokenizer(text, add_special_tokens=False)["input_ids"]

  def generate_chat(self, conversations: Sequence[list[dict] | str],
                    sampling: SamplingConfig = SamplingConfig(), template: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> list[Generation]:
    """Renders each conversation with the tokenizer's chat template, then generates."""
    prompts = [self.render(c, template) for c in conversations]
    return self.generate(prompts, sampling, progress=progress)


def apply_template(template: str, prompt: str) -> str:
  """Fills `{prompt}` (literal replacement: other braces in the template stay as written)."""
  if "{prompt}" not in template:
    raise UserError("the prompt template must contain '{prompt}'")
  return template.replace("{prompt}", prompt)


def load_generation_model(spec: str, **numerics: Any) -> tuple[nnx.Module, Any, Any]:
  """(model, model_cfg, tokenizer) from RUN_DIR[@STEP] (a training run), an HF directory
  or a .gguf file.

  `numerics` override DecoderConfig fields (compute_dtype, param_dtype, ...).
  """
  path = Path(spec)
  if (path / "config.json").is_file() or path.suffix.lower() == ".gguf":
    numerics = dict(numerics)
    dtype = numerics.pop("param_dtype", "float32")
    model, cfg = hf.load_pretrained(path, dtype=dtype, **numerics)
    return model, cfg, load_tokenizer(str(path))
  run_dir, step = checkpoint.parse_ckpt_spec(spec)
  if not (run_dir / "checkpoints").is_dir():
    raise UserError(f"--model {spec}: neither a Hugging Face model directory (no config.json) "
                    f"nor a training run directory (no checkpoints/)")
  model, cfg, _ = checkpoint.load_model(run_dir, step, **numerics)
  tok_dir = run_dir / "tokenizer"
  if not tok_dir.is_dir():
    raise UserError(f"{run_dir}: no tokenizer/ directory next to the checkpoints")
  return model, cfg, load_tokenizer(str(tok_dir))

"""The lm-evaluation-harness model `ease_jax`: this framework's decoder behind lm-eval's LM API.

Requests are tokenized exactly as lm-eval's `hf` backend tokenizes them (the same special
tokens, the same left truncation, the same empty-context prefix), sorted longest first and
batched by lm-eval's own `Collator`, and run as data-parallel rows on a device mesh:
log-likelihoods through `Scorer`, generation through `ease_jax.generation.generate.Generator` (the
KV-cache decoder). Multiple-choice requests that differ only in their last token share one
row, as in the `hf` backend's logits cache.
"""

from __future__ import annotations

import collections
import json
import logging
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
  Collator,
  handle_stop_sequences,
  has_bos_prefix,
  normalize_gen_kwargs,
  postprocess_generated_text,
)
from tqdm import tqdm
from transformers import AutoTokenizer

from ease_jax import hf, sharding
from ease_jax.config import MeshConfig
from ease_jax.data.render import FIXED_DATE
from ease_jax.errors import UserError
from ease_jax.generation.generate import BUCKETS, Generator, SamplingConfig, load_generation_model
from ease_jax.hf.save import end_of_sequence_ids
from ease_jax.lm_eval.scoring import RowScores, Scorer
from ease_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
DTYPES = ("float32", "bfloat16", "float16")
GEN_KWARGS = {"do_sample", "temperature", "top_p", "seed"}  # read from a task's generation_kwargs


def _checkpoint_dtype(path: Path) -> str:
  """`dtype=auto`: the dtype an HF directory's config.json names (float32 if none we run)."""
  if (path / "config.json").is_file():
    hf_cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    named = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype")
    if named in DTYPES:
      return named
  return "float32"


def load_model(pretrained: str, dtype: str, tokenizer: str | None = None):
  """(model, model_cfg, tokenizer) from RUN_DIR[@STEP], an HF directory or a .gguf file."""
  if dtype != "auto" and dtype not in DTYPES:
    raise UserError(f"dtype={dtype!r} is not supported; choose auto, {', '.join(DTYPES)}")
  path = Path(pretrained)
  if dtype == "auto":
    dtype = _checkpoint_dtype(path)
  if pretrained.endswith(".gguf"):
    # GGUF files are read by ease_jax.hf.load_pretrained where that supports them; the
    # tokenizer comes from `tokenizer=` or from the file (transformers reads GGUF vocabularies).
    model, cfg = hf.load_pretrained(path, dtype=dtype, compute_dtype=dtype)
    tok = (load_tokenizer(tokenizer) if tokenizer else
           AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    return model, cfg, tok
  model, cfg, tok = load_generation_model(pretrained, param_dtype=dtype, compute_dtype=dtype)
  return model, cfg, (load_tokenizer(tokenizer) if tokenizer else tok)


def _stop_ids(pretrained: str, tokenizer: Any) -> list[int]:
  """Token ids that end generation: generation_config.json's eos ids (what the `hf` backend
  stops on) when the model directory has one, else the tokenizer's end-of-sequence tokens."""
  gen_config = Path(pretrained) / "generation_config.json"
  ids: list[int] = []
  if gen_config.is_file():
    eos = json.loads(gen_config.read_text(encoding="utf-8")).get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else list(eos or [])
  ids = ids or end_of_sequence_ids(tokenizer)
  if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
    ids.append(tokenizer.eos_token_id)
  return [int(i) for i in ids]


class _Shared:
  """One scored row handed to `Collator.get_cache`, which repeats it for every request that
  shares the row (lm-eval calls `expand` and `chunk` on the logits tensor it is given)."""

  def __init__(self, scores: RowScores):
    self.scores = scores

  def expand(self, *_: int) -> "_Shared":
    return self

  def chunk(self, n: int) -> list["_Shared"]:
    return [self] * n


def _continuation_score(s: RowScores, rep_cont: list[int], cont: list[int]) -> tuple[float, bool]:
  """(log-likelihood, greedy) of `cont`, which shares all but its last token with the row's
  own continuation `rep_cont` (the longest of its group): the last len(cont) positions."""
  L, n = len(rep_cont), len(cont)
  head = slice(L - n, L - 1)
  last = float(s.logp[L - 1]) if cont[-1] == rep_cont[-1] else float(s.last[cont[-1]])
  logp = float(np.sum(s.logp[head], dtype=np.float64)) + last
  greedy = bool(np.all(s.argmax[head] == np.asarray(cont[:-1])) and s.argmax[L - 1] == cont[-1])
  return logp, greedy


@register_model("ease_jax", "ease-jax")
class EaseJaxLM(TemplateLM):
  """lm-eval model backend on ease-jax's decoder (see docs/lm_eval.md for the arguments)."""

  def __init__(self, pretrained: str, dtype: str = "float32", batch_size: int | str = 8,
               max_length: int | None = None, max_gen_toks: int = 256,
               tokenizer: str | None = None, add_bos_token: bool | None = None,
               prefix_token_id: int | None = None, data: int = -1, fsdp: int = 1,
               tensor: int = 1, seed: int = 0, device: str | None = None,
               max_batch_size: int | None = None, **unknown: Any):
    super().__init__()
    if unknown:
      raise UserError(f"ease_jax model_args: unknown argument(s) {', '.join(sorted(unknown))}; "
                      f"see docs/lm_eval.md")
    if str(batch_size).startswith("auto"):
      raise UserError("ease_jax: batch_size=auto is not supported; pass an integer")
    if device is not None:
      log.info("ease_jax ignores device=%s: JAX runs on its default backend", device)
    self.pretrained, self.seed = str(pretrained), int(seed)
    model, self.model_cfg, self.tokenizer = load_model(self.pretrained, str(dtype), tokenizer)
    self.dtype = self.model_cfg.compute_dtype
    self.add_bos_token, self.custom_prefix_token_id = add_bos_token, prefix_token_id
    self._max_length = int(max_length or self.model_cfg.max_position_embeddings)
    self._max_gen_toks, self._batch_size = int(max_gen_toks), int(batch_size)
    self.mesh = sharding.make_mesh(MeshConfig(data=int(data), fsdp=int(fsdp), tensor=int(tensor)))
    buckets = tuple(b for b in BUCKETS if b < self._max_length) + (self._max_length,)
    self.stop_ids = _stop_ids(self.pretrained, self.tokenizer)
    self.generator = Generator(model, self.model_cfg, self.tokenizer, mesh=self.mesh,
                               batch_size=self._batch_size, stop_ids=self.stop_ids,
                               buckets=buckets)
    self.scorer = Scorer(self.generator.graphdef, self.generator.state, self.mesh,
                         pad_id=self.generator.pad_id, max_length=self._max_length,
                         batch_size=self._batch_size)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    """As lm-eval's, except that model_args win over the command line's defaults (lm-eval
    always passes batch_size, which would otherwise clash with model_args' batch_size)."""
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    """The backend from a dict of model_args plus lm-eval's batch_size/device settings."""
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**{**extra, **arg_dict})

  # ------------------------------------------------------------------ what lm-eval reads

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    if self.custom_prefix_token_id is not None:
      return int(self.custom_prefix_token_id)
    if self.tokenizer.bos_token_id is not None:
      return self.tokenizer.bos_token_id
    return self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name_or_path.replace("/", "__")

  def get_model_info(self) -> dict:
    """What lm-eval records about the model in its results."""
    return {"model_num_parameters": self.model_cfg.num_params(), "model_dtype": self.dtype,
            "model_family": self.model_cfg.family, "pretrained": self.pretrained}

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """Token ids as the `hf` backend encodes them (no BOS added to a string that has one)."""
    if add_special_tokens is None:
      add_special_tokens = self.add_bos_token
      if has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
        add_special_tokens = False
    special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    return self.tokenizer.encode(string, **special)

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template, rendered with the date training renders with."""
    kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                  continue_final_message=not add_generation_prompt,
                  date_string=FIXED_DATE.strftime("%d %b %Y"), strftime_now=FIXED_DATE.strftime)
    try:
      return self.tokenizer.apply_chat_template(chat_history, **kwargs)
    except jinja2.exceptions.TemplateError:  # as the hf backend: retry without the system turn
      log.warning("the chat template failed; retrying without the system turn")
      return self.tokenizer.apply_chat_template(
          [m for m in chat_history if m["role"] != "system"], **kwargs)

  # ------------------------------------------------------------------ log-likelihoods

  def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                            **kwargs: Any) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each (strings, context ids, continuation ids) request."""
    group_size = collections.Counter(tuple(ctx + cont[:-1]) for _, ctx, cont in requests)
    re_ord = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                      group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
    res: list[tuple[float, bool]] = []
    pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="ease_jax loglikelihood")
    for chunk in re_ord.get_batched(n=self.batch_size):
      rows = []
      for _, ctx, cont in chunk:
        if not ctx or not cont or len(cont) > self.max_length:
          raise UserError(f"a request has {len(ctx)} context and {len(cont)} continuation "
                          f"tokens; both must be non-empty and the continuation at most "
                          f"max_length ({self.max_length})")
        rows.append(((ctx + cont)[-(self.max_length + 1):][:-1], cont))
      want_last = any(group_size[tuple(ctx + cont[:-1])] > 1 for _, ctx, cont in chunk)
      for (req_str, ctx, cont), scores in zip(chunk, self.scorer.score(rows, want_last)):
        for req_m, cont_m, shared in re_ord.get_cache(req_str=req_str, cxt_toks=ctx,
                                                      cont_toks=cont, logits=_Shared(scores)):
          answer = _continuation_score(shared.scores, cont, cont_m)
          res.append(answer)
          if req_m is not None:
            self.cache_hook.add_partial("loglikelihood", req_m, answer)
          pbar.update(1)
    pbar.close()
    return re_ord.get_original(res)

  def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
    """Whole-document log-likelihoods over rolling windows of max_length (as the hf backend)."""
    windows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, ctx, cont))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # ------------------------------------------------------------------ generation

  def _encode_contexts(self, contexts: list[str], max_ctx: int) -> list[list[int]]:
    """Prompt ids as the hf backend's batch encoding makes them, the last `max_ctx` kept."""
    special: dict = {}
    if has_bos_prefix(contexts[0], getattr(self.tokenizer, "bos_token", None)):
      special = {"add_special_tokens": False}
    elif self.add_bos_token is not None:
      special = {"add_special_tokens": self.add_bos_token}
    return [ids[-max_ctx:] for ids in self.tokenizer(list(contexts), **special)["input_ids"]]

  def _string_stop_ids(self, until: list[str]) -> list[int]:
    """Stop strings that are one token each: generation ends on that token (other stop
    strings cut the text afterwards, the row running on to max_gen_toks)."""
    ids = []
    for s in until:
      enc = self.tokenizer.encode(s, add_special_tokens=False) if s else []
      if len(enc) == 1 and self.tokenizer.decode(enc) == s:
        ids.append(enc[0])
    return ids

  def _sampling(self, kwargs: dict, max_gen_toks: int) -> SamplingConfig:
    ignored = sorted(set(kwargs) - GEN_KWARGS)
    if ignored:
      log.warning("ease_jax ignores generation kwargs %s", ", ".join(ignored))
    temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
    return SamplingConfig(max_new_tokens=max_gen_toks, temperature=temperature,
                          top_p=float(kwargs.get("top_p", 1.0)),
                          seed=int(kwargs.get("seed", self.seed)))

  def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
    """Continuations cut at the first stop string (greedy unless the task asks to sample)."""
    re_ords = Collator([req.args for req in requests],
                       sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                       group_by="gen_kwargs", group_fn=lambda r: r[1])
    eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
    res: list[str] = []
    pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="ease_jax generate_until")
    for chunk in re_ords.get_batched(n=self.batch_size):
      contexts, all_kwargs = zip(*chunk)
      kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      max_gen_toks = int(kwargs.pop("max_gen_toks"))
      if max_gen_toks >= self.max_length:
        raise UserError(f"max_gen_toks ({max_gen_toks}) must be less than max_length "
                        f"({self.max_length})")
      string_stops = self._string_stop_ids(until)
      self.generator.stop_ids = self.stop_ids + [i for i in string_stops if i not in self.stop_ids]
      prompts = self._encode_contexts(list(contexts), self.max_length - max_gen_toks)
      for context, g in zip(contexts, self.generator.generate(
          prompts, self._sampling(kwargs, max_gen_toks))):
        ids = g.ids + ([g.stop_id] if g.stop_id in string_stops else [])
        text = postprocess_generated_text(self.tokenizer.decode(ids, skip_special_tokens=True),
                                          until, None)
        res.append(text)
        self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        pbar.update(1)
    pbar.close()
    return re_ords.get_original(res)

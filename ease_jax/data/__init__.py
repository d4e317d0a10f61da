"""EASE training data: records and adapters, chat rendering with exact masks, the grain pipeline.

  records.py   Record, adapters (star, ease10k, wildjailbreak, prompt_response, messages), readers
  render.py    chat template -> token ids, loss mask, think/answer/gate spans, template checks
  pipeline.py  grain: shard, shuffle, weighted mix, render, first-fit packing, batch, resume
"""

from ease_jax.data.pipeline import Pipeline, Stats
from ease_jax.data.records import Record, load_records
from ease_jax.data.render import Rendered, Renderer

__all__ = ["Pipeline", "Stats", "Record", "load_records", "Rendered", "Renderer"]

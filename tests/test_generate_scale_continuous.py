"""Continuous batching (ease_jax/generation/continuous.py): the same tokens as the fixed-batch
Generator, whatever the slots, prefill size, neighbours or mesh."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from ease_jax.generation import generate as G
from ease_jax.generation.continuous import ContinuousGenerator

SAMPLINGS = [G.SamplingConfig(max_new_tokens=20),
             G.SamplingConfig(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=3)]


@functools.cache
def _model():
  """A two-layer random decoder with spread weights (greedy does not repeat one token)."""
  from ease_jax.models import Decoder, get_preset
  cfg = get_preset("tiny").replace(vocab_size=256, num_layers=2)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  nnx.update(model, jax.tree.map(lambda x: x * 4.0, nnx.state(model, nnx.Param)))
  return model, cfg


def _prompts(n: int = 19, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, int(k)).tolist() for k in rng.integers(2, 60, n)]


@functools.cache
def _stop_ids() -> tuple[int, ...]:
  """Stop ids taken from greedy outputs, so rows end anywhere from step 1 to the limit."""
  model, cfg = _model()
  free = G.Generator(model, cfg, stop_ids=[], batch_size=8, buckets=(64,)).generate(
      _prompts(), G.SamplingConfig(max_new_tokens=20))
  return tuple(sorted({g.ids[k] for g, k in zip(free[::3], (0, 2, 5, 9, 14, 18, 1))}))


def _ids(gens) -> list[tuple]:
  return [(tuple(g.ids), g.stopped, g.stop_id) for g in gens]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled"])
def test_same_tokens_as_the_fixed_batch_generator(sampling):
  model, cfg = _model()
  stops = list(_stop_ids())
  prompts = _prompts()
  want = G.Generator(model, cfg, stop_ids=stops, batch_size=4, buckets=(64,)).generate(
      prompts, sampling)
  lengths = [g.num_new_tokens for g in want]
  assert min(lengths) <= 2 and max(lengths) == 20 and len(set(lengths)) > 4  # a real mix
  for slots, prefill in ((4, 1), (3, 3), (1, 1)):
    gen = ContinuousGenerator(model, cfg, stop_ids=stops, batch_size=slots,
                              prefill_rows=prefill, buckets=(16, 64))
    assert _ids(gen.generate(prompts, sampling)) == _ids(want), (slots, prefill)
  assert gen.num_compilations == 2  # one queue per bucket (16 and 64)


def test_a_row_alone_equals_the_row_among_others():
  model, cfg = _model()
  sampling = SAMPLINGS[1]
  prompts = _prompts(9, seed=4)
  gen = ContinuousGenerator(model, cfg, stop_ids=list(_stop_ids()), batch_size=4, buckets=(64,))
  together = gen.generate(prompts, sampling)
  for i in (0, 5, 8):
    alone = gen.generate([prompts[i]], sampling, first_row=i)
    assert _ids(alone) == _ids([together[i]])
  reordered = gen.generate(prompts[::-1], sampling, first_row=0)
  assert _ids(reordered) != _ids(together[::-1])  # row indices pick the random streams


@pytest.mark.slow
def test_sharded_on_8_devices_matches_one_device(fake_devices):
  out = fake_devices(f"""
    import json
    from ease_jax.generation import generate as G
    from ease_jax import sharding
    from ease_jax.config import MeshConfig
    from ease_jax.generation.continuous import ContinuousGenerator
    from tests.test_generate_scale_continuous import _model, _prompts, SAMPLINGS
    model, cfg = _model()
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    res = {{}}
    for name, m in (("one", None), ("mesh", mesh)):
      gen = ContinuousGenerator(model, cfg, stop_ids={list(_stop_ids())}, batch_size=8,
                                mesh=m, buckets=(64,))
      res[name] = [[g.ids for g in gen.generate(_prompts(), s)] for s in SAMPLINGS]
    print(json.dumps(res))
  """)
  res = json.loads(out.strip().splitlines()[-1])
  assert res["one"] == res["mesh"]


@pytest.mark.bench
def test_roofline_bench_runs_on_cpu():
  """tools/bench/generate.py --roofline (the accelerator command) at the tiny preset."""
  import importlib.util

  from tests.conftest import REPO
  spec = importlib.util.spec_from_file_location("bench_generate", REPO / "tools/bench/generate.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  for decoder in ("fixed", "continuous"):
    res = bench.main(["--roofline", "tiny", "--batch", "4", "--prompt-len", "8", "16",
                      "--new-tokens", "6", "--repeats", "1", "--dtype", "float32",
                      "--decoder", decoder])
    assert res["decoder"] == decoder and res["prefill_tok_s"] > 0
    assert res["prefill_mfu"] is None and res["decode_roofline_fraction"] is None  # CPU: no peaks
    from ease_jax.models import get_preset
    assert res["decode_bytes_per_step"] > get_preset("tiny").num_params() * 4  # weights + KV

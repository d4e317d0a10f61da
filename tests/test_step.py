"""The optimizer and the train step: compile once, accumulation, freezing, decay, sharding."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from xla_env import xla_flags

from ease_jax import batch as batch_lib
from ease_jax import sharding
from ease_jax.config import Config, LossConfig, MeshConfig, ObjectiveWeights, TrainConfig, replace
from ease_jax.errors import ConfigError
from ease_jax.models import Decoder, get_preset
from ease_jax.models.paths import path_str
from ease_jax.train import loss as loss_lib
from ease_jax.train import optim
from ease_jax.train import step as step_lib
from ease_jax.train import tail as tail_lib

VOCAB = 512
REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0, attention: str = "xla") -> Decoder:
  return Decoder(get_preset("tiny").replace(vocab_size=VOCAB, attention=attention),
                 rngs=nnx.Rngs(seed))


def make_batch(seed: int, B: int = 8, T: int = 16) -> dict:
  """Rows of two packed documents each: a prompt (no loss), then a gate token and an answer."""
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros((B, T), np.int32) for k in ("segment_ids", "positions", "objective", "span")}
  batch["loss_weight"] = np.zeros((B, T), np.float32)
  for b in range(B):
    cut = rng.integers(5, T - 4)
    for seg, (lo, hi) in enumerate([(0, cut), (cut, T)], start=1):
      start = lo + rng.integers(1, hi - lo - 1)  # first assistant token
      k = rng.integers(0, 3)
      batch["segment_ids"][b, lo:hi] = seg
      batch["positions"][b, lo:hi] = np.arange(hi - lo)
      batch["objective"][b, lo:hi] = k
      batch["loss_weight"][b, start:hi] = 1.0
      batch["span"][b, lo:hi] = 1  # answer
      batch["span"][b, start] = 2  # gate
      if k == 0:
        batch["span"][b, start + 1:(start + hi) // 2 + 1] = 0  # think
  batch["tokens"] = rng.integers(0, VOCAB, (B, T), dtype=np.int32)
  batch["targets"] = rng.integers(0, VOCAB, (B, T), dtype=np.int32)
  return batch


def train_cfg(**kw) -> TrainConfig:
  base = dict(lr=1e-3, warmup_ratio=0.0, weight_decay=0.1, clip_norm=1.0)
  return TrainConfig(**{**base, **kw})


def jit_step(tx, cfg: Config):
  """The jitted `train_step` for `cfg` on one device (no mesh)."""
  return jax.jit(functools.partial(
      step_lib.train_step, graphdef=nnx.split(tiny_model(), nnx.Param)[0], tx=tx,
      loss_cfg=cfg.loss, grad_accum=cfg.train.grad_accum,
      schedule=optim.make_schedule(cfg.train, 10),
      trainable=cfg.train.trainable, skip_nonfinite=cfg.train.skip_nonfinite_steps,
      tail_buckets=cfg.train.tail_buckets, loss_chunk=cfg.train.loss_chunk))


def run_steps(fn, tx, batches, state=None):
  """Steps `fn` from a fresh model (or `state`); returns the final state and per-step metrics."""
  state = state if state is not None else step_lib.init_state(tiny_model(), tx, 0)[1]
  metrics = []
  for batch in batches:
    state, m = fn(state, batch)
    metrics.append(jax.device_get(m))
  return state, metrics


def leaves(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(p): np.asarray(x) for p, x in flat}


def test_schedule_warmup_then_cosine():
  sched = optim.make_schedule(TrainConfig(lr=2.0, warmup_ratio=0.1, min_lr_ratio=0.1), 100)
  np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(55), sched(100)],
                             [0.0, 1.0, 2.0, 1.1, 0.2], rtol=1e-5)


def test_weight_decay_skips_norms_and_biases():
  _, params = nnx.split(tiny_model(), nnx.Param)
  tx = optim.make_optimizer(train_cfg(lr=1.0, weight_decay=0.1, clip_norm=0.0), 10)
  updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p))(params)
  p, u = leaves(params), leaves(updates)
  no_decay = [k for k in p if "norm" in k or "bias" in k]
  assert len(no_decay) == 2 * 5 + 1  # per layer: 2 norms, 3 biases; the final norm
  for k in p:  # a zero gradient leaves only the decoupled decay: -lr * wd * p
    want = np.zeros_like(p[k]) if k in no_decay else -0.1 * p[k]
    np.testing.assert_allclose(u[k], want, rtol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def partial_training():
  """A step that trains only layer 1's MLP and the final norm, and skips non-finite steps."""
  cfg = replace(Config(), train=train_cfg(trainable=r"layers\.1\.mlp|^norm",
                                          skip_nonfinite_steps=True))
  tx = optim.make_optimizer(cfg.train, 10)
  return jit_step(tx, cfg), tx


def test_trainable_regex_freezes_the_rest(partial_training):
  fn, tx = partial_training
  state, metrics = run_steps(fn, tx, [make_batch(0), make_batch(1)])
  before, after = leaves(nnx.split(tiny_model(), nnx.Param)[1]), leaves(state.params)
  for k in before:
    trained = k.startswith("layers.1.mlp") or k == "norm.weight"
    assert np.array_equal(before[k], after[k]) != trained, k
  # Only trainable parameters carry Adam moments.
  mu = [k for k in leaves(state.opt_state) if ".mu." in k]
  assert len(mu) == 4 and all("layers.1.mlp" in k or "mu.norm" in k for k in mu)
  assert metrics[0]["grad_norm"] > 0 and metrics[1]["nonfinite"] == 0.0
  with pytest.raises(ConfigError, match="matches no parameter"):
    optim.make_optimizer(train_cfg(trainable="no_such_param"), 10).init(state.params)
  with pytest.raises(ConfigError, match="train.trainable"):
    optim.make_optimizer(train_cfg(trainable="("), 10)


def test_frozen_params_get_no_gradient():
  """Frozen inside the differentiated function: exactly zero gradients (so grad_norm covers
  the trainable params only), with the tail on or off."""
  for buckets in (0, 8):
    cfg = replace(Config(), train=train_cfg(trainable=r"layers\.1\.mlp|^norm",
                                            tail_buckets=buckets))
    tx = optax.chain(keep_grads(), optim.make_optimizer(cfg.train, 10))
    state, _ = run_steps(jit_step(tx, cfg), tx, [make_batch(0)])
    for k, g in leaves(state.opt_state[0]).items():
      trained = k.startswith("layers.1.mlp") or k == "norm.weight"
      assert (np.abs(g).max() > 0) == trained, (buckets, k)


def test_nonfinite_step_is_flagged_and_skipped(partial_training):
  fn, tx = partial_training
  _, state = step_lib.init_state(tiny_model(), tx, 0)
  weight = state.params["norm"]["weight"]
  weight[...] = weight[...].at[0].set(jnp.nan)
  before = leaves(state)
  state, metrics = run_steps(fn, tx, [make_batch(0)], state)
  assert metrics[0]["nonfinite"] == 1.0 and int(state.step) == 1
  for k, v in leaves(state).items():  # params and optimizer state untouched
    assert k == "step" or np.array_equal(v, before[k], equal_nan=True), k


def keep_grads() -> optax.GradientTransformation:
  """Passes updates through unchanged and keeps the last gradient as its state."""
  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, state, params=None: (g, g))


def test_grad_accumulation_equals_one_big_batch():
  """Batch 8 in one step equals 4 accumulated micro-batches of 2: gradients, params, metrics."""
  batch = make_batch(3)
  results = {}
  for accum in (1, 4):
    # Adam's first update is lr * g / (|g| + eps): with the default eps, gradients near 1e-8
    # (embedding rows reached only through the tied head) turn float noise into visible
    # update differences; a larger eps keeps the params check at float32 tolerance.
    cfg = replace(Config(), train=train_cfg(grad_accum=accum, adam_eps=1e-3))
    tx = optax.chain(keep_grads(), optim.make_optimizer(cfg.train, 10))
    state, metrics = run_steps(jit_step(tx, cfg), tx, [batch])
    results[accum] = leaves(state.opt_state[0]), leaves(state.params), metrics[0]
  (g1, p1, m1), (g4, p4, m4) = results[1], results[4]
  for k in g1:
    np.testing.assert_allclose(g4[k], g1[k], rtol=1e-4, atol=1e-5 * np.abs(g1[k]).max(), err_msg=k)
    np.testing.assert_allclose(p4[k], p1[k], rtol=1e-6, atol=1e-7, err_msg=k)
  for key in ("loss/total", "loss/reasoning", "loss/refusal", "loss/direct", "loss/gate",
              "grad_norm"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, err_msg=key)
  assert m4["tokens/supervised"] == m1["tokens/supervised"] > 0
  # The micro-batches differ in size, so a mean of their means would not match.
  parts = [{k: v[i::4] for k, v in batch.items()} for i in range(4)]
  assert len({float(p["loss_weight"].sum()) for p in parts}) > 1


def test_bucket_sizes(monkeypatch):
  assert tail_lib.bucket_sizes(1808, 4) == (456, 912, 1368, 1808)
  assert tail_lib.bucket_sizes(1808, 8) == (232, 464, 696, 928, 1160, 1392, 1624, 1808)
  assert tail_lib.bucket_sizes(300, 8) == (128, 256, 300)  # steps of at least MIN_BUCKET
  assert tail_lib.bucket_sizes(16, 1) == (16,)
  monkeypatch.setattr(tail_lib, "MIN_BUCKET", 8)
  assert tail_lib.bucket_sizes(21, 8) == (8, 16, 21)  # multiples of 8, the last one T


def test_tail_buckets_default_resolves_by_backend(monkeypatch):
  """-1 (the default): the tail's sizes on CPU, where they were measured faster; every position
  on GPU/TPU until measured there. An explicit value is kept."""
  assert TrainConfig().tail_buckets == -1
  assert tail_lib.resolve_buckets(-1) == tail_lib.CPU_BUCKETS == 8  # this suite runs on CPU
  assert [tail_lib.resolve_buckets(n) for n in (0, 3)] == [0, 3]
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert tail_lib.resolve_buckets(-1) == 0 and tail_lib.resolve_buckets(8) == 8


@pytest.mark.parametrize("T,accum,trainable", [
    (16, 1, ".*"), pytest.param(21, 2, ".*", marks=pytest.mark.slow),
    pytest.param(16, 1, r"layers\.0|^embed", marks=pytest.mark.slow)])
def test_tail_on_loss_positions_equals_every_position(T, accum, trainable, monkeypatch):
  """train.tail_buckets > 0 (the tail on positions with loss only, its gradient taken in the
  forward) and train.loss_chunk > 0 (the tail in pieces, alone or inside a bucket) give the
  gradients, updates and metrics of the plain path (0, 0), whatever bucket a batch lands in
  and whether or not the pieces divide it: rows without any loss, uneven rows,
  micro-batches, frozen tail params."""
  monkeypatch.setattr(tail_lib, "MIN_BUCKET", 8)  # several sizes even for these tiny rows
  batch = make_batch(4, B=8, T=T)
  batch["loss_weight"][3] = 0.0  # a row without loss
  batch["loss_weight"][5, 2:] = 1.0  # a row almost all loss
  batch["loss_weight"][6, :-1] *= 0.5  # weights other than 1
  results = {}
  variants = [(0, 0), (1, 0), (3, 0), (8, 0), (0, 40), (0, 8), (3, 24)]
  for buckets, chunk in variants:
    cfg = replace(Config(), train=train_cfg(grad_accum=accum, adam_eps=1e-3, trainable=trainable,
                                            tail_buckets=buckets, loss_chunk=chunk),
                  loss=LossConfig(objective_weights=ObjectiveWeights(refusal=2.0)))
    tx = optax.chain(keep_grads(), optim.make_optimizer(cfg.train, 10))
    state, metrics = run_steps(jit_step(tx, cfg), tx, [batch])
    results[buckets, chunk] = leaves(state.opt_state[0]), leaves(state.params), metrics[0]
  g0, p0, m0 = results[0, 0]
  for variant in variants[1:]:
    g, p, m = results[variant]
    for k in g0:
      np.testing.assert_allclose(g[k], g0[k], rtol=1e-4, atol=1e-5 * np.abs(g0[k]).max() + 1e-12,
                                 err_msg=f"{variant} {k}")
      np.testing.assert_allclose(p[k], p0[k], rtol=1e-6, atol=1e-7, err_msg=f"{variant} {k}")
    for key in m0:
      np.testing.assert_allclose(m[key], m0[key], rtol=1e-5, err_msg=f"{variant} {key}")
  # A trainable parameter of the tail gets its gradient through it.
  assert np.abs(g0["norm.weight" if trainable == ".*" else "embed"]).max() > 0


def test_loss_chunk_bounds_the_logits_memory():
  """train.loss_chunk: the compiled step's scratch memory no longer grows with the logits of
  every position (XLA's own memory analysis of the compiled program, not a timing). A wide
  vocabulary against a tiny model, as Qwen2.5's 151,936 against its hidden size."""
  cfg = get_preset("tiny").replace(vocab_size=16384)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  tx = optim.make_optimizer(train_cfg(), 10)
  graphdef, state = step_lib.init_state(model, tx, 0)
  batch = jax.tree.map(jnp.asarray, make_batch(0, B=4, T=256))
  logits_bytes = 4 * 256 * 16384 * 4
  temp = {}
  for chunk in (0, 128):
    fn = jax.jit(functools.partial(
        step_lib.train_step, graphdef=graphdef, tx=tx, loss_cfg=LossConfig(), grad_accum=1,
        schedule=optim.make_schedule(train_cfg(), 10), tail_buckets=0, loss_chunk=chunk))
    temp[chunk] = fn.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
  assert temp[0] > logits_bytes  # the plain step holds every position's float32 logits
  assert temp[128] < temp[0] - logits_bytes / 2, temp


def sharded_losses(mesh_cfg: MeshConfig, steps: int = 5, check_eval: bool = False,
                   per_call: int = 1, attention: str = "xla", loss_chunk: int = 0) -> dict:
  """Per step (loss/total, grad_norm, param_norm) of the compiled step on a mesh; trace count.
  `per_call` > 1: that many steps per call (train.steps_per_call), batches stacked."""
  cfg = replace(Config(), train=train_cfg(grad_accum=2, loss_chunk=loss_chunk))
  devices = jax.devices()[:np.prod([max(v, 1) for v in vars(mesh_cfg).values()])]
  mesh = sharding.make_mesh(mesh_cfg, devices=devices)
  tx = optim.make_optimizer(cfg.train, 10)
  graphdef, state = step_lib.init_state(tiny_model(attention=attention), tx, 0)
  state = sharding.put(state, step_lib.state_shardings(mesh, state))
  with mock.patch.object(step_lib, "train_step", wraps=step_lib.train_step) as traced:
    train = step_lib.compile_train_step(graphdef, tx, cfg, mesh, state,
                                        optim.make_schedule(cfg.train, 10), per_call)
    evaluate = step_lib.compile_eval_step(graphdef, cfg, mesh, state) if check_eval else None
    out = []
    if per_call > 1:
      for first in range(0, steps, per_call):
        group = [make_batch(10 + i, B=16) for i in range(first, first + per_call)]
        state, m = train(state, batch_lib.stack(group))
        out += [[float(m[k][i]) for k in ("loss/total", "grad_norm", "param_norm")]
                for i in range(per_call)]
      return {"metrics": out, "traces": traced.call_count, "step": int(state.step)}
    for i in range(steps):
      batch = make_batch(10 + i, B=16)  # placed as the loop places it (several processes too)
      batch = sharding.put(batch, {k: sharding.batch_sharding(mesh) for k in batch})
      if evaluate is not None:  # the eval sums of the same batch give the step's loss
        total, _ = loss_lib.finalize(evaluate(state, batch), cfg.loss)
      state, m = train(state, batch)
      if evaluate is not None:
        np.testing.assert_allclose(total, m["loss/total"], rtol=1e-5)
      out.append([float(m["loss/total"]), float(m["grad_norm"]), float(m["param_norm"])])
  return {"metrics": out, "traces": traced.call_count, "step": int(state.step)}


@pytest.fixture(scope="module")
def one_device_run():
  return sharded_losses(MeshConfig(fsdp=1), check_eval=True)


def test_compiles_once(one_device_run):
  assert one_device_run["traces"] == 1 and one_device_run["step"] == 5


SHARDED = """
import json, sys
sys.path.insert(0, "tests")
from test_step import sharded_losses
from ease_jax.config import MeshConfig
meshes = {"fsdp4_tensor2": dict(fsdp=4, tensor=2), "data2_fsdp4": dict(data=2, fsdp=4)}
out = {name: sharded_losses(MeshConfig(**m))["metrics"] for name, m in meshes.items()}
# train.steps_per_call=5: the five steps in one call, batches stacked [5, B, T] on the mesh
out["data2_fsdp4_5_per_call"] = sharded_losses(MeshConfig(data=2, fsdp=4), per_call=5)["metrics"]
# train.loss_chunk: the tail in pieces on every batch shard; the eval step in pieces gives the
# same loss as the train step (check_eval)
out["fsdp4_tensor2_loss_chunk"] = sharded_losses(MeshConfig(fsdp=4, tensor=2), loss_chunk=24,
                                                 check_eval=True)["metrics"]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_equals_unsharded(one_device_run, fake_devices):
  want = np.array(one_device_run["metrics"])
  got = json.loads(fake_devices(SHARDED).strip().splitlines()[-1])
  for name, values in got.items():
    np.testing.assert_allclose(np.array(values), want, rtol=2e-5, err_msg=name)
  assert len(set(want[:, 2])) == len(want)  # every step moves the parameters


SPLASH = """
import json, sys
sys.path.insert(0, "tests")
from test_step import sharded_losses
from ease_jax.config import MeshConfig
# tensor 4 splits the 4 query heads, each with a copy of its kv head (tensor 2 splitting
# query and kv heads: test_splash_attention_step_on_two_processes; one device:
# test_model.py's test_accelerator_attention_paths_equal_cpu_path)
meshes = {"data2_tensor4": dict(data=2, tensor=4)}
print(json.dumps({name: sharded_losses(MeshConfig(**m), steps=2, attention="splash")["metrics"]
                  for name, m in meshes.items()}))
"""


@pytest.mark.slow
def test_splash_attention_step_equals_xla_step(one_device_run, fake_devices):
  """`model.attention=splash` (the TPU kernel, here in Pallas' interpret mode): the train step
  (loss, gradient norm, parameter norm) in `shard_map` on a mesh that splits rows and query
  heads = the xla step on one device."""
  want = np.array(one_device_run["metrics"][:2])
  got = json.loads(fake_devices(SPLASH).strip().splitlines()[-1])
  for name, values in got.items():
    np.testing.assert_allclose(np.array(values), want, rtol=2e-5, err_msg=name)


SPLASH_PROCESS = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id={rank})
sys.path.insert(0, "tests")
from test_step import sharded_losses
from ease_jax.config import MeshConfig
out = sharded_losses(MeshConfig(fsdp=2, tensor=2), steps=2, attention="splash")["metrics"]
print(json.dumps({{"processes": jax.process_count(), "metrics": out}}))
"""


@pytest.mark.slow
def test_splash_attention_step_on_two_processes(one_device_run, free_port):
  """The splash step on a mesh that spans two processes (2 fake devices each, gloo
  collectives), as on a multi-host TPU slice = the xla step on one device."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(2),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  procs = [subprocess.Popen([sys.executable, "-c", SPLASH_PROCESS.format(port=free_port, rank=r)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for r in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for _, e in outs)
  want = np.array(one_device_run["metrics"][:2])
  for out, _ in outs:
    got = json.loads(out.strip().splitlines()[-1])
    assert got["processes"] == 2
    np.testing.assert_allclose(np.array(got["metrics"]), want, rtol=2e-5)

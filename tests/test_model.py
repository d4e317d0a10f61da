"""The decoder: packing, sharding, remat and dtype options."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ease_jax.models import Decoder, DecoderConfig, get_preset

CFG = DecoderConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                    num_heads=6, num_kv_heads=2, head_dim=8, qkv_bias=True)


def _tokens(shape, seed=0, vocab=CFG.vocab_size):
  return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


def test_call_contract():
  model = Decoder(CFG, rngs=nnx.Rngs(0))
  logits = model(_tokens((3, 11)))
  assert logits.shape == (3, 11, CFG.vocab_size) and logits.dtype == jnp.float32


def test_packed_documents_equal_separate_runs():
  """Two documents in one row with segment ids and restarting positions = each run alone."""
  model = Decoder(CFG.replace(family="qwen3", qk_norm=True), rngs=nnx.Rngs(1))
  doc_a, doc_b = _tokens((1, 7), seed=1), _tokens((1, 5), seed=2)
  pad = jnp.zeros((1, 4), jnp.int32)
  packed = jnp.concatenate([doc_a, doc_b, pad], axis=1)
  segments = jnp.asarray([[1] * 7 + [2] * 5 + [0] * 4], jnp.int32)
  positions = jnp.asarray([list(range(7)) + list(range(5)) + [0] * 4], jnp.int32)
  out = model(packed, positions=positions, segment_ids=segments)
  np.testing.assert_allclose(out[0, :7], model(doc_a)[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 7:12], model(doc_b)[0], atol=1e-5)
  assert np.all(np.isfinite(np.asarray(out)))  # padding rows attend only to padding


def test_future_tokens_do_not_leak():
  model = Decoder(CFG, rngs=nnx.Rngs(0))
  a = _tokens((1, 10), seed=3)
  b = a.at[0, 6:].set((a[0, 6:] + 1) % CFG.vocab_size)
  np.testing.assert_allclose(model(a)[0, :6], model(b)[0, :6], atol=1e-6)
  assert np.abs(np.asarray(model(a)[0, 6:] - model(b)[0, 6:])).max() > 1e-4


def test_remat_gives_same_values_and_grads():
  tokens = _tokens((2, 9))

  def loss_and_grad(remat):
    model = Decoder(CFG.replace(remat=remat), rngs=nnx.Rngs(0))
    return nnx.value_and_grad(lambda m: jnp.mean(m(tokens) ** 2))(model)

  (l0, g0), (l1, g1) = loss_and_grad(False), loss_and_grad(True)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(nnx.state(g0)), jax.tree.leaves(nnx.state(g1))):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = Decoder(CFG.replace(compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
  ref = Decoder(CFG, rngs=nnx.Rngs(0))
  tokens = _tokens((2, 8))
  out = model(tokens)
  assert model.embed[...].dtype == jnp.float32 and out.dtype == jnp.float32
  assert np.abs(np.asarray(out - ref(tokens))).max() < 0.05  # bf16 rounding, same function


def test_param_count_matches_config_formula():
  for name in ("tiny", "qwen3-0.6b"):
    cfg = get_preset(name)
    state = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)) == cfg.num_params()
  assert abs(get_preset("qwen2.5-0.5b").num_params() - 494_032_768) == 0


def test_bad_head_ratio_is_rejected():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    CFG.replace(num_heads=5, num_kv_heads=2)


@pytest.mark.slow
def test_sharded_forward_equals_single_device(fake_devices):
  """The same forward with parameters sharded over 8 fake CPU devices gives the same logits."""
  out = fake_devices("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from ease_jax import sharding
    from ease_jax.config import MeshConfig
    from ease_jax.models import Decoder, DecoderConfig
    cfg = DecoderConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=8, num_kv_heads=4, head_dim=8)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 96, (8, 16)), jnp.int32)
    ref = np.asarray(Decoder(cfg, rngs=nnx.Rngs(0))(tokens))
    forward = nnx.jit(lambda m, t: m(t))
    for shape in [(1, 8, 1), (1, 4, 2), (2, 2, 2), (1, 1, 8)]:
      mesh = sharding.make_mesh(MeshConfig(*shape))
      model = sharding.shard_model(Decoder(cfg, rngs=nnx.Rngs(0)), mesh)
      assert len(model.layers[0].mlp.up_proj[...].sharding.device_set) == 8
      with jax.set_mesh(mesh):
        out = forward(model, jax.device_put(tokens, sharding.batch_sharding(mesh)))
      print(shape, float(np.abs(np.asarray(out) - ref).max()))
  """)
  diffs = [float(line.split()[-1]) for line in out.strip().splitlines()]
  assert len(diffs) == 4 and max(diffs) <= 1e-5, out


def _packed_rows(B: int, T: int, seed: int) -> tuple[jax.Array, jax.Array]:
  """Segment ids and positions of rows holding several documents, then padding; the last
  row is all padding."""
  rng = np.random.RandomState(seed)
  segments, positions = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
  for b in range(B - 1):
    lo, seg = 0, 1
    while lo < T - 20:
      n = rng.randint(5, T // 2)
      segments[b, lo:lo + n], positions[b, lo:lo + n] = seg, np.arange(min(n, T - lo))
      lo, seg = lo + n, seg + 1
  return jnp.asarray(segments), jnp.asarray(positions)


def _aligned_rows() -> tuple[jax.Array, jax.Array]:
  """Two rows whose documents start near the same places, so whole key tiles are masked for
  later query blocks and get skipped; the second row ends in padding."""
  segments, positions = np.zeros((2, 300), np.int32), np.zeros((2, 300), np.int32)
  for b, cuts in enumerate([(0, 130, 300), (0, 140, 290)]):
    for seg, (lo, hi) in enumerate(zip(cuts, cuts[1:]), start=1):
      segments[b, lo:hi], positions[b, lo:hi] = seg, np.arange(hi - lo)
  return jnp.asarray(segments), jnp.asarray(positions)


@pytest.mark.parametrize("rows,T,block", [("random", 300, 128), ("random", 77, 32),
                                          ("aligned", 300, 64)])
def test_block_causal_attention_equals_dense(rows, T, block):
  """Blockwise attention = jax's dense masked attention on packed rows with padding, with
  T not a multiple of the block and skipped key tiles: outputs and gradients."""
  from ease_jax.models import cpu_kernels, layers
  B, N, K, H = (3 if rows == "random" else 2), 4, 2, 16
  rng = np.random.RandomState(0)
  q, k, v, w = (jnp.asarray(rng.randn(B, T, n, H), jnp.float32) for n in (N, K, K, N))
  mask = layers.decoder_mask(*(_packed_rows(B, T, seed=T) if rows == "random" else _aligned_rows()))
  if rows == "aligned":  # make sure the test covers skipping: block [192, 256) starts at tile 2
    assert int(cpu_kernels._first_tile(mask[:, :, 192:256, :256], block)) == 2

  def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask)

  def blockwise(q, k, v):
    return cpu_kernels.block_causal_attention(q, k, v, mask, block=block)

  np.testing.assert_allclose(jax.jit(blockwise)(q, k, v), jax.jit(dense)(q, k, v), atol=2e-6)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v)
           for f in (blockwise, dense)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_query_block_bounds_the_branch_count():
  """Blocks of 128 up to 8 blocks, then larger multiples of 128 (compile time ~ blocks^2)."""
  from ease_jax.models.cpu_kernels import MAX_QUERY_BLOCKS, query_block
  assert [query_block(T) for T in (77, 904, 1024, 1025, 2048, 4096, 8192)] == [
      128, 128, 128, 256, 256, 512, 1024]
  for T in range(1, 20000, 97):
    block = query_block(T)
    assert block % 128 == 0 and math.ceil(T / block) <= MAX_QUERY_BLOCKS


def test_long_packed_documents_equal_separate_runs():
  """Through several attention blocks (T > 128): each packed document = the document alone."""
  model = Decoder(CFG, rngs=nnx.Rngs(2))
  doc_a, doc_b = _tokens((1, 150), seed=4), _tokens((1, 100), seed=5)
  packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 50), jnp.int32)], axis=1)
  segments = jnp.asarray([[1] * 150 + [2] * 100 + [0] * 50], jnp.int32)
  positions = jnp.asarray([list(range(150)) + list(range(100)) + [0] * 50], jnp.int32)
  out = model(packed, positions=positions, segment_ids=segments)
  np.testing.assert_allclose(out[0, :150], model(doc_a)[0], atol=2e-5)
  np.testing.assert_allclose(out[0, 150:250], model(doc_b)[0], atol=2e-5)
  assert np.all(np.isfinite(np.asarray(out)))


@pytest.fixture(scope="module")
def cpu_path_loss_and_grads():
  """Loss and gradients of the CPU blockwise path on `_aligned_rows` (T=300)."""
  return _aligned_loss_and_grads(CFG)


def _aligned_loss_and_grads(cfg):
  model = Decoder(cfg, rngs=nnx.Rngs(3))
  tokens = _tokens((2, 300), seed=6)
  segments, positions = _aligned_rows()

  def loss(m):
    return jnp.mean(m(tokens, positions=positions, segment_ids=segments) ** 2)

  return nnx.value_and_grad(loss)(model)


@pytest.mark.parametrize("path", ["library", "splash"])
def test_accelerator_attention_paths_equal_cpu_path(path, cpu_path_loss_and_grads, monkeypatch):
  """The GPU/TPU paths give the CPU blockwise path's logits and gradients on packed rows with
  padding: `library`, one dense-masked `dot_product_attention` told the mask is causal (so
  cudnn can skip the upper triangle); `splash`, the TPU splash kernel on segment ids (Pallas
  interpret mode here; T=300 padded to its block)."""
  want, want_g = cpu_path_loss_and_grads
  cfg = CFG
  if path == "library":
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  else:
    cfg = CFG.replace(attention="splash")
  got, got_g = _aligned_loss_and_grads(cfg)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(nnx.state(got_g)), jax.tree.leaves(nnx.state(want_g))):
    np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("narrow", [True, False])
@pytest.mark.parametrize("dtype,out_dtype,tol", [(jnp.float32, None, 1e-5),
                                                 (jnp.bfloat16, jnp.float32, 2e-2),
                                                 (jnp.bfloat16, None, 2e-2)])
def test_linear_equals_einsum_values_and_grads(dtype, out_dtype, tol, narrow, backend,
                                               monkeypatch):
  """`layers.linear` (its custom_vjp, as traced for CPU and for GPU/TPU) = a plain einsum:
  output, dx and dw, incl. bf16."""
  from ease_jax.models import layers
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, 7, 12), dtype)
  w = jnp.asarray(rng.randn(12, 5), dtype)
  c = jnp.asarray(rng.randn(2, 7, 5), jnp.float32)

  def loss(f):
    return lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * c)

  plain = lambda x, w: jnp.einsum("btd,dn->btn", x, w, preferred_element_type=out_dtype)
  mine = lambda x, w: layers.linear(x, w, out_dtype, narrow_transpose=narrow)
  assert mine(x, w).dtype == plain(x, w).dtype
  np.testing.assert_allclose(np.asarray(mine(x, w), np.float32),
                             np.asarray(plain(x, w), np.float32), rtol=tol, atol=tol)
  got, want = (jax.jit(jax.grad(loss(f), argnums=(0, 1)))(x, w) for f in (mine, plain))
  for g, v in zip(got, want):
    assert g.dtype == v.dtype == dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(v, np.float32),
                               rtol=tol, atol=tol * 10)


def test_wide_bfloat16_linear_has_bfloat16_backward_products_on_gpu(monkeypatch):
  """A bf16 product returned in f32 (logits, q/k/v) keeps bf16 operands in its backward
  products on GPU/TPU: autodiff of the einsum multiplied the f32 output gradient by the
  upcast weight, f32 (tf32) GEMMs that took 15% of the 1.5B H200 step."""
  import re
  from ease_jax.models import layers
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  rng = np.random.RandomState(0)
  x, w = (jnp.asarray(rng.randn(*shape), jnp.bfloat16) for shape in ((2, 64, 32), (32, 48)))
  loss = lambda x, w: jnp.sum(jnp.sin(layers.linear(x, w, jnp.float32)))
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert len(dots) == 3, text
  for line in dots:
    operands = re.search(r": \(tensor<[\dx]*(\w+)>, tensor<[\dx]*(\w+)>\)", line).groups()
    assert operands == ("bf16", "bf16"), line


@pytest.mark.parametrize("narrow", [True, False])
def test_bfloat16_linear_multiplies_in_bfloat16_on_cpu(narrow):
  """Forward and both gradients are bf16 x bf16 -> f32 products in the compiled program:
  XLA:CPU rewrote bf16 -> bf16 products (and a bf16 x^T behind a barrier) into converts
  around float32 products, which do not use the CPU's bf16 matmul units."""
  import re
  from ease_jax.models import layers
  if jax.default_backend() != "cpu":
    pytest.skip("checks XLA:CPU's lowering")
  rng = np.random.RandomState(0)
  x, w = (jnp.asarray(rng.randn(*shape), jnp.bfloat16) for shape in ((2, 64, 32), (32, 48)))
  c = jnp.asarray(rng.randn(2, 64, 48), jnp.float32)
  loss = lambda x, w, c: jnp.sum(
      layers.linear(x, w, narrow_transpose=narrow).astype(jnp.float32) * c)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  lines = step.lower(x, w, c).compile().as_text().splitlines()
  types = dict(re.findall(r"%?([\w.\-]+)(?: =|:) (\w+)\[", "\n".join(lines)))
  dots = [line for line in lines if " dot(" in line]
  assert len(dots) == 3, "\n".join(lines)
  for line in dots:
    operands = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", line).groups()
    assert [types[name] for name in operands] == ["bf16", "bf16"], line


@pytest.mark.parametrize("offset", [0, 40])
def test_rope_lookup_equals_computed_rope(offset):
  """The table lookup (XLA:CPU) = the computed cos/sin for packed positions inside the tables
  and, through its fallback, for positions past them (an offset continuation)."""
  from ease_jax.models.rope import rope_cos_sin, rope_inv_freq, rope_lookup
  inv_freq = rope_inv_freq(16, 10000.0, None)
  _, positions = _packed_rows(2, 33, seed=1)
  positions = positions + offset
  got, want = (jax.jit(f)(positions) for f in (
      lambda p: rope_lookup(p, inv_freq), lambda p: rope_cos_sin(p, inv_freq)))
  for g, w in zip(got, want):
    assert g.shape == (2, 33, 16) and g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, atol=2e-6)


def test_rope_is_computed_once_not_inside_every_consumer():
  """No layer's fused code evaluates cos/sin: XLA:CPU fused the rotary angles' cos and sin
  into every consumer (per head, per layer, forward and backward). Only the lookup's
  fallback branch computes them."""
  import re
  if jax.default_backend() != "cpu":
    pytest.skip("checks XLA:CPU's lowering")
  model = Decoder(CFG, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def loss(state, tokens):
    return jnp.mean(nnx.merge(graphdef, state)(tokens) ** 2)

  text = jax.jit(jax.grad(loss)).lower(state, _tokens((2, 40))).compile().as_text()
  computations = re.split(r"\n(?=\S)", text)
  with_cos = [c for c in computations if "cosine(" in c and "ENTRY" not in c.split("\n")[0]]
  assert len(with_cos) <= 1, [c.split("\n")[0] for c in with_cos]

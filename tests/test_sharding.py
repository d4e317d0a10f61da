"""Mesh construction and the logical-axis table."""

import pytest

from ease_jax.config import MeshConfig
from ease_jax.errors import ConfigError
from ease_jax.sharding import mesh_shape


def test_minus_one_takes_the_remaining_devices():
  assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  assert mesh_shape(MeshConfig(), 1) == (1, 1, 1)


@pytest.mark.parametrize("cfg,match", [
    (MeshConfig(data=3, fsdp=-1, tensor=1), "does not divide the 8 devices"),
    (MeshConfig(data=2, fsdp=2, tensor=1), "= 4, but there are 8 devices"),
    (MeshConfig(data=-1, fsdp=-1, tensor=1), "only one mesh axis may be -1"),
])
def test_bad_mesh_names_the_keys(cfg, match):
  with pytest.raises(ConfigError, match=match):
    mesh_shape(cfg, 8)


@pytest.mark.slow
def test_rules_replicate_what_does_not_divide(fake_devices):
  out = fake_devices("""
    from ease_jax import sharding
    from ease_jax.config import MeshConfig
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    print(sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh))
    print(sharding.logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh))
    print(sharding.logical_to_spec(("batch", None), (8, 32), mesh))
  """)
  assert out.split("\n")[:3] == ["P('fsdp', None, None)",
                                  "P('fsdp', 'tensor', None)",
                                  "P('fsdp', None)"]


def test_is_cuda_tells_nvidia_from_rocm_and_tpu():
  from ease_jax.sharding import is_cuda
  assert is_cuda("gpu", "cuda 13000")  # what jax 0.11 reported on an H200
  assert not is_cuda("gpu", "rocm 60300") and not is_cuda("tpu", "PJRT C API")
  assert not is_cuda("cpu", "cpu")

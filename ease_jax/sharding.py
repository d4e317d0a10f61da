"""The device mesh and the one table mapping logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded), `tensor` (heads / MLP / vocab split). The batch is split
over (`data`, `fsdp`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ease_jax.config import MeshConfig
from ease_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes). A dimension the mesh axis does not divide
# is replicated instead (for example 2 KV heads on a 4-way tensor axis).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "embed_act": None,  # the residual stream's hidden axis stays whole
}


def is_cuda(platform: str, platform_version: str) -> bool:
  """Whether devices of this platform and runtime are NVIDIA (CUDA) GPUs; ROCm GPUs are
  platform "gpu" too, told apart by the runtime version ("cuda 13000")."""
  return platform == "gpu" and "cuda" in platform_version.lower()


def attention_runs_on(attention: str, platform: str, platform_version: str) -> bool:
  """Whether `model.attention` runs on devices of this platform: cudnn on NVIDIA GPUs, splash
  on TPUs, xla everywhere."""
  if attention == "cudnn":
    return is_cuda(platform, platform_version)
  if attention == "splash":
    return platform == "tpu"
  return True


def attention_runs_here(attention: str) -> bool:
  """`attention_runs_on` this process's devices."""
  device = jax.devices()[0]
  return attention_runs_on(attention, device.platform, device.client.platform_version)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 and checks that the mesh covers the devices exactly."""
  sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
  auto = [k for k, v in sizes.items() if v == -1]
  if len(auto) > 1:
    raise ConfigError(f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in auto)}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if auto:
    if num_devices % known:
      raise ConfigError(f"mesh.data x mesh.tensor = {known} does not divide the {num_devices} "
                        f"devices; choose sizes whose product divides {num_devices}")
    sizes[auto[0]] = num_devices // known
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ConfigError(f"mesh.data x mesh.fsdp x mesh.tensor = {sizes['data']} x {sizes['fsdp']} x "
                      f"{sizes['tensor']} = {total}, but there are {num_devices} devices; set one "
                      f"axis to -1 to take the remaining devices")
  return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: list | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all (or the given) devices."""
  devices = list(devices if devices is not None else jax.devices())
  # Auto axes: XLA propagates shardings from the parameters and the batch (GSPMD).
  return jax.make_mesh(mesh_shape(cfg, len(devices)), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  """The PartitionSpec for a tensor with logical `axes`, replicating what does not divide."""
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    target = RULES.get(name) if name is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
    if names and dim % math.prod(mesh.shape[n] for n in names) == 0:
      used.update(names)
      spec.append(names[0] if len(names) == 1 else names)
    else:
      spec.append(None)
  return P(*spec)


def _leaf_sharding(mesh: Mesh, x: Any) -> Any:
  if isinstance(x, nnx.Variable):
    axes = x.get_metadata().get("logical_axes")
    spec = logical_to_spec(axes, x.shape, mesh) if axes else P()
    return x.replace(NamedSharding(mesh, spec))
  return NamedSharding(mesh, P()) if hasattr(x, "shape") else None


def param_shardings(mesh: Mesh, tree: Any) -> Any:
  """Shardings for any pytree holding nnx Variables (params, optimizer moments).

  Variables with `logical_axes` metadata follow RULES; other arrays are replicated.
  """
  return jax.tree.map(lambda x: _leaf_sharding(mesh, x), tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
  """Batch rows split over (data, fsdp); the sequence axis is not split. `stacked`: batches
  of several steps [steps, B, T], the steps axis not split."""
  return NamedSharding(mesh, P(None, RULES["batch"], None) if stacked else P(RULES["batch"], None))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated (scalars, RNG keys, step counters)."""
  return NamedSharding(mesh, P())


def put(tree: Any, shardings: Any) -> Any:
  """Places host-identical arrays onto `shardings`; works across processes too, where arrays
  already global (spanning processes, e.g. training's parameters) are resharded on device."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def place(x, s):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, s)  # x itself when already on `s`
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  return jax.tree.map(place, tree, shardings)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Places the model's parameters on the mesh following RULES (in place)."""
  state = nnx.state(model)
  nnx.update(model, put(state, param_shardings(mesh, state)))
  return model


def data_parallel(mesh) -> int:
  """How many ways `mesh` (concrete or abstract) splits the batch axis."""
  return math.prod(mesh.shape[a] for a in RULES["batch"])


def batch_shards() -> int:
  """How many ways the batch axis is split on the mesh in context (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or set(mesh.axis_names) != set(MESH_AXES):
    return 1
  return data_parallel(mesh)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Pins an activation's sharding by logical axes when a mesh is set (`jax.set_mesh`).

  Without a mesh in context (plain single-device use) it returns `x` unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or set(mesh.axis_names) != set(MESH_AXES):
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))

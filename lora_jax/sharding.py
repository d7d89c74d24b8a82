"""The one sharding table: logical axis names -> mesh axes (data, fsdp, tensor).

Params and activations name their dimensions with logical axes ("embed", "mlp", "batch", ...).
`RULES` maps each to mesh axes, EasyLM/MaxText style. A mesh axis that does not divide a
dimension is dropped for that dimension (e.g. 2 KV heads on tensor=4 stay replicated) rather
than failing, so one table serves every model size.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

RULES: dict[str, tuple[str, ...]] = {
  # activations
  "batch": ("data", "fsdp"),
  "seq": (),
  "act_embed": (),
  "act_heads": ("tensor",),
  "act_mlp": ("tensor",),
  "act_vocab": ("tensor",),
  "cache_seq": (),
  # params
  "vocab": ("tensor",),
  "embed": ("fsdp",),
  "q_heads": ("tensor",),
  "kv_heads": ("tensor",),
  "mlp": ("tensor",),
  "layers": (),
  "norm": (),
  "head_dim": (),
  "lora_rank": (),
}


class MeshError(ValueError):
  pass


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """ "fsdp:4,tensor:2" -> {"fsdp": 4, "tensor": 2}: axes of MESH_AXES, each once, sizes >= 1 or
  -1 (the remaining devices, on one axis at most). The one parser of the flag and config form."""
  if not isinstance(spec, str):
    raise MeshError(f"mesh spec {spec!r}: expected a string like 'fsdp:4,tensor:2'")
  shape: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, size = (x.strip() for x in part.partition(":"))
    if name not in MESH_AXES or not re.fullmatch(r"-1|[1-9]\d*", size) or name in shape:
      raise MeshError(
        f"mesh spec {spec!r}: expected axis:size pairs over {'/'.join(MESH_AXES)}, each axis "
        f"once, sizes >= 1 or -1 (the rest), e.g. 'fsdp:4,tensor:2'"
      )
    shape[name] = int(size)
  if not shape or list(shape.values()).count(-1) > 1:
    raise MeshError(f"mesh spec {spec!r}: expected at least one axis and at most one -1")
  return shape


def make_mesh(shape: str | dict[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (GSPMD propagation).

  `shape` is a spec such as "fsdp:4,tensor:2" or a dict such as {"fsdp": 4, "tensor": 2} (missing
  axes are 1, one axis may be -1 to take the remaining devices) or a 3-sequence in MESH_AXES
  order. None puts all devices on fsdp.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if shape is None:
    shape = {"fsdp": -1}
  if isinstance(shape, str):
    shape = parse_mesh_spec(shape)
  if not isinstance(shape, dict):
    shape = dict(zip(MESH_AXES, shape))
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise MeshError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise MeshError(f"mesh shape {shape}: at most one axis may be -1")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if rest <= 0 or n % rest:
      raise MeshError(f"mesh shape {shape} does not divide the {n} devices")
    sizes[sizes.index(-1)] = n // rest
  need = math.prod(sizes)
  if need != n:
    # A mesh on part of one host's devices is handy for debugging; never across hosts.
    if n % need or jax.process_count() > 1:
      raise MeshError(
        f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {need} devices, but there are {n}"
      )
    log.warning("mesh shape %s uses %d of the %d devices", dict(zip(MESH_AXES, sizes)), need, n)
    devices = devices[:need]
  # Sort by process then id so each host's devices are contiguous along the data axes.
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(
    np.array(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
  )


def logical_to_spec(
  axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> P:
  """PartitionSpec for logical `axes`; drops mesh axes that do not divide the dimension."""
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    mesh_axes = RULES[name] if name is not None else ()
    keep = []
    for ax in mesh_axes:
      if ax in used or (mesh is not None and ax not in mesh.shape):
        continue
      size = mesh.shape[ax] if mesh is not None else 1
      prod = math.prod(mesh.shape[a] for a in keep) if mesh is not None else 1
      if shape is not None and shape[i] % (prod * size):
        continue
      if size == 1:
        continue
      keep.append(ax)
    used.update(keep)
    out.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
  return P(*out)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def constrain(x: jax.Array, mesh: Mesh | None, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical axes; a no-op without a mesh."""
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape))

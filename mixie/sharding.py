"""The device mesh and logical sharding rules (maxtext style): shardings are data, not code.

Parameters and activations name their axes logically (`("expert", "layers", "lora_in", "lora_rank")`);
the config's `mesh.rules` map logical names to mesh axes. `logical_to_spec` turns names into a
`PartitionSpec`, `tree_shardings` does it for a whole pytree.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixie.errors import ConfigError

Rules = Sequence[tuple[str, str | None]]


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
  """A mesh of `devices` (default all) with named `axes`; one size may be -1 (the remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axes):
    raise ConfigError(f"mesh.shape {tuple(shape)} and mesh.axes {tuple(axes)} differ in length")
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh.shape {tuple(shape)}: at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ConfigError(f"mesh.shape {tuple(shape)} does not divide the {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ConfigError(f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices, "
                      f"there are {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


def mesh_from_config(c, devices=None) -> Mesh:
  """The mesh of config section `mesh` (fields shape, axes)."""
  return make_mesh(tuple(c.shape), tuple(c.axes), devices)


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None) -> P:
  """PartitionSpec for logical axis `names` under `rules`.

  A logical name maps to the first rule naming it; unknown names and mesh axes of size 1 or absent
  from `mesh` are replicated; a mesh axis is used at most once per spec.
  """
  table = {}
  for logical, physical in rules:
    table.setdefault(logical, physical)
  used, out = set(), []
  for n in names:
    phys = table.get(n) if n is not None else None
    if phys is not None and mesh is not None and (phys not in mesh.shape or mesh.shape[phys] == 1):
      phys = None
    if phys in used:
      phys = None
    if phys is not None:
      used.add(phys)
    out.append(phys)
  return P(*out)


def tree_shardings(axes_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """`NamedSharding`s for a tree whose leaves are tuples of logical axis names."""
  return jax.tree.map(lambda names: NamedSharding(mesh, logical_to_spec(names, rules, mesh)),
                      axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, P())

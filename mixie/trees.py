"""Nested dicts of arrays as safetensors files (no code can run on load): flattened to "a.b.c" names."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
import safetensors.numpy

from mixie.errors import MixieError, check
from mixie.io import PathLike, atomic_write_bytes, path as _path


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dicts of arrays -> {"a.b.c": numpy array}, on the host."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    check("." not in str(k), f"tree key {k!r} contains '.'")
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, name + "."))
    else:
      out[name] = np.asarray(jax.device_get(v))
  return out


def unflatten_tree(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Inverse of `flatten_tree`."""
  out: dict[str, Any] = {}
  for name, v in flat.items():
    node = out
    *parents, leaf = name.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def tree_bytes(tree: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
  """A nested dict of arrays as the bytes of one safetensors file."""
  flat = {k: np.ascontiguousarray(v) for k, v in flatten_tree(tree).items()}
  return safetensors.numpy.save(flat, metadata=dict(metadata or {}) or None)


def save_tree(p: PathLike, tree: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
  """Writes a nested dict of arrays as one safetensors file, atomically."""
  atomic_write_bytes(p, tree_bytes(tree, metadata))


def load_tree(p: PathLike) -> dict[str, Any]:
  """Reads a safetensors file written by `save_tree` (MixieError naming the file when unreadable)."""
  p = _path(p)
  if not p.exists():
    raise MixieError(f"{p}: file not found")
  return tree_from_bytes(p.read_bytes(), p)


def tree_from_bytes(data: bytes, where) -> dict[str, Any]:
  """A tree from the bytes of a safetensors file (MixieError naming `where` when unreadable)."""
  try:
    flat = safetensors.numpy.load(data)
  except Exception as e:  # safetensors raises its own SafetensorError / OSError on corrupt headers
    raise MixieError(f"{where}: corrupt or truncated safetensors file ({e})") from None
  return unflatten_tree(flat)

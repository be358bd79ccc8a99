"""Runs a jitted encoder over many token sequences: length-sorted, bucketed, sharded batches.

Sequences are sorted by length (longest first, as sentence-transformers does) so that a batch holds
similar lengths; each batch is right-padded to the smallest length bucket that fits it and to a fixed
number of rows, so the encoder compiles once per bucket. With a mesh, rows are sharded over its
`data` axis. The host converts batch i to numpy only after batch i + 1 is dispatched, so tokenized
batches keep flowing while the device computes.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def length_buckets(max_len: int) -> tuple[int, ...]:
  """The padded lengths used for sequences of at most `max_len` tokens (`max_len` is the last)."""
  return tuple(b for b in BUCKETS if b < max_len) + (max_len,)


def data_axis_size(mesh: Mesh | None) -> int:
  """Size of the mesh's `data` axis (1 without a mesh or without that axis)."""
  return 1 if mesh is None else int(dict(mesh.shape).get("data", 1))


def batch_sharding(mesh: Mesh | None, ndim: int = 2):
  """Rows over the mesh's `data` axis, the rest replicated (None without a mesh)."""
  if mesh is None:
    return None
  axis = "data" if "data" in mesh.shape else None
  return NamedSharding(mesh, P(axis, *([None] * (ndim - 1))))


def run_batched(fn: Callable[[jax.Array, jax.Array], jax.Array], ids: Sequence[Sequence[int]], *,
                dim: int, max_len: int, batch: int, pad_id: int = 0, mesh: Mesh | None = None,
                desc: str = "embed", progress: bool | None = None) -> np.ndarray:
  """`fn(tokens_bt int32, mask_bt int32) -> out_bd` over every sequence of `ids`, in input order.

  Args:
    fn: a jitted encoder; rows whose mask is all zero are padding and their output is dropped.
    ids: token id lists, each of length 0..max_len (an empty one gets whatever `fn` gives an
      all-padding row: zeros for mean pooling).
    dim: output width d.
    max_len: longest sequence (the last length bucket).
    batch: rows per call (rounded up to a multiple of the mesh's data axis).
    pad_id: token id of padding positions.
    mesh: shards the rows over its `data` axis when given.
    progress: a tqdm bar (None: only for more than 4 batches).

  Returns:
    `[n, dim]` float32.
  """
  n = len(ids)
  out = np.zeros((n, dim), np.float32)
  if n == 0:
    return out
  shards = data_axis_size(mesh)
  b = math.ceil(batch / shards) * shards
  buckets = length_buckets(max_len)
  lens = np.fromiter((len(s) for s in ids), np.int64, n)
  if lens.max() > max_len:
    raise ValueError(f"sequences must have at most {max_len} tokens, got {lens.max()}")
  order = np.argsort(-lens, kind="stable")
  sharding = batch_sharding(mesh)
  n_batches = math.ceil(n / b)
  bar = tqdm(total=n, desc=desc, unit="doc",
             disable=(n_batches <= 4) if progress is None else not progress)
  pending = None  # (row indices, device output) of the previous batch

  def drain(p):
    rows, y = p
    out[rows] = np.asarray(y)[:len(rows)]
    bar.update(len(rows))

  for i in range(n_batches):
    rows = order[i * b:(i + 1) * b]
    t = next(x for x in buckets if x >= lens[rows].max())
    tokens = np.full((b, t), pad_id, np.int32)
    mask = np.zeros((b, t), np.int32)
    for j, r in enumerate(rows):
      tokens[j, :lens[r]] = ids[r]
      mask[j, :lens[r]] = 1
    if sharding is not None:
      tokens, mask = jax.device_put((tokens, mask), sharding)
    y = fn(tokens, mask)
    if pending is not None:
      drain(pending)
    pending = (rows, y)
  drain(pending)
  bar.close()
  return out

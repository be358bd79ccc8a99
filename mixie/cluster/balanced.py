"""Balanced k-means: every cluster capped at `cap` points (`kmeans(..., balanced_max_size=...)`).

After the Lloyd loop (`mixie.cluster.kmeans`), a capacity-constrained greedy assignment (each point
proposes to its nearest cluster that still has room, a cluster keeps its closest proposers) alternates
with centroid updates until nothing moves. The candidates are each point's `min(k, 16)` nearest
centroids (`mixie.cluster.nearest`); a point whose candidates all filled up gets fresh ones among the
clusters with room.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixie.cluster.nearest import distance, layout, nearest_fn, put_rows
from mixie.distributed import to_host
from mixie.errors import MixieError


def capacity_assign(cand_nm: np.ndarray, dist_nm: np.ndarray, cap: int, k: int, refill) -> np.ndarray:
  """Greedy assignment with at most `cap` points per cluster.

  Every unassigned point proposes to its nearest candidate cluster that still has room; a cluster
  accepts its closest proposers up to its remaining room. Points whose candidates are all full get
  fresh candidates among the clusters with room from `refill(points, open_k) -> (cand, dist)`.
  """
  n, m = cand_nm.shape
  cand_nm, dist_nm = cand_nm.copy(), dist_nm.copy()
  assign = np.full(n, -1, np.int64)
  ptr = np.zeros(n, np.int64)
  room = np.full(k, cap, np.int64)
  while True:
    todo = np.flatnonzero(assign < 0)
    if todo.size == 0:
      return assign
    for _ in range(m):  # skip candidates that are full
      full = (ptr[todo] < m) & (room[cand_nm[todo, np.minimum(ptr[todo], m - 1)]] <= 0)
      if not full.any():
        break
      ptr[todo[full]] += 1
    out = todo[ptr[todo] >= m]
    if out.size:
      if not (room > 0).any():
        raise MixieError("balanced k-means: total capacity is below the number of points")
      cand_nm[out], dist_nm[out] = refill(out, room > 0)
      ptr[out] = 0
      continue
    c = cand_nm[todo, ptr[todo]]
    dd = dist_nm[todo, ptr[todo]]
    order = np.lexsort((dd, c))
    c_sorted = c[order]
    first = np.searchsorted(c_sorted, c_sorted, side="left")
    rank = np.arange(order.size) - first
    ok = rank < room[c_sorted]
    assign[todo[order[ok]]] = c_sorted[ok]
    np.subtract.at(room, c_sorted[ok], 1)


@functools.lru_cache(maxsize=32)
def _assigned_stats_fn(mesh: Mesh, metric: str, k: int):
  """Jitted (per-centroid sums, distance of each point to its assigned centroid) for a given assignment."""

  def stats(x_nd, w_n, c_kd, a_n):
    c_nd = c_kd[a_n]
    s = jnp.sum(x_nd * c_nd, -1)
    if metric == "l2":
      s = s - 0.5 * jnp.sum(c_nd * c_nd, -1)
    return jax.ops.segment_sum(x_nd * w_n[:, None], a_n, k), distance(s, x_nd, metric) * w_n

  return jax.jit(stats)


def balanced_refine(x_dev, w_dev, c_kd, *, n, k, cap, metric, chunk, mesh, rounds):
  """Alternates capacity-constrained assignment and centroid updates until nothing moves.

  Returns (centroids, assignment, distance of each point to its centroid)."""
  shards = int(mesh.shape["data"])
  rows, vec = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P("data"))
  m = min(k, 16)
  n_pad = x_dev.shape[0]
  stats = _assigned_stats_fn(mesh, metric, k)
  x_host = []  # filled on first use of refill

  def refill_for(c_kd):
    def refill(points, open_k):
      if not x_host:
        x_host.append(to_host(x_dev)[:n])
      mm = min(m, int(open_k.sum()))
      # pad to a power of two (>= 64 rows per shard) so that few shapes compile
      ch, sub_pad = layout(max(64 * shards, 1 << (len(points) - 1).bit_length()), chunk, shards)
      bias = jnp.asarray(np.where(open_k, 0.0, -np.inf).astype(np.float32))
      idx, dist = nearest_fn(mesh, metric, ch, mm)(put_rows(x_host[0][points], sub_pad, rows), c_kd,
                                                   bias)
      idx, dist = to_host(idx)[:len(points)], to_host(dist)[:len(points)]
      if mm < m:  # repeat the last candidate to keep m columns
        idx = np.concatenate([idx, np.repeat(idx[:, -1:], m - mm, 1)], 1)
        dist = np.concatenate([dist, np.repeat(dist[:, -1:], m - mm, 1)], 1)
      return idx, dist
    return refill

  a_n = None
  for _ in range(rounds):
    idx, dist = nearest_fn(mesh, metric, chunk, m)(x_dev, c_kd, jnp.zeros((k,), jnp.float32))
    new_a = capacity_assign(to_host(idx)[:n], to_host(dist)[:n], cap, k, refill_for(c_kd))
    changed = a_n is None or not np.array_equal(new_a, a_n)
    a_n = new_a
    a_pad = np.zeros(n_pad, np.int32)
    a_pad[:n] = a_n
    a_dev = put_rows(a_pad, n_pad, vec)
    if not changed:
      break
    sums, _ = stats(x_dev, w_dev, c_kd, a_dev)
    counts = np.bincount(a_n, minlength=k).astype(np.float32)
    c_new = to_host(sums) / np.maximum(counts, 1)[:, None]
    if metric == "cosine":
      c_new /= np.maximum(np.linalg.norm(c_new, axis=-1, keepdims=True), 1e-12)
    c_kd = jnp.asarray(np.where(counts[:, None] > 0, c_new, to_host(c_kd)))
  _, dist_n = stats(x_dev, w_dev, c_kd, a_dev)
  return to_host(c_kd), a_n, to_host(dist_n)[:n]

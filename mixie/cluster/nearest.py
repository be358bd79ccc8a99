"""Nearest centroids of sharded points, chunk by chunk: the passes k-means and its balanced mode share.

Points are padded to shards x chunks x chunk rows (zero rows at the end, weight 0 where it matters) and
sharded over the `data` axis of a mesh; each device scans its shard `chunk` points at a time, so memory
is O(chunk * k), never an n x k matrix. Scores are "larger is nearer": `x.c` for cosine (unit vectors),
`x.c - |c|^2 / 2` for squared L2; `distance` turns the best score back into `1 - cos` or `|x - c|^2`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

HIGHEST = jax.lax.Precision.HIGHEST  # f32 distances: cosine gaps between near points are small


def data_mesh(mesh: Mesh | None) -> Mesh:
  """`mesh` checked for a `data` axis; None: this process's first device as a one-device mesh."""
  if mesh is None:
    return Mesh(np.asarray(jax.local_devices()[:1]), ("data",))  # this process's own device
  if "data" not in mesh.shape:
    raise ValueError(f"k-means needs a mesh with a 'data' axis, got axes {mesh.axis_names}")
  return mesh


def layout(n: int, chunk: int, shards: int) -> tuple[int, int]:
  """(chunk actually used, padded number of points)."""
  per = -(-n // shards)
  c = max(8, min(chunk, -(-per // 8) * 8))
  return c, shards * (-(-per // c)) * c


def put_rows(a: np.ndarray, n_pad: int, sharding) -> jax.Array:
  """Host array -> device array of n_pad rows (zero rows appended), sharded, without a padded copy."""
  n = a.shape[0]

  def cb(index):
    sl = index[0]
    start, stop = sl.start or 0, n_pad if sl.stop is None else sl.stop
    part = a[start:min(stop, n)]
    if part.shape[0] < stop - start:
      part = np.concatenate([part, np.zeros((stop - start - part.shape[0],) + a.shape[1:], a.dtype)])
    return part

  return jax.make_array_from_callback((n_pad,) + a.shape[1:], sharding, cb)


def scores(x_cd, c_kd, csq_k, metric):
  """Larger is nearer: `x.c` (cosine) or `x.c - |c|^2 / 2` (l2)."""
  s = jnp.dot(x_cd, c_kd.T, precision=HIGHEST, preferred_element_type=jnp.float32)
  return s if metric == "cosine" else s - 0.5 * csq_k


def distance(best_c, x_cd, metric):
  """Distance (`1 - cos`, or squared L2) of points `x_cd` from their best `scores`."""
  if metric == "cosine":
    return jnp.maximum(1.0 - best_c, 0.0)
  return jnp.maximum(jnp.sum(x_cd * x_cd, -1) - 2.0 * best_c, 0.0)


def _local_nearest(x_nd, c_kd, bias_k, *, metric, chunk, m):
  """Top-m nearest centroids `[n, m]` and their distances (bias -inf excludes a centroid)."""
  k, d = c_kd.shape
  csq_k = jnp.sum(c_kd * c_kd, -1)

  def body(_, x_cd):
    s_ck = scores(x_cd, c_kd, csq_k, metric) + bias_k
    if m == 1:
      best, idx = jnp.max(s_ck, -1, keepdims=True), jnp.argmax(s_ck, -1, keepdims=True)
    else:
      best, idx = jax.lax.top_k(s_ck, m)
    dist = jax.vmap(lambda b: distance(b, x_cd, metric), 1, 1)(best)
    return None, (idx.astype(jnp.int32), dist)

  _, (idx, dist) = jax.lax.scan(body, None, x_nd.reshape(-1, chunk, d))
  return idx.reshape(-1, m), dist.reshape(-1, m)


def nearest_pass(mesh, metric, chunk, m):
  """`_local_nearest` over the points sharded on `data` (centroids and bias replicated)."""
  return jax.shard_map(functools.partial(_local_nearest, metric=metric, chunk=chunk, m=m), mesh=mesh,
                       in_specs=(P("data", None), P(), P()), out_specs=(P("data", None), P("data", None)))


@functools.lru_cache(maxsize=32)
def nearest_fn(mesh: Mesh, metric: str, chunk: int, m: int):
  """Jitted top-m nearest centroids of sharded points."""
  return jax.jit(nearest_pass(mesh, metric, chunk, m))

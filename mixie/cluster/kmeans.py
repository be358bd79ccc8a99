"""K-means in JAX, sharded over the `data` axis of a mesh; scales to k = 5000 and millions of points.

- Distances are computed chunk by chunk (a `lax.scan` over `chunk` points per device): memory is
  O(chunk * k + n + k * d), never an n x k matrix.
- Each device assigns its own shard and sums it into per-centroid partial sums; the sums, counts and
  inertia are all-reduced (`psum` inside `jax.shard_map`). The Lloyd loop is one `lax.while_loop` inside
  one jit: no host round trip per iteration.
- `cosine` is spherical k-means: inputs and centroids are unit vectors, distance `1 - cos`.
  `l2` is the usual squared Euclidean distance. `inertia` sums the distance of every point to its centroid.
- Initialisation: greedy k-means++ (each step keeps the best of `2 + ln k` D^2-sampled candidates, as
  scikit-learn does) when n is small; otherwise k-means|| (Bahmani et al. 2012): 5 rounds that each
  draw `k` points with probability proportional to D^2 (Gumbel top-k, so shapes are static), then greedy
  k-means++ on the weighted candidates. k-means++ would need k passes over all points; k-means|| needs 5.
- Empty clusters are re-seeded with the points farthest from their centroids.
- Balanced mode caps every cluster at `ceil(balanced_max_size * n / k)` points: after the Lloyd loop,
  a capacity-constrained assignment alternates with centroid updates (`mixie.cluster.balanced`).
- `n_init` restarts keep the result with the lowest inertia.
- The mesh may span several processes (`mixie.distributed`): every process passes the same points,
  places only the rows of its own devices, and gets the assignment back all-gathered.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixie.cluster.balanced import balanced_refine
from mixie.cluster.nearest import (HIGHEST, data_mesh, distance, layout, nearest_fn, nearest_pass, put_rows,
                                   scores)
from mixie.distributed import to_host
from mixie.errors import MixieError

METRICS = ("cosine", "l2")
INITS = ("auto", "k-means++", "k-means||")
KMPAR_ROUNDS = 5  # k-means|| sampling rounds


@dataclasses.dataclass
class KMeansResult:
  """The fitted clustering."""

  centroids_kd: np.ndarray  # float32 [k, d]; unit vectors with metric="cosine"
  assign_n: np.ndarray  # int32 [n]: centroid of each point
  inertia: float  # sum over points of the distance to their centroid (1 - cos, or squared L2)
  sizes_k: np.ndarray  # int64 [k]: points per centroid
  n_iter: int  # Lloyd iterations of the kept restart
  metric: str


# ---------------------------------------------------------------------------------------------------
# Per-shard chunked passes (run inside shard_map).


def _accumulate(x_cd, w_c, a_c, k):
  """Per-centroid sums of weighted points: scatter-add on CPU, a one-hot matmul on accelerators."""
  if jax.default_backend() == "cpu":
    return jax.ops.segment_sum(x_cd * w_c[:, None], a_c, k), jax.ops.segment_sum(w_c, a_c, k)
  oh_ck = jax.nn.one_hot(a_c, k, dtype=x_cd.dtype) * w_c[:, None]
  return jnp.dot(oh_ck.T, x_cd, precision=HIGHEST), jnp.sum(oh_ck, 0)


def _local_lloyd_pass(x_nd, w_n, c_kd, *, metric, chunk):
  """Assignment, distance, and all-reduced (sums, counts, inertia) of this shard's points."""
  k, d = c_kd.shape
  csq_k = jnp.sum(c_kd * c_kd, -1)

  def body(carry, xw):
    sums_kd, counts_k, inertia = carry
    x_cd, w_c = xw
    s_ck = scores(x_cd, c_kd, csq_k, metric)
    a_c = jnp.argmax(s_ck, -1).astype(jnp.int32)
    dist_c = distance(jnp.max(s_ck, -1), x_cd, metric)
    ds, dc = _accumulate(x_cd, w_c, a_c, k)
    return (sums_kd + ds, counts_k + dc, inertia + jnp.sum(w_c * dist_c)), (a_c, dist_c)

  init = (jnp.zeros((k, d), jnp.float32), jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32))
  init = jax.lax.pcast(init, ("data",), to="varying")  # per-shard partial sums
  carry, (a, dist) = jax.lax.scan(body, init, (x_nd.reshape(-1, chunk, d), w_n.reshape(-1, chunk)))
  return a.reshape(-1), dist.reshape(-1), jax.lax.psum(carry, "data")


def _lloyd_pass(mesh, metric, chunk):
  return jax.shard_map(functools.partial(_local_lloyd_pass, metric=metric, chunk=chunk), mesh=mesh,
                       in_specs=(P("data", None), P("data"), P()),
                       out_specs=(P("data"), P("data"), P()))


# ---------------------------------------------------------------------------------------------------
# Initialisation.


def _pair_dist(a_jd, b_md, metric):
  """Distances `[j, m]` between two small sets."""
  s = jnp.dot(a_jd, b_md.T, precision=HIGHEST)
  if metric == "cosine":
    return jnp.maximum(1.0 - s, 0.0)
  return jnp.maximum(jnp.sum(a_jd * a_jd, -1)[:, None] - 2 * s + jnp.sum(b_md * b_md, -1)[None], 0.0)


def _greedy_kpp(x_md, w_m, key, k, metric):
  """Greedy weighted k-means++ on a (small, replicated) set: returns `[k, d]` centroids."""
  m = x_md.shape[0]
  trials = 2 + int(math.log(k))
  k0, kl = jax.random.split(key)
  first = jax.random.categorical(k0, jnp.log(w_m))
  closest_m = _pair_dist(x_md[first][None], x_md, metric)[0]
  idx_k = jnp.zeros((k,), jnp.int32).at[0].set(first)

  def step(i, st):
    closest_m, idx_k = st
    cum = jnp.cumsum(w_m * closest_m)
    u = jax.random.uniform(jax.random.fold_in(kl, i), (trials,)) * cum[-1]
    cand_j = jnp.clip(jnp.searchsorted(cum, u), 0, m - 1)
    new_jm = jnp.minimum(closest_m[None], _pair_dist(x_md[cand_j], x_md, metric))
    best = jnp.argmin(jnp.sum(w_m * new_jm, -1))
    return new_jm[best], idx_k.at[i].set(cand_j[best])

  _, idx_k = jax.lax.fori_loop(1, k, step, (closest_m, idx_k))
  return x_md[idx_k]


def _init_kpp(x_nd, key, *, n, k, metric):
  """Greedy k-means++ on all n points (gathered to every device: used only when n is small)."""
  x_md = x_nd[:n]
  return _greedy_kpp(x_md, jnp.ones((n,), jnp.float32), key, k, metric)


def _init_kmpar(x_nd, key, *, n, k, metric, chunk, mesh):
  """k-means||: KMPAR_ROUNDS rounds of k D^2-sampled points, weighted by the points nearest to them,
  then greedy k-means++ on those candidates."""
  n_pad, d = x_nd.shape
  ell = k
  near = nearest_pass(mesh, metric, chunk, 1)
  no_bias = jnp.zeros((ell,), jnp.float32)
  k0, ks, kg = jax.random.split(key, 3)
  first = jax.random.randint(k0, (), 0, n)
  cand = jnp.zeros((1 + KMPAR_ROUNDS * ell, d), x_nd.dtype).at[0].set(x_nd[first])
  _, dmin = near(x_nd, x_nd[first][None], no_bias[:1])
  valid_n = jnp.arange(n_pad) < n

  def one_round(r, st):
    cand, nearest_n, dmin_n = st
    g = jax.random.gumbel(jax.random.fold_in(ks, r), (n,))
    g = jnp.concatenate([g, jnp.zeros((n_pad - n,), g.dtype)])
    logits = jnp.where(valid_n & (dmin_n > 0), jnp.log(jnp.where(dmin_n > 0, dmin_n, 1.0)) + g,
                       -jnp.inf)
    _, pick = jax.lax.top_k(logits, ell)  # ell points drawn without replacement, p ~ D^2
    new_ld = x_nd[pick]
    idx, dist = near(x_nd, new_ld, no_bias)
    better = dist[:, 0] < dmin_n
    nearest_n = jnp.where(better, 1 + r * ell + idx[:, 0], nearest_n)
    dmin_n = jnp.where(better, dist[:, 0], dmin_n)
    return jax.lax.dynamic_update_slice(cand, new_ld, (1 + r * ell, 0)), nearest_n, dmin_n

  cand, nearest_n, _ = jax.lax.fori_loop(0, KMPAR_ROUNDS, one_round,
                                         (cand, jnp.zeros((n_pad,), jnp.int32), dmin[:, 0]))
  weights = jax.ops.segment_sum(valid_n.astype(jnp.float32), nearest_n, cand.shape[0])
  return _greedy_kpp(cand, weights, kg, k, metric)


# ---------------------------------------------------------------------------------------------------
# Lloyd.


def _update(sums_kd, counts_k, c_kd, x_nd, w_n, dist_n, metric):
  """New centroids: the means (normalised for cosine); empty clusters get the farthest points."""
  empty_k = counts_k <= 0
  mean_kd = sums_kd / jnp.maximum(counts_k, 1.0)[:, None]
  if metric == "cosine":
    norm = jnp.linalg.norm(mean_kd, axis=-1, keepdims=True)
    empty_k = empty_k | (norm[:, 0] <= 1e-12)
    mean_kd = mean_kd / jnp.maximum(norm, 1e-12)
  new_kd = jnp.where(empty_k[:, None], c_kd, mean_kd)

  def reseed(new_kd):
    k = new_kd.shape[0]
    m = min(k, x_nd.shape[0])
    _, far = jax.lax.top_k(jnp.where(w_n > 0, dist_n, -jnp.inf), m)
    rank_k = jnp.clip(jnp.cumsum(empty_k) - 1, 0, m - 1)
    return jnp.where(empty_k[:, None], x_nd[far[rank_k]], new_kd)

  return jax.lax.cond(jnp.any(empty_k), reseed, lambda c: c, new_kd)


def _lloyd(x_nd, w_n, c_kd, *, metric, chunk, max_iters, tol, mesh):
  """Lloyd iterations from `c_kd` until no point moves, the relative inertia gain is <= tol, or
  max_iters; then a final assignment pass. Returns (centroids, assign, inertia, counts, iters)."""
  lloyd = _lloyd_pass(mesh, metric, chunk)
  n_pad = x_nd.shape[0]

  def cond(st):
    return (st[3] < max_iters) & ~st[4]

  def body(st):
    c_kd, prev_a, prev_inertia, it, _ = st
    a, dist, (sums, counts, inertia) = lloyd(x_nd, w_n, c_kd)
    moved = jnp.sum((a != prev_a) & (w_n > 0))
    done = (moved == 0) | (prev_inertia - inertia <= tol * inertia)
    return _update(sums, counts, c_kd, x_nd, w_n, dist, metric), a, inertia, it + 1, done

  st = (c_kd, jnp.full((n_pad,), -1, jnp.int32), jnp.asarray(jnp.inf, jnp.float32),
        jnp.asarray(0, jnp.int32), jnp.asarray(False))
  c_kd, _, _, iters, _ = jax.lax.while_loop(cond, body, st)
  a, _, (_, counts, inertia) = lloyd(x_nd, w_n, c_kd)
  return c_kd, a, inertia, counts, iters


@functools.lru_cache(maxsize=64)
def _fit_fns(mesh: Mesh, n: int, k: int, metric: str, chunk: int, init: str, max_iters: int,
             tol: float):
  """Jitted (prepare, init, lloyd) for one problem shape."""
  rows = NamedSharding(mesh, P("data", None))
  vec = NamedSharding(mesh, P("data"))
  rep = NamedSharding(mesh, P())

  def prepare(x_nd):
    if metric == "cosine":
      x_nd = x_nd / jnp.maximum(jnp.linalg.norm(x_nd, axis=-1, keepdims=True), 1e-12)
    w_n = (jnp.arange(x_nd.shape[0]) < n).astype(jnp.float32)
    return x_nd, w_n

  if init == "k-means++":
    init_fn = functools.partial(_init_kpp, n=n, k=k, metric=metric)
  else:
    init_fn = functools.partial(_init_kmpar, n=n, k=k, metric=metric, chunk=chunk, mesh=mesh)
  lloyd = functools.partial(_lloyd, metric=metric, chunk=chunk, max_iters=max_iters, tol=tol,
                            mesh=mesh)
  return (jax.jit(prepare, out_shardings=(rows, vec)),
          jax.jit(init_fn, out_shardings=rep),
          jax.jit(lloyd, out_shardings=(rep, vec, rep, rep, rep)))


# ---------------------------------------------------------------------------------------------------
# Public API.


def kmeans(x_nd: np.ndarray, k: int, *, metric: str = "cosine", n_init: int = 1, max_iters: int = 100,
           tol: float = 1e-4, balanced_max_size: float = 0.0, chunk: int = 8192, seed: int = 0,
           init: str | np.ndarray = "auto", mesh: Mesh | None = None) -> KMeansResult:
  """Clusters the rows of `x_nd` into `k` clusters.

  Args:
    x_nd: `[n, d]` points (normalised here for cosine).
    k: clusters, 1 <= k <= n.
    metric: "cosine" (spherical k-means) or "l2".
    n_init: restarts; the lowest inertia is kept.
    max_iters: Lloyd iterations per restart.
    tol: stop when the relative inertia gain of an iteration is <= tol (or no point moved).
    balanced_max_size: 0 = off; else cap clusters at ceil(balanced_max_size * n / k) points (>= 1).
    chunk: points per distance chunk per device.
    seed: random seed.
    init: "auto" (k-means|| when n > 5k + 1, else k-means++), "k-means++", "k-means||", or the
      initial centroids `[k, d]` (then one run, n_init is ignored).
    mesh: shards the points over its `data` axis (default: one device).
  """
  x_nd = np.asarray(x_nd, np.float32)
  if x_nd.ndim != 2 or x_nd.shape[0] == 0:
    raise MixieError(f"k-means: need a non-empty [n, d] array of points, got shape {x_nd.shape}")
  n, d = x_nd.shape
  if not 1 <= k <= n:
    raise MixieError(f"k-means: k={k} must be between 1 and the number of points ({n})")
  if metric not in METRICS:
    raise MixieError(f"k-means: unknown metric {metric!r} (choose from {METRICS})")
  init_kd = None
  if not isinstance(init, str):
    init_kd = np.asarray(init, np.float32)
    if init_kd.shape != (k, d):
      raise MixieError(f"k-means: initial centroids have shape {init_kd.shape}, expected {(k, d)}")
    if metric == "cosine":
      init_kd = init_kd / np.maximum(np.linalg.norm(init_kd, axis=-1, keepdims=True), 1e-12)
    init, n_init = "k-means++", 1
  elif init not in INITS:
    raise MixieError(f"k-means: unknown init {init!r} (choose from {INITS})")
  if balanced_max_size and balanced_max_size < 1.0:
    raise MixieError(f"k-means: balanced_max_size must be 0 (off) or >= 1, got {balanced_max_size}")
  if not np.isfinite(x_nd).all():
    raise MixieError("k-means: the points contain NaN or infinite values")
  if init == "auto":
    init = "k-means||" if n > 1 + KMPAR_ROUNDS * k else "k-means++"
  if init == "k-means||" and n <= 1 + KMPAR_ROUNDS * k:
    init = "k-means++"  # too few points to over-sample
  mesh = data_mesh(mesh)
  chunk, n_pad = layout(n, chunk, int(mesh.shape["data"]))
  prepare, init_fn, lloyd = _fit_fns(mesh, n, k, metric, chunk, init, max_iters, float(tol))
  x_dev, w_dev = prepare(put_rows(x_nd, n_pad, NamedSharding(mesh, P("data", None))))

  best = None
  for key in jax.random.split(jax.random.key(seed), n_init):
    c0 = init_fn(x_dev, key) if init_kd is None else jnp.asarray(init_kd)
    c, a, inertia, counts, iters = lloyd(x_dev, w_dev, c0)
    inertia = float(inertia)
    if best is None or inertia < best[2]:
      best = (c, a, inertia, counts, int(iters))
  c, a, inertia, counts, iters = best

  if balanced_max_size:
    cap = math.ceil(balanced_max_size * n / k)
    c, a, dist = balanced_refine(x_dev, w_dev, c, n=n, k=k, cap=cap, metric=metric, chunk=chunk,
                                  mesh=mesh, rounds=max(1, min(max_iters, 10)))
    inertia = float(np.sum(dist, dtype=np.float64))
    sizes = np.bincount(a, minlength=k)
  else:
    a = to_host(a)[:n]
    sizes = np.rint(to_host(counts)).astype(np.int64)
  return KMeansResult(centroids_kd=to_host(c).astype(np.float32), assign_n=a.astype(np.int32),
                      inertia=inertia, sizes_k=sizes, n_iter=iters, metric=metric)



def assign(x_nd: np.ndarray, centroids_kd: np.ndarray, metric: str = "cosine", chunk: int = 8192,
           mesh: Mesh | None = None, return_dist: bool = False):
  """Nearest centroid of each row of `x_nd` (int32 `[n]`; with `return_dist`, also the distances)."""
  x_nd = np.asarray(x_nd, np.float32)
  c = np.asarray(centroids_kd, np.float32)
  if metric not in METRICS:
    raise MixieError(f"assign: unknown metric {metric!r} (choose from {METRICS})")
  if x_nd.ndim != 2 or c.ndim != 2 or x_nd.shape[1] != c.shape[1]:
    raise MixieError(f"assign: points {x_nd.shape} and centroids {c.shape} do not match")
  n = x_nd.shape[0]
  if n == 0:
    a, dd = np.zeros((0,), np.int32), np.zeros((0,), np.float32)
    return (a, dd) if return_dist else a
  mesh = data_mesh(mesh)
  chunk, n_pad = layout(n, chunk, int(mesh.shape["data"]))
  if metric == "cosine":
    x_nd = x_nd / np.maximum(np.linalg.norm(x_nd, axis=-1, keepdims=True), 1e-12)
    c = c / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
  x_dev = put_rows(x_nd, n_pad, NamedSharding(mesh, P("data", None)))
  idx, dist = nearest_fn(mesh, metric, chunk, 1)(x_dev, jnp.asarray(c),
                                                  jnp.zeros((c.shape[0],), jnp.float32))
  a, dd = to_host(idx)[:n, 0], to_host(dist)[:n, 0]
  return (a, dd) if return_dist else a

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
  a capacity-constrained greedy assignment (each point proposes to its nearest cluster that still has
  room, a cluster keeps its closest proposers) alternates with centroid updates until nothing moves.
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

from mixie.distributed import to_host
from mixie.errors import MixieError

METRICS = ("cosine", "l2")
INITS = ("auto", "k-means++", "k-means||")
KMPAR_ROUNDS = 5  # k-means|| sampling rounds
_HI = jax.lax.Precision.HIGHEST


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
# Layout: points padded to shards x chunks x chunk, padding at the end with weight 0.


def _mesh(mesh: Mesh | None) -> Mesh:
  if mesh is None:
    return Mesh(np.asarray(jax.local_devices()[:1]), ("data",))  # this process's own device
  if "data" not in mesh.shape:
    raise ValueError(f"k-means needs a mesh with a 'data' axis, got axes {mesh.axis_names}")
  return mesh


def _layout(n: int, chunk: int, shards: int) -> tuple[int, int]:
  """(chunk actually used, padded number of points)."""
  per = -(-n // shards)
  c = max(8, min(chunk, -(-per // 8) * 8))
  return c, shards * (-(-per // c)) * c


def _put_rows(a: np.ndarray, n_pad: int, sharding) -> jax.Array:
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


# ---------------------------------------------------------------------------------------------------
# Per-shard chunked passes (run inside shard_map).


def _scores(x_cd, c_kd, csq_k, metric):
  """Larger is nearer: `x.c` (cosine) or `x.c - |c|^2 / 2` (l2)."""
  s = jnp.dot(x_cd, c_kd.T, precision=_HI, preferred_element_type=jnp.float32)
  return s if metric == "cosine" else s - 0.5 * csq_k


def _dist(best_c, x_cd, metric):
  """Distance from the best score."""
  if metric == "cosine":
    return jnp.maximum(1.0 - best_c, 0.0)
  return jnp.maximum(jnp.sum(x_cd * x_cd, -1) - 2.0 * best_c, 0.0)


def _accumulate(x_cd, w_c, a_c, k):
  """Per-centroid sums of weighted points: scatter-add on CPU, a one-hot matmul on accelerators."""
  if jax.default_backend() == "cpu":
    return jax.ops.segment_sum(x_cd * w_c[:, None], a_c, k), jax.ops.segment_sum(w_c, a_c, k)
  oh_ck = jax.nn.one_hot(a_c, k, dtype=x_cd.dtype) * w_c[:, None]
  return jnp.dot(oh_ck.T, x_cd, precision=_HI), jnp.sum(oh_ck, 0)


def _local_lloyd_pass(x_nd, w_n, c_kd, *, metric, chunk):
  """Assignment, distance, and all-reduced (sums, counts, inertia) of this shard's points."""
  k, d = c_kd.shape
  csq_k = jnp.sum(c_kd * c_kd, -1)

  def body(carry, xw):
    sums_kd, counts_k, inertia = carry
    x_cd, w_c = xw
    s_ck = _scores(x_cd, c_kd, csq_k, metric)
    a_c = jnp.argmax(s_ck, -1).astype(jnp.int32)
    dist_c = _dist(jnp.max(s_ck, -1), x_cd, metric)
    ds, dc = _accumulate(x_cd, w_c, a_c, k)
    return (sums_kd + ds, counts_k + dc, inertia + jnp.sum(w_c * dist_c)), (a_c, dist_c)

  init = (jnp.zeros((k, d), jnp.float32), jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32))
  init = jax.lax.pcast(init, ("data",), to="varying")  # per-shard partial sums
  carry, (a, dist) = jax.lax.scan(body, init, (x_nd.reshape(-1, chunk, d), w_n.reshape(-1, chunk)))
  return a.reshape(-1), dist.reshape(-1), jax.lax.psum(carry, "data")


def _local_nearest(x_nd, c_kd, bias_k, *, metric, chunk, m):
  """Top-m nearest centroids `[n, m]` and their distances (bias -inf excludes a centroid)."""
  k, d = c_kd.shape
  csq_k = jnp.sum(c_kd * c_kd, -1)

  def body(_, x_cd):
    s_ck = _scores(x_cd, c_kd, csq_k, metric) + bias_k
    if m == 1:
      best, idx = jnp.max(s_ck, -1, keepdims=True), jnp.argmax(s_ck, -1, keepdims=True)
    else:
      best, idx = jax.lax.top_k(s_ck, m)
    dist = jax.vmap(lambda b: _dist(b, x_cd, metric), 1, 1)(best)
    return None, (idx.astype(jnp.int32), dist)

  _, (idx, dist) = jax.lax.scan(body, None, x_nd.reshape(-1, chunk, d))
  return idx.reshape(-1, m), dist.reshape(-1, m)


def _lloyd_pass(mesh, metric, chunk):
  return jax.shard_map(functools.partial(_local_lloyd_pass, metric=metric, chunk=chunk), mesh=mesh,
                       in_specs=(P("data", None), P("data"), P()),
                       out_specs=(P("data"), P("data"), P()))


def _nearest_pass(mesh, metric, chunk, m):
  return jax.shard_map(functools.partial(_local_nearest, metric=metric, chunk=chunk, m=m), mesh=mesh,
                       in_specs=(P("data", None), P(), P()), out_specs=(P("data", None), P("data", None)))


# ---------------------------------------------------------------------------------------------------
# Initialisation.


def _pair_dist(a_jd, b_md, metric):
  """Distances `[j, m]` between two small sets."""
  s = jnp.dot(a_jd, b_md.T, precision=_HI)
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
  near = _nearest_pass(mesh, metric, chunk, 1)
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
# Balanced mode (capacity-constrained assignment).


def _capacity_assign(cand_nm: np.ndarray, dist_nm: np.ndarray, cap: int, k: int, refill) -> np.ndarray:
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
  mesh = _mesh(mesh)
  chunk, n_pad = _layout(n, chunk, int(mesh.shape["data"]))
  prepare, init_fn, lloyd = _fit_fns(mesh, n, k, metric, chunk, init, max_iters, float(tol))
  x_dev, w_dev = prepare(_put_rows(x_nd, n_pad, NamedSharding(mesh, P("data", None))))

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
    c, a, dist = _balanced_refine(x_dev, w_dev, c, n=n, k=k, cap=cap, metric=metric, chunk=chunk,
                                  mesh=mesh, rounds=max(1, min(max_iters, 10)))
    inertia = float(np.sum(dist, dtype=np.float64))
    sizes = np.bincount(a, minlength=k)
  else:
    a = to_host(a)[:n]
    sizes = np.rint(to_host(counts)).astype(np.int64)
  return KMeansResult(centroids_kd=to_host(c).astype(np.float32), assign_n=a.astype(np.int32),
                      inertia=inertia, sizes_k=sizes, n_iter=iters, metric=metric)


@functools.lru_cache(maxsize=32)
def _nearest_fn(mesh: Mesh, metric: str, chunk: int, m: int):
  """Jitted top-m nearest centroids of sharded points."""
  return jax.jit(_nearest_pass(mesh, metric, chunk, m))


@functools.lru_cache(maxsize=32)
def _assigned_stats_fn(mesh: Mesh, metric: str, k: int):
  """Jitted (per-centroid sums, distance of each point to its assigned centroid) for a given assignment."""

  def stats(x_nd, w_n, c_kd, a_n):
    c_nd = c_kd[a_n]
    s = jnp.sum(x_nd * c_nd, -1)
    if metric == "l2":
      s = s - 0.5 * jnp.sum(c_nd * c_nd, -1)
    return jax.ops.segment_sum(x_nd * w_n[:, None], a_n, k), _dist(s, x_nd, metric) * w_n

  return jax.jit(stats)


def _balanced_refine(x_dev, w_dev, c_kd, *, n, k, cap, metric, chunk, mesh, rounds):
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
      ch, sub_pad = _layout(max(64 * shards, 1 << (len(points) - 1).bit_length()), chunk, shards)
      bias = jnp.asarray(np.where(open_k, 0.0, -np.inf).astype(np.float32))
      idx, dist = _nearest_fn(mesh, metric, ch, mm)(_put_rows(x_host[0][points], sub_pad, rows), c_kd,
                                                   bias)
      idx, dist = to_host(idx)[:len(points)], to_host(dist)[:len(points)]
      if mm < m:  # repeat the last candidate to keep m columns
        idx = np.concatenate([idx, np.repeat(idx[:, -1:], m - mm, 1)], 1)
        dist = np.concatenate([dist, np.repeat(dist[:, -1:], m - mm, 1)], 1)
      return idx, dist
    return refill

  a_n = None
  for _ in range(rounds):
    idx, dist = _nearest_fn(mesh, metric, chunk, m)(x_dev, c_kd, jnp.zeros((k,), jnp.float32))
    new_a = _capacity_assign(to_host(idx)[:n], to_host(dist)[:n], cap, k, refill_for(c_kd))
    changed = a_n is None or not np.array_equal(new_a, a_n)
    a_n = new_a
    a_pad = np.zeros(n_pad, np.int32)
    a_pad[:n] = a_n
    a_dev = _put_rows(a_pad, n_pad, vec)
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
  mesh = _mesh(mesh)
  chunk, n_pad = _layout(n, chunk, int(mesh.shape["data"]))
  if metric == "cosine":
    x_nd = x_nd / np.maximum(np.linalg.norm(x_nd, axis=-1, keepdims=True), 1e-12)
    c = c / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
  x_dev = _put_rows(x_nd, n_pad, NamedSharding(mesh, P("data", None)))
  idx, dist = _nearest_fn(mesh, metric, chunk, 1)(x_dev, jnp.asarray(c),
                                                  jnp.zeros((c.shape[0],), jnp.float32))
  a, dd = to_host(idx)[:n, 0], to_host(dist)[:n, 0]
  return (a, dd) if return_dist else a

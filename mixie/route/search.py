"""Nearest-neighbour search over a fixed set of points: ScaNN (brute force or tree + AH + reordering) and
an exact numpy path with the same interface.

Every backend answers `search(queries_nd, n) -> (ids_qn int64, dist2_qn float32)`, nearest first, with
`dist2` the squared Euclidean distance. With `metric="cosine"` the points and queries are L2-normalised
and ScaNN searches by dot product; the reported `dist2 = 2 - 2 cos` is the same ranking.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mixie.errors import ConfigError, check

METRICS = ("cosine", "l2")
BACKENDS = ("brute", "tree", "auto", "numpy")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """How an index searches.

  backend: "brute" (ScaNN exact brute force), "tree" (ScaNN partitioning tree + asymmetric hashing +
    exact reordering), "auto" (brute below `tree_threshold` points, tree above), "numpy" (exact,
    no ScaNN: the reference the tests compare to).
  tree_threshold: "auto" uses the tree from this many points on.
  tree_search_fraction: fraction of the tree's leaves searched per query (recall vs speed).
  """

  backend: str = "auto"
  metric: str = "cosine"
  tree_threshold: int = 20000
  tree_search_fraction: float = 0.4

  def __post_init__(self):
    check(self.backend in BACKENDS, f"route.search must be one of {BACKENDS}, got {self.backend!r}",
          ConfigError)
    check(self.metric in METRICS, f"cluster.metric must be one of {METRICS}, got {self.metric!r}",
          ConfigError)
    check(self.tree_threshold >= 1, f"route.tree_threshold must be >= 1, got {self.tree_threshold}",
          ConfigError)
    check(0.0 < self.tree_search_fraction <= 1.0,
          f"route.tree_search_fraction must be in (0, 1], got {self.tree_search_fraction}", ConfigError)


def l2_normalize(x_nd: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
  x = np.asarray(x_nd, np.float32)
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(n, 1e-12)


@dataclasses.dataclass(frozen=True)
class TreeParams:
  """ScaNN tree settings derived from the number of points and neighbours."""

  num_leaves: int
  leaves_to_search: int
  reorder: int
  dims_per_block: int = 2


def tree_params(n_points: int, num_neighbors: int, search_fraction: float) -> TreeParams:
  """~sqrt(n) leaves (each >= ~50 points), a fraction of them searched, reordering >= 10x the neighbours."""
  leaves = int(min(max(2, round(math.sqrt(n_points))), max(2, n_points // 50)))
  search = int(min(leaves, max(1, math.ceil(leaves * search_fraction))))
  return TreeParams(num_leaves=leaves, leaves_to_search=search, reorder=max(100, 10 * num_neighbors))


def exact_search(points_nd: np.ndarray, queries_qd: np.ndarray, n: int, *, sq_norms_n=None,
                 chunk_elems: int = 1 << 25):
  """Exact `n` nearest points by squared L2 (ties: lower index first); numpy, queries in chunks.

  Returns `(ids_qn int64, dist2_qn float32)`.
  """
  points_nd = np.asarray(points_nd, np.float32)
  queries_qd = np.asarray(queries_qd, np.float32)
  p = points_nd.shape[0]
  n = min(n, p)
  if sq_norms_n is None:
    sq_norms_n = np.einsum("nd,nd->n", points_nd, points_nd)
  step = max(1, chunk_elems // max(p, 1))
  ids, dists = [], []
  for s in range(0, queries_qd.shape[0], step):
    q = queries_qd[s:s + step]
    d2 = sq_norms_n[None, :] - 2.0 * (q @ points_nd.T) + np.einsum("qd,qd->q", q, q)[:, None]
    if n < p:
      part = np.argpartition(d2, n - 1, axis=1)[:, :n]
    else:
      part = np.broadcast_to(np.arange(p), d2.shape)
    pd = np.take_along_axis(d2, part, axis=1)
    order = np.lexsort((part, pd), axis=1)  # by distance, then by index
    ids.append(np.take_along_axis(part, order, axis=1))
    dists.append(np.take_along_axis(pd, order, axis=1))
  if not ids:
    return np.zeros((0, n), np.int64), np.zeros((0, n), np.float32)
  return (np.concatenate(ids).astype(np.int64),
          np.maximum(np.concatenate(dists), 0.0).astype(np.float32))


class Index:
  """A searchable set of points `[p, d]` (see the module docstring)."""

  def __init__(self, points_nd: np.ndarray, num_neighbors: int, cfg: SearchConfig = SearchConfig()):
    points_nd = np.asarray(points_nd, np.float32)
    check(points_nd.ndim == 2 and points_nd.shape[0] > 0,
          f"cannot build a search index over an array of shape {points_nd.shape} (need [points>0, d])")
    check(bool(np.isfinite(points_nd).all()), "search index points contain NaN or inf")
    self.cfg = cfg
    self.num_neighbors = int(min(num_neighbors, points_nd.shape[0]))
    self.points = l2_normalize(points_nd) if cfg.metric == "cosine" else points_nd
    self.sq_norms = np.einsum("nd,nd->n", self.points, self.points)
    self.backend = cfg.backend
    if self.backend == "auto":
      self.backend = "tree" if self.points.shape[0] >= cfg.tree_threshold else "brute"
    self.tree = None
    self._searcher = None
    if self.backend in ("brute", "tree"):
      self._searcher = self._build_scann()

  @property
  def dim(self) -> int:
    """Width of the indexed vectors."""
    return self.points.shape[1]

  def _build_scann(self):
    import scann  # imported here: the serving core must not need it

    measure = "dot_product" if self.cfg.metric == "cosine" else "squared_l2"
    b = scann.scann_ops_pybind.builder(self.points, self.num_neighbors, measure)
    if self.backend == "brute":
      return b.score_brute_force().build()
    p = self.points.shape[0]
    self.tree = tree_params(p, self.num_neighbors, self.cfg.tree_search_fraction)
    b = b.tree(num_leaves=self.tree.num_leaves, num_leaves_to_search=self.tree.leaves_to_search,
               training_sample_size=min(p, 250_000), spherical=self.cfg.metric == "cosine")
    aq = 0.2 if self.cfg.metric == "cosine" else float("nan")  # anisotropic loss for inner products
    b = b.score_ah(self.tree.dims_per_block, anisotropic_quantization_threshold=aq)
    return b.reorder(max(self.tree.reorder, self.num_neighbors)).build()

  def _prep(self, queries_qd):
    q = np.asarray(queries_qd, np.float32)
    check(q.ndim == 2 and q.shape[1] == self.dim,
          f"query embeddings have shape {q.shape}; the index expects [n, {self.dim}]")
    check(bool(np.isfinite(q).all()), "query embeddings contain NaN or inf")
    return l2_normalize(q) if self.cfg.metric == "cosine" else q

  def search(self, queries_qd: np.ndarray, n: int | None = None):
    """The `n` (default `num_neighbors`) nearest points of each query: `(ids_qn, dist2_qn)`."""
    n = self.num_neighbors if n is None else int(min(n, self.points.shape[0]))
    q = self._prep(queries_qd)
    if q.shape[0] == 0:
      return np.zeros((0, n), np.int64), np.zeros((0, n), np.float32)
    if self._searcher is None:
      return exact_search(self.points, q, n, sq_norms_n=self.sq_norms)
    pre = None if self.tree is None else max(self.tree.reorder, n)
    ids, score = self._searcher.search_batched(q, final_num_neighbors=n, pre_reorder_num_neighbors=pre)
    ids = np.asarray(ids, np.int64)
    score = np.asarray(score, np.float32)
    if self.cfg.metric == "cosine":  # ScaNN reports the inner product
      dist2 = 2.0 - 2.0 * score
    else:
      dist2 = score
    return ids, np.maximum(dist2, 0.0).astype(np.float32)

"""UMAP + HDBSCAN topics (the "MoIN-500" recipe): the number of topics is what HDBSCAN finds.

The embeddings are reduced with UMAP (umap-learn; `umap_dim` components, `umap_neighbors` neighbours,
min_dist 0, cosine or euclidean input metric) and clustered by scikit-learn's HDBSCAN
(`min_cluster_size`). Noise points then join the cluster with the nearest centroid. Centroids are
computed in the ORIGINAL embedding space (the router searches there): the mean of each cluster's
members, normalised for the cosine metric.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mixie.cluster.kmeans import assign as nearest_centroid
from mixie.errors import MixieError


@dataclasses.dataclass
class HDBSCANResult:
  """Topics found by UMAP + HDBSCAN."""

  centroids_kd: np.ndarray  # float32 [k, d], original embedding space
  assign_n: np.ndarray  # int32 [n], noise points included (joined to their nearest centroid)
  sizes_k: np.ndarray  # int64 [k]
  num_topics: int  # k: clusters HDBSCAN found
  num_noise: int  # points HDBSCAN labelled noise (before joining)
  metric: str


def _centroids(x_nd, assign_n, k, metric):
  sums = np.zeros((k, x_nd.shape[1]), np.float64)
  np.add.at(sums, assign_n, x_nd)
  c = sums / np.maximum(np.bincount(assign_n, minlength=k), 1)[:, None]
  if metric == "cosine":
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
  return c.astype(np.float32)


def umap_hdbscan(x_nd: np.ndarray, *, umap_dim: int = 10, umap_neighbors: int = 15,
                 min_cluster_size: int = 50, metric: str = "cosine", seed: int = 0,
                 chunk: int = 8192) -> HDBSCANResult:
  """Clusters the rows of `x_nd` (see the module docstring)."""
  import umap
  from sklearn.cluster import HDBSCAN

  x_nd = np.asarray(x_nd, np.float32)
  n = x_nd.shape[0] if x_nd.ndim == 2 else 0
  if n == 0:
    raise MixieError(f"hdbscan: need a non-empty [n, d] array of points, got shape {x_nd.shape}")
  if n <= max(umap_neighbors, umap_dim + 1, min_cluster_size):
    raise MixieError(f"hdbscan: {n} documents are too few for cluster.umap_neighbors={umap_neighbors}, "
                     f"cluster.umap_dim={umap_dim} and cluster.min_cluster_size={min_cluster_size}")
  if metric == "cosine":
    x_nd = x_nd / np.maximum(np.linalg.norm(x_nd, axis=1, keepdims=True), 1e-12)
  reducer = umap.UMAP(n_components=umap_dim, n_neighbors=umap_neighbors, min_dist=0.0,
                      metric="cosine" if metric == "cosine" else "euclidean", random_state=seed,
                      n_jobs=1)  # a random_state makes UMAP single-threaded anyway
  low_nu = reducer.fit_transform(x_nd)
  labels = HDBSCAN(min_cluster_size=min_cluster_size, copy=False).fit_predict(low_nu)
  k = int(labels.max()) + 1
  noise = labels < 0
  if k == 0:
    raise MixieError(f"hdbscan found no cluster in {n} documents (all noise): lower "
                     f"cluster.min_cluster_size (now {min_cluster_size})")
  assign_n = labels.astype(np.int32)
  if noise.any():
    c = _centroids(x_nd[~noise], assign_n[~noise], k, metric)
    assign_n[noise] = nearest_centroid(x_nd[noise], c, metric, chunk)
  c = _centroids(x_nd, assign_n, k, metric)
  return HDBSCANResult(centroids_kd=c, assign_n=assign_n, sizes_k=np.bincount(assign_n, minlength=k),
                       num_topics=k, num_noise=int(noise.sum()), metric=metric)

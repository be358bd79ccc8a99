"""Cluster quality: silhouette on a sample (in the embedding space), NMI and ARI against reference
labels when the corpus has them, and cluster-size statistics."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def cluster_quality(x_nd: np.ndarray, assign_n: np.ndarray, labels_n: Sequence | None = None, *,
                    metric: str = "cosine", sample: int = 2000, seed: int = 0) -> dict[str, Any]:
  """Quality figures of a clustering of `x_nd` (JSON-able dict).

  Keys: `num_topics` (clusters with at least one point), `sizes` (min/median/max/mean), `silhouette`
  (on at most `sample` points; None with fewer than 2 clusters or `sample` 0), and with labels `nmi`,
  `ari` and `num_labels`.
  """
  from sklearn import metrics as skm

  assign_n = np.asarray(assign_n)
  n = assign_n.shape[0]
  present, sizes = np.unique(assign_n, return_counts=True)
  out: dict[str, Any] = {
      "num_points": int(n), "num_topics": int(present.size),
      "sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
                "mean": float(sizes.mean())} if n else None,
      "silhouette": None, "silhouette_sample": 0,
  }
  m = min(int(sample), n)
  if m >= 3 and present.size >= 2:
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, m, replace=False) if m < n else np.arange(n)
    if 2 <= np.unique(assign_n[idx]).size <= m - 1:
      out["silhouette"] = float(skm.silhouette_score(
          np.asarray(x_nd)[idx], assign_n[idx], metric="cosine" if metric == "cosine" else "euclidean"))
      out["silhouette_sample"] = int(m)
  if labels_n is not None:
    labels_n = np.asarray(labels_n)
    out["nmi"] = float(skm.normalized_mutual_info_score(labels_n, assign_n))
    out["ari"] = float(skm.adjusted_rand_score(labels_n, assign_n))
    out["num_labels"] = int(np.unique(labels_n).size)
  return out

"""Summaries computed from loaded topics (`mixie.analysis.loaders`): the words and documents that
characterise each topic, agreement with reference labels, and 2-D projections of the embeddings."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import TfidfVectorizer

from mixie.cluster.metrics import cluster_quality
from mixie.errors import MixieError, check


def unit(x) -> np.ndarray:
  """Rows of `x` scaled to unit L2 norm (float64; zero rows stay zero)."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_to_centroid(topics: Mapping[str, Any], n: int = 5) -> dict[int, np.ndarray]:
  """Row indices of the `n` training documents of each topic nearest its centroid (in the clustering
  metric), nearest first."""
  cos = topics["metric"] == "cosine"
  x = unit(topics["emb_nd"]) if cos else np.asarray(topics["emb_nd"], np.float64)
  c = unit(topics["centroids_kd"]) if cos else np.asarray(topics["centroids_kd"], np.float64)
  train = ~topics["heldout_n"]
  out = {}
  for k in range(topics["num_topics"]):
    idx = np.flatnonzero(train & (topics["topic_n"] == k))
    d2 = ((x[idx] - c[k]) ** 2).sum(axis=1)
    out[k] = idx[np.argsort(d2, kind="stable")[:n]]
  return out


def top_terms(topics: Mapping[str, Any], texts: Mapping[str, Sequence[str]], *, n_terms: int = 10,
              n_titles: int = 3) -> list[dict[str, Any]]:
  """Per topic: its most characteristic words and example titles.

  Words: TF-IDF (sublinear tf, English stop words and numbers dropped, rows L2-normalised) fitted on
  the training documents; a word's score in a topic is its mean TF-IDF over the topic's training
  documents. Titles: the training documents nearest the topic's centroid.

  Returns a list (by topic id) of `{"topic", "size", "terms": [(word, score)], "titles": [...]}`.
  """
  train = np.flatnonzero(~topics["heldout_n"])
  check(train.size > 0, f"{topics['workdir']}: no training documents")
  docs = [texts["texts"][i] for i in train]
  vec = TfidfVectorizer(stop_words="english", sublinear_tf=True, token_pattern=r"(?u)\b[^\W\d_]{2,}\b",
                        min_df=2 if len(docs) >= 50 else 1, max_df=0.5 if len(docs) >= 50 else 1.0)
  try:
    x = vec.fit_transform(docs)
  except ValueError as e:  # empty vocabulary
    raise MixieError(f"{topics['workdir']}: no words to rank in the topics' documents ({e})") from None
  vocab = vec.get_feature_names_out()
  topic_t = topics["topic_n"][train]
  near = nearest_to_centroid(topics, n_titles)
  out = []
  for k in range(topics["num_topics"]):
    rows = np.flatnonzero(topic_t == k)
    terms = []
    if rows.size:
      score = np.asarray(x[rows].mean(axis=0)).ravel()
      best = np.argsort(-score, kind="stable")[:n_terms]
      terms = [(str(vocab[j]), float(score[j])) for j in best if score[j] > 0]
    out.append({"topic": k, "size": int(rows.size), "terms": terms,
                "titles": [texts["titles"][i] for i in near[k]]})
  return out


def format_top_terms(terms: Sequence[Mapping[str, Any]]) -> str:
  """`top_terms` as text: one line of words and one of titles per topic."""
  lines = []
  for r in terms:
    lines.append(f"topic {r['topic']:>3} ({r['size']} docs): " + ", ".join(w for w, _ in r["terms"]))
    lines.append("      e.g. " + "; ".join(r["titles"]))
  return "\n".join(lines)


def label_agreement(topics: Mapping[str, Any], *, heldout: bool = False) -> dict[str, Any] | None:
  """Agreement of the topics with the reference labels on the training (or held-out) documents.

  Returns None when the corpus has no labels, else `{"nmi", "ari", "n", "contingency_kl"` (int [K, L]:
  documents of topic k with label l)`, "label_names"}`. NMI and ARI are those of
  `mixie.cluster.metrics.cluster_quality` (the numbers in quality.json for the training documents).
  """
  sel = (topics["heldout_n"] if heldout else ~topics["heldout_n"]) & (topics["label_n"] >= 0)
  if not sel.any() or not topics["label_names"]:
    return None
  t, l = topics["topic_n"][sel], topics["label_n"][sel]
  q = cluster_quality(topics["emb_nd"][sel], t, l, metric=topics["metric"], sample=0)
  table = np.zeros((topics["num_topics"], len(topics["label_names"])), np.int64)
  np.add.at(table, (t, l), 1)
  return {"nmi": q["nmi"], "ari": q["ari"], "n": int(sel.sum()), "contingency_kl": table,
          "label_names": list(topics["label_names"])}


def project_2d(x_nd: np.ndarray, method: str = "pca", *, seed: int = 0) -> np.ndarray:
  """`[n, 2]` coordinates of `x_nd`: "pca" (scikit-learn) or "umap" (umap-learn, cosine)."""
  x = np.asarray(x_nd, np.float32)
  if method == "pca":
    return PCA(n_components=2, random_state=seed).fit_transform(x)
  if method == "umap":
    import umap  # imported only when asked for: it adds 2-4 s (numba) to importing this module
    return umap.UMAP(n_components=2, metric="cosine", random_state=seed,
                     n_neighbors=min(15, max(2, x.shape[0] - 1))).fit_transform(x)
  raise MixieError(f"project_2d: method must be 'pca' or 'umap', got {method!r}")


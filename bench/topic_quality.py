"""Topic quality on the shipped corpus: NMI / ARI / silhouette against its 12 topic labels, for each
embedder (minilm, base, tfidf) and both clusterers (k-means k = 12, UMAP + HDBSCAN), as JSON.

The base embedder (SmolLM2-135M, the shipped GGUF) costs ~270 MFLOP per token, so on a 2-core CPU it
runs on the first `--base-docs` documents only; the other embedders are reported on the full corpus
and on that same subset, so the three can be compared like for like.

  python bench/topic_quality.py [--max-docs 0 --base-docs 1000 --embed-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--max-docs", type=int, default=0, help="0 = all 10,033 documents")
  ap.add_argument("--base-docs", type=int, default=1000)
  ap.add_argument("--embed-tokens", type=int, default=64)
  ap.add_argument("--k", type=int, default=12)
  ap.add_argument("--min-cluster-size", type=int, default=50)
  ap.add_argument("--umap-dim", type=int, default=10)
  ap.add_argument("--embedders", default="minilm,tfidf,base")
  a = ap.parse_args()

  from configs.common import base_config
  from mixie.cluster.embed import make_embedder
  from mixie.cluster.hdbscan import umap_hdbscan
  from mixie.cluster.kmeans import kmeans
  from mixie.cluster.metrics import cluster_quality
  from mixie.data.corpus import load_corpus
  from mixie.model.load import load_base

  c = base_config()
  c.data.max_docs = a.max_docs
  c.data.heldout_fraction = 0.0
  c.cluster.embed_tokens = a.embed_tokens
  corpus = load_corpus(c.data)
  labels, names = corpus.label_ids()
  n_base = min(a.base_docs, len(corpus))
  out = {"docs": len(corpus), "base_docs": n_base, "labels": len(names), "embed_tokens": a.embed_tokens,
         "k": a.k, "hdbscan": {"min_cluster_size": a.min_cluster_size, "umap_dim": a.umap_dim,
                               "umap_neighbors": c.cluster.umap_neighbors}, "results": []}

  def evaluate(name, x, y, subset):
    r = {"embedder": name, "docs": int(len(y)), "subset": subset}
    t = time.perf_counter()
    km = kmeans(x, a.k, metric="cosine", n_init=3, seed=0)
    r["kmeans"] = {**_pick(cluster_quality(x, km.assign_n, y, sample=2000)),
                   "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    mcs = a.min_cluster_size if len(y) >= 5000 else max(10, a.min_cluster_size * len(y) // 10000)
    hd = umap_hdbscan(x, umap_dim=a.umap_dim, umap_neighbors=c.cluster.umap_neighbors,
                      min_cluster_size=mcs, metric="cosine", seed=0)
    r["hdbscan"] = {**_pick(cluster_quality(x, hd.assign_n, y, sample=2000)),
                    "topics_found": hd.num_topics, "noise_points": hd.num_noise,
                    "min_cluster_size": mcs, "seconds": time.perf_counter() - t}
    out["results"].append(r)
    print(json.dumps(r), file=sys.stderr, flush=True)

  for name in a.embedders.split(","):
    c.cluster.embedder = name
    base = load_base(c.model) if name == "base" else None
    n = n_base if name == "base" else len(corpus)
    texts = corpus.texts[:n]
    t = time.perf_counter()
    x = make_embedder(c.cluster, fit_texts=texts, base=base).embed(texts)
    secs = time.perf_counter() - t
    evaluate(name, x, labels[:n], "base_docs" if name == "base" else "all")
    out["results"][-1]["embed_seconds"] = secs
    if name != "base" and n > n_base:
      evaluate(name, x[:n_base], labels[:n_base], "base_docs")
  print(json.dumps(out, indent=2))


def _pick(q):
  return {k: q.get(k) for k in ("nmi", "ari", "silhouette", "num_topics")}


if __name__ == "__main__":
  main()

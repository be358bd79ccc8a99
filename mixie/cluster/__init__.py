"""Topics: embed the corpus, cluster it, write the clustered dataset (`python -m mixie.cluster`).

- `minilm`: all-MiniLM-L6-v2 in JAX; `embed`: the minilm / base / tfidf embedders (saved, reloadable);
- `kmeans`: sharded, chunked k-means in JAX; `hdbscan`: UMAP + HDBSCAN; `metrics`: quality figures;
- `topics`: the stage (`run_cluster`, `load_topics`), resumable step by step; `batching`: the bucketed,
  sharded batch runner the encoders share.
"""

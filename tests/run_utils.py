"""Shared helpers of the tests over a work directory: random host pytrees and the tiny tf-idf run."""

from __future__ import annotations

import numpy as np

from configs.common import base_config


def random_tree(shapes, rng, scale, ones=()):
  """Arrays of `shapes` (a nested dict of shape tuples) drawn on the host, no compile; leaves named in
  `ones` are 1."""
  return {k: random_tree(v, rng, scale, ones) if isinstance(v, dict) else
          (np.ones(v, np.float32) if k in ones else (scale * rng.normal(size=v)).astype(np.float32))
          for k, v in shapes.items()}


def tfidf_run_config(workdir):
  """A config for a tiny, fast run in `workdir`: 300 documents, 3 tf-idf topics, rows of 64 tokens."""
  c = base_config()
  c.workdir = str(workdir)
  c.data.max_docs, c.data.heldout_fraction = 300, 0.1
  c.cluster.embedder, c.cluster.tfidf_dim, c.cluster.k, c.cluster.embed_tokens = "tfidf", 32, 3, 24
  c.dataset.seq_len = 64
  return c

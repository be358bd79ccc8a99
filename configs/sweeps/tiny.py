"""A two-point sweep of a tiny run, for tests and notebooks: `scratch` (experts from scratch with every
baseline: lora_all, lora_all_wide, full) and `seed` (experts branched from a seed adapter).
The base is configs/demo.py:tiny shrunk to seconds: a random 2-layer HF Llama (set
--config.base.model.path to one, e.g. tests' `write_tiny_hf_llama`), tf-idf topics of 240 documents.
"""

import os

import ml_collections

from configs import demo


def get_config(arg: str = ""):
  """The tiny sweep (`arg` unused)."""
  del arg
  b = demo.get_config("tiny")
  b.model.source = "hf"  # a tiny random Llama in HF format
  b.cluster.embedder, b.cluster.embed_tokens, b.data.max_docs, b.cluster.k = "tfidf", 16, 240, 4
  b.dataset.seq_len = 32  # short rows
  b.train.slots, b.train.batch_per_slot, b.train.tokens_per_expert = 4, 2, 512  # 4 experts at once
  b.train.checkpoint_every = 2  # steps
  b.mesh.shape = (1, 1, 1)  # one device
  b.eval.max_docs, b.eval.prefix_tokens, b.eval.route_modes = 24, (4, 8), ("centroid",)
  b.route.knn_k = 4  # few training documents per topic
  s = ml_collections.ConfigDict()
  s.name = "tiny"  # report name
  s.workdir = os.environ.get("MIXIE_SWEEP_DIR", "/tmp/mixie_sweeps") + "/tiny"  # the sweep directory
  s.base = b  # the run config every point starts from
  s.points = (("scratch", {"train.baselines": ("lora_all", "lora_all_wide", "full")}),
              ("seed", {"train.init": "seed", "train.baselines": ()}))  # (name, overrides) per point
  s.x = "train.init"  # the swept field
  s.series = ("train.init",)  # scratch and seed rows are separate lines
  s.plot_prefix = 0  # the largest common P
  return s

"""The demo: SmolLM2-135M (shipped GGUF) + MiniLM topics of the shipped Wikipedia summaries, on a CPU.

`python -m mixie.train --config=configs/demo.py` runs every missing stage into `workdir`.
Arg: "" (default), "tiny" (a few documents and steps, for tests and notebooks in CI), or "scale:E" (the
scale simulation: E experts, default 500, on a tiny random base and a synthetic corpus; `bench/scale.py`).
"""

import os

from configs.common import base_config


def get_config(arg: str = ""):
  """The demo config; `arg` is "" (the measured demo) or "tiny" (tests, notebooks)."""
  c = base_config()
  c.workdir = os.environ.get("MIXIE_WORKDIR", "/tmp/mixie_demo")  # work directory of the demo run
  c.model.source = "gguf"  # the shipped SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to f32
  c.cluster.k = 12  # one topic per label of the shipped corpus, for an easy NMI read
  if arg == "":
    # Sized for <= 10 minutes on 2 CPU cores, clustering included (a SmolLM2-135M train step runs at
    # ~100-200 tokens/s there): a subset of the corpus, a few topics, ~2k tokens per expert.
    c.data.max_docs = 2400  # documents embedded, clustered and tokenized (of 10,033)
    c.cluster.embed_tokens = 32  # MiniLM sees (and the router will see) the first 32 tokens
    c.route.route_tokens = 32  # the router's prefix, as the embedder's
    c.cluster.k = 6  # topics = experts
    c.dataset.seq_len = 128  # a summary is ~110 tokens
    c.train.slots = 6  # every expert in one wave
    c.train.batch_per_slot = 2  # rows per expert per step: 6 x 2 x 128 tokens per step
    c.train.tokens_per_expert = 2048  # ~8 steps per expert; lora_all gets the same 6 x 2048 tokens
    c.train.lr = 3e-3  # high: few steps
    c.train.warmup_steps = 2  # per expert
    c.train.checkpoint_every = 4  # steps
    c.train.ce_chunk = 2048  # every slot's loss in one chunk (all-data LoRA: 12 x 128 tokens): no recomputation
    c.eval.max_docs = 72  # held-out documents scored (of ~115)
  if arg == "tiny":
    c.data.max_docs = 600  # a few hundred documents
    c.cluster.k = 4  # four topics
    c.train.tokens_per_expert = 2048  # a handful of steps
  elif arg == "scale" or arg.startswith("scale:"):
    scale_sim(c, int(arg.split(":", 1)[1]) if ":" in arg else 500)
  elif arg:
    raise ValueError(f"configs/demo.py: unknown arg {arg!r} (use '', 'tiny', 'scale' or 'scale:E')")
  return c


def scale_sim(c, experts: int) -> None:
  """`scale:E`: E experts on a tiny random base (2 layers, d=64, the shipped tokenizer) and a synthetic
  corpus of E topics, through every stage; `bench/scale.py` times it for E = 50, 500, 5000."""
  c.workdir = os.environ.get("MIXIE_WORKDIR", f"/tmp/mixie_scale_{experts}")  # work directory
  c.model.source = "random"  # random weights: the simulation measures the machinery, not the model
  c.model.preset = "tiny_smollm2"  # 2 layers, d=64, SmolLM2's vocabulary and tokenizer
  c.data.source = "synthetic"  # mixie.data.synthetic: E topics with their own keywords
  c.data.synthetic_topics = experts  # E topics
  c.data.synthetic_docs_per_topic = 4  # 4E documents
  c.data.synthetic_words = 40  # ~40 tokens per document: one training row each
  c.data.synthetic_topic_share = 0.75  # 3/4 of a document's words are its topic's keywords
  c.data.heldout_fraction = 0.05  # ~E/5 held-out documents
  c.cluster.embedder = "tfidf"  # word counts: what tells synthetic topics apart
  c.cluster.embed_tokens = 40  # every word of a document
  c.cluster.tfidf_dim = 128  # SVD dimensions, the same for every E (k-means recovers 5000 topics: NMI 0.999)
  c.cluster.k = experts  # k-means to E centroids
  c.cluster.n_init = 1  # one restart
  c.cluster.max_iters = 10  # Lloyd iterations
  c.cluster.silhouette_sample = 1000  # points of the silhouette estimate
  c.dataset.seq_len = 32  # T
  c.lora.rank = 4  # r: small experts
  c.lora.alpha = 8.0  # scale 2
  c.train.slots = 32  # E slots per wave: E / 32 waves
  c.train.batch_per_slot = 1  # b
  c.train.tokens_per_expert = 32  # one step per expert: every step ends a wave (the most host work)
  c.train.lr = 3e-3  # few steps
  c.train.warmup_steps = 1  # per expert
  c.train.checkpoint_every = 50  # steps
  c.train.log_every = 10  # metric lines
  c.train.baselines = ()  # experts only
  c.route.route_tokens = 16  # the router's prefix
  c.route.knn_k = 3  # knn voters: fewer than the ~3.8 training documents of a topic
  c.eval.prefix_tokens = (8,)  # route on 8 tokens, score the rest
  c.eval.batch = 32  # (document, expert) rows per forward; experts on device while scoring
  c.generate.cache_experts = 16  # LRU slots: serving churns through far more experts
  c.generate.max_new_tokens = 8  # tokens decoded per prompt

"""The demo: SmolLM2-135M (shipped GGUF) + MiniLM topics of the shipped Wikipedia summaries, on a CPU.

`python -m mixie.train --config=configs/demo.py` runs every missing stage into `workdir`.
Arg: "" (default) or "tiny" (a few documents and steps, for tests and notebooks in CI).
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
  elif arg:
    raise ValueError(f"configs/demo.py: unknown arg {arg!r} (use '' or 'tiny')")
  return c

"""The demo: SmolLM2-135M (shipped GGUF) + MiniLM topics of the shipped Wikipedia summaries, on a CPU.

`python -m mixie.train --config=configs/demo.py` runs every missing stage into `workdir`.
Arg: "" (default) or "tiny" (a few documents and steps, for tests and notebooks in CI).
"""

import os

from configs.common import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.workdir = os.environ.get("MIXIE_WORKDIR", "/tmp/mixie_demo")  # work directory of the demo run
  c.model.source = "gguf"  # the shipped SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to f32
  c.cluster.k = 12  # one topic per label of the shipped corpus, for an easy NMI read
  if arg == "tiny":
    c.data.max_docs = 600  # a few hundred documents
    c.cluster.k = 4  # four topics
    c.train.tokens_per_expert = 2048  # a handful of steps
  elif arg:
    raise ValueError(f"configs/demo.py: unknown arg {arg!r} (use '' or 'tiny')")
  return c

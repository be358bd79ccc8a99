"""Embedding throughput: all-MiniLM-L6-v2 in JAX (mixie) vs sentence-transformers (torch, CPU), one run.

Both embed the same shipped Wikipedia summaries, truncated to the same number of word pieces, with the
same batch size; both sort by length internally. mixie's compilation (one per length bucket) is done
by a warm-up pass and reported separately. Also reports the agreement of the two (min cosine).

  python bench/embed.py [--docs 1000 --max-tokens 64 --batch 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--docs", type=int, default=1000)
  ap.add_argument("--max-tokens", type=int, default=64)
  ap.add_argument("--batch", type=int, default=64)
  a = ap.parse_args()

  import jax
  import torch

  from mixie.assets import minilm_dir, wiki_summaries_json
  from mixie.cluster.minilm import MiniLMEncoder

  d = json.loads(wiki_summaries_json().read_text())
  texts = [v["extract"] for v in d.values()][:a.docs]
  out = {"docs": len(texts), "max_tokens": a.max_tokens, "batch": a.batch, "cpus": os.cpu_count(),
         "jax": jax.__version__, "backend": jax.default_backend(), "torch": torch.__version__,
         "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()[0]}

  enc = MiniLMEncoder(max_tokens=a.max_tokens, batch=a.batch)
  t = time.perf_counter()
  enc(texts[:4 * a.batch], progress=False)  # compiles the length buckets
  out["mixie_warmup_seconds"] = time.perf_counter() - t
  t = time.perf_counter()
  ours = enc(texts, progress=False)
  s = time.perf_counter() - t
  out["mixie"] = {"seconds": s, "docs_per_s": len(texts) / s}

  from sentence_transformers import SentenceTransformer
  st = SentenceTransformer(str(minilm_dir()), device="cpu")
  st.max_seq_length = a.max_tokens
  st.encode(texts[:a.batch], batch_size=a.batch)  # warm-up
  t = time.perf_counter()
  ref = st.encode(texts, batch_size=a.batch, convert_to_numpy=True)
  s = time.perf_counter() - t
  out["sentence_transformers"] = {"seconds": s, "docs_per_s": len(texts) / s}
  out["loadavg_end"] = os.getloadavg()[0]  # other work on the machine skews every timing
  out["speedup_vs_sentence_transformers"] = (out["mixie"]["docs_per_s"] /
                                             out["sentence_transformers"]["docs_per_s"])
  out["min_cosine_vs_sentence_transformers"] = float(
      ((ours * ref).sum(1) / np.linalg.norm(ref, axis=1)).min())
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()

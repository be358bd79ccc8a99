"""A synthetic corpus with known topics, for scale simulations (`data.source = "synthetic"`).

Deterministic: the same config gives the same documents, in the same order, on every machine and in
every process. Words come from the shipped SmolLM2 tokenizer's vocabulary (its word-initial tokens of
3-12 lower-case ASCII letters that are not English stop words, sorted: about 20k words), so each word
is one token and the TF-IDF embedder sees every word.

Topic t has `synthetic_keywords` keywords, drawn (seeded by (`synthetic_seed`, t)) from that pool. A document of
topic t has `synthetic_words` words; each is one of t's keywords with probability
`synthetic_topic_share`, else any word of the pool (background). Topics differ only in their keywords,
so an embedder of word counts and k-means recover them; the topic id is the document's label (NMI /
ARI of the clustering against it). Documents are interleaved topic by topic (document i is of topic
i mod E), so any prefix (`data.max_docs`) is a uniform sample of the topics.
"""

from __future__ import annotations

import functools
import re
from typing import Iterator

import numpy as np

from mixie.errors import ConfigError, check

_WORD = re.compile(r"Ġ[a-z]{3,12}")  # a word-initial token: "Ġ" (the byte-level space) + letters


@functools.lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
  """The sorted words topics draw from: single-token words of the shipped tokenizer's vocabulary."""
  from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS  # (both: start-up cost of every corpus
  from mixie.model.load import load_tokenizer  # reader; only this source needs them)

  vocab = load_tokenizer("gguf").tok.get_vocab()
  return tuple(sorted(k[1:] for k in vocab if _WORD.fullmatch(k) and k[1:] not in ENGLISH_STOP_WORDS))


def validate_synthetic_config(data_cfg) -> None:
  """Raises `ConfigError` naming the field for a bad synthetic-corpus setting."""
  for f, lo in (("synthetic_topics", 1), ("synthetic_docs_per_topic", 1), ("synthetic_words", 1),
                ("synthetic_keywords", 1), ("synthetic_seed", 0)):
    v = data_cfg.get(f)
    check(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
          f"data.{f} must be an integer >= {lo}, got {v!r}", ConfigError)
  share = data_cfg.get("synthetic_topic_share")
  check(isinstance(share, (int, float)) and 0.0 < float(share) <= 1.0,
        f"data.synthetic_topic_share must be in (0, 1], got {share!r}", ConfigError)


def topic_keywords(n_topics: int, n_keywords: int, seed: int, pool_size: int) -> np.ndarray:
  """Keyword indices into the pool `[n_topics, n_keywords]`, distinct within a topic."""
  out = np.empty((n_topics, n_keywords), np.int64)
  for t in range(n_topics):
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, t]))
    out[t] = rng.choice(pool_size, size=n_keywords, replace=False)
  return out


def synthetic_raw(data_cfg) -> Iterator[tuple[str, str, str, None, str]]:
  """The corpus as raw records `(text, label, title, None, where)` for `mixie.data.corpus` (its filter
  then normalises, de-duplicates, holds out and caps them like any source's)."""
  validate_synthetic_config(data_cfg)
  seed = int(data_cfg.synthetic_seed)
  pool = word_pool()
  n_topics, per = int(data_cfg.synthetic_topics), int(data_cfg.synthetic_docs_per_topic)
  n_words, share = int(data_cfg.synthetic_words), float(data_cfg.synthetic_topic_share)
  keys = topic_keywords(n_topics, int(data_cfg.synthetic_keywords), seed, len(pool))
  for j in range(per):
    for t in range(n_topics):
      rng = np.random.default_rng(np.random.SeedSequence([seed, 2, t, j]))
      own = rng.random(n_words) < share
      words = np.where(own, keys[t][rng.integers(0, keys.shape[1], n_words)],
                       rng.integers(0, len(pool), n_words))
      title = f"synthetic topic {t} document {j}"
      yield " ".join(pool[w] for w in words), str(t), title, None, title

"""Document embedders, chosen by `cluster.embedder`; the router embeds queries with the same object.

- `minilm`: all-MiniLM-L6-v2 in JAX (`mixie.cluster.minilm`): mean-pooled, L2-normalised.
- `base`: the frozen base itself: final (normed) hidden states of `mixie.model.llama.forward`,
  mean-pooled over the tokens and L2-normalised. No extra model; queries routed by the same base.
- `tfidf`: TF-IDF (sublinear tf, English stop words) + truncated SVD + L2 norm (scikit-learn), the
  c-BTM recipe, as a cheap baseline. Fitted on the corpus.

Every embedder sees only the first `embed_tokens` tokens of a text: MiniLM word pieces ([CLS] and
[SEP] included), base-model tokens, or TF-IDF words. At inference the router sees only a prefix.

`Embedder.save(dir)` writes `embedder.json` (kind and settings) and, for TF-IDF, its vocabulary (JSON)
and idf/SVD arrays (npz): never a pickle. `load_embedder(dir)` rebuilds the same embedder, so queries are
embedded exactly as the corpus was.
"""

from __future__ import annotations

import abc
import functools
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from mixie import io as mio
from mixie.cluster.batching import run_batched
from mixie.cluster.minilm import MiniLMEncoder, mean_pool_normalize
from mixie.errors import ConfigError, MixieError
from mixie.model.checkpoint import fingerprint
from mixie.model.llama import forward

EMBEDDERS = ("minilm", "base", "tfidf")
SPEC_JSON = "embedder.json"
TFIDF_NPZ = "tfidf.npz"
TFIDF_VOCAB = "tfidf_vocab.json"


class Embedder(abc.ABC):
  """Texts -> `[n, dim]` float32 unit vectors, from each text's first `embed_tokens` tokens."""

  kind: str = ""
  dim: int = 0
  embed_tokens: int = 0

  @abc.abstractmethod
  def embed(self, texts: Sequence[str], progress: bool | None = None) -> np.ndarray:
    """Embeddings `[n, dim]` float32 (unit norm; an empty text may give the zero vector)."""

  def spec(self) -> dict[str, Any]:
    """What `embedder.json` records."""
    return {"kind": self.kind, "dim": self.dim, "embed_tokens": self.embed_tokens}

  def save(self, directory) -> None:
    """Writes `embedder.json` (and the arrays the embedder needs) atomically into `directory`."""
    mio.atomic_write_json(mio.path(directory) / SPEC_JSON, self.spec())


# ---------------------------------------------------------------------------------------------------
# MiniLM.


class MiniLMEmbedder(Embedder):
  """all-MiniLM-L6-v2 in JAX (the shipped weights), batches sharded over the mesh's `data` axis."""

  kind = "minilm"

  def __init__(self, embed_tokens: int = 64, *, batch: int = 64, mesh: Mesh | None = None,
               model_dir=None):
    self.encoder = MiniLMEncoder(model_dir, max_tokens=embed_tokens, batch=batch, mesh=mesh)
    self.embed_tokens, self.dim = embed_tokens, self.encoder.dim

  def embed(self, texts, progress=None):
    """Unit-norm MiniLM embeddings `[n, 384]` (f32) of `texts`."""
    return self.encoder(texts, progress=progress)

  def spec(self):
    """What the embedding is (written next to the vectors, checked on reuse)."""
    return {**super().spec(), "model": "all-MiniLM-L6-v2", "pooling": "mean", "normalize": True}


# ---------------------------------------------------------------------------------------------------
# The frozen base.


def _base_pooled(params, tokens_bt, mask_bt, *, cfg):
  _, _, hidden_btd = forward(params, None, tokens_bt, cfg, return_hidden=True)  # logits unused: DCE'd
  return mean_pool_normalize(hidden_btd, mask_bt)


class BaseEmbedder(Embedder):
  """Mean-pooled final hidden states of the frozen base, over its first `embed_tokens` tokens.

  `base` is `(LlamaConfig, params, Tokenizer)` as `mixie.model.load.load_base` returns it (params
  already placed on the mesh, if any). Right padding cannot change a causal model's valid positions.
  """

  kind = "base"

  def __init__(self, base, embed_tokens: int = 64, *, batch: int = 64, mesh: Mesh | None = None):
    if base is None or len(base) != 3 or base[2] is None:
      raise ConfigError("cluster.embedder='base' needs the base model and its tokenizer "
                        "(model.source with a tokenizer)")
    self.cfg, self.params, self.tokenizer = base
    self.embed_tokens, self.dim, self.batch, self.mesh = embed_tokens, self.cfg.d_model, batch, mesh
    self._fn = jax.jit(functools.partial(_base_pooled, cfg=self.cfg))
    self._fingerprint = None

  @property
  def fingerprint(self) -> str:
    """The base model's fingerprint (cached): embeddings are only valid for that base."""
    if self._fingerprint is None:
      self._fingerprint = fingerprint(self.cfg, self.params)
    return self._fingerprint

  def embed(self, texts, progress=None):
    """Unit-norm mean-pooled base hidden states `[n, d_model]` of the first `embed_tokens` tokens."""
    ids = [s[:self.embed_tokens] for s in self.tokenizer.encode_batch(list(texts))]
    return run_batched(lambda t, m: self._fn(self.params, t, m), ids, dim=self.dim,
                       max_len=self.embed_tokens, batch=self.batch, pad_id=self.tokenizer.pad_id,
                       mesh=self.mesh, desc="embed (base)", progress=progress)

  def spec(self):
    """What the embedding is, including the base fingerprint."""
    return {**super().spec(), "base_fingerprint": self.fingerprint, "pooling": "mean",
            "normalize": True}


# ---------------------------------------------------------------------------------------------------
# TF-IDF + truncated SVD.

_WORD_RE = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern


def tfidf_words(text: str, embed_tokens: int) -> list[str]:
  """The first `embed_tokens` lower-cased words of `text`, English stop words then removed."""
  from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

  return [w for w in _WORD_RE.findall(text.lower())[:embed_tokens] if w not in ENGLISH_STOP_WORDS]


def _l2_rows(x):
  n = np.linalg.norm(x, axis=1, keepdims=True)
  return (x / np.maximum(n, 1e-12)).astype(np.float32)


class TfidfEmbedder(Embedder):
  """TF-IDF + truncated SVD + L2 norm; `fit` on a corpus, then `embed` any text the same way."""

  kind = "tfidf"

  def __init__(self, vocab: Sequence[str], idf_v: np.ndarray, components_dv: np.ndarray,
               embed_tokens: int = 64):
    self.vocab = list(vocab)
    self.idf_v = np.asarray(idf_v, np.float32)
    self.components_dv = np.asarray(components_dv, np.float32)
    if not (len(self.vocab) == self.idf_v.shape[0] == self.components_dv.shape[1]):
      raise MixieError(f"tfidf embedder: vocabulary ({len(self.vocab)}), idf {self.idf_v.shape} and "
                       f"components {self.components_dv.shape} do not match")
    self.embed_tokens, self.dim = embed_tokens, self.components_dv.shape[0]
    self._index = {w: i for i, w in enumerate(self.vocab)}

  @classmethod
  def fit(cls, texts: Sequence[str], embed_tokens: int = 64, dim: int = 256,
          seed: int = 0) -> "TfidfEmbedder":
    """Fits the vocabulary, idf and a `dim`-component truncated SVD on `texts`."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    n = len(texts)
    if n < 2:
      raise MixieError(f"tfidf embedder: need at least 2 documents to fit, got {n}")
    many = n >= 20
    vec = TfidfVectorizer(analyzer=functools.partial(tfidf_words, embed_tokens=embed_tokens),
                          min_df=2 if many else 1, max_df=0.5 if many else 1.0, sublinear_tf=True,
                          dtype=np.float32)
    try:
      x = vec.fit_transform(texts)
    except ValueError as e:  # empty vocabulary
      raise MixieError(f"tfidf embedder: cannot build a vocabulary from {n} documents ({e})") from None
    vocab = vec.get_feature_names_out().tolist()
    dim_eff = min(dim, len(vocab) - 1, n - 1)
    if dim_eff < 1:
      raise MixieError(f"tfidf embedder: vocabulary of {len(vocab)} words is too small for an SVD")
    svd = TruncatedSVD(n_components=dim_eff, random_state=seed).fit(x)
    return cls(vocab, vec.idf_, svd.components_, embed_tokens)

  def _tfidf(self, texts):
    from scipy import sparse

    rows, cols, vals = [], [], []
    for r, t in enumerate(texts):
      counts: dict[int, int] = {}
      for w in tfidf_words(t, self.embed_tokens):
        j = self._index.get(w)
        if j is not None:
          counts[j] = counts.get(j, 0) + 1
      rows += [r] * len(counts)
      cols += list(counts)
      vals += list(counts.values())
    tf = np.asarray(vals, np.float32)
    x = sparse.csr_matrix(((1.0 + np.log(tf)) * self.idf_v[np.asarray(cols, np.int64)],
                           (np.asarray(rows, np.int64), np.asarray(cols, np.int64))),
                          shape=(len(texts), len(self.vocab)), dtype=np.float32)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(1))).ravel()
    return sparse.diags(1.0 / np.maximum(norms, 1e-12)).astype(np.float32) @ x

  def embed(self, texts, progress=None):
    """Unit-norm TF-IDF vectors projected on the fitted components, `[n, dim]`."""
    texts = list(texts)
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    return _l2_rows(np.asarray(self._tfidf(texts) @ self.components_dv.T))

  def spec(self):
    """What the embedding is, with the files that hold its fitted state."""
    return {**super().spec(), "vocab_size": len(self.vocab), "files": [TFIDF_NPZ, TFIDF_VOCAB]}

  def save(self, directory):
    """Writes idf, components and vocabulary to `directory` (the spec last)."""
    d = mio.path(directory)
    mio.save_arrays(d / TFIDF_NPZ, {"idf_v": self.idf_v, "components_dv": self.components_dv})
    mio.atomic_write_json(d / TFIDF_VOCAB, self.vocab)
    super().save(d)  # the spec last: its presence means the arrays are complete


# ---------------------------------------------------------------------------------------------------
# Construction from the config, and from a saved directory.


def validate_cluster_embed_config(cc) -> None:
  """Raises `ConfigError` naming the field for a bad embedding setting."""
  if cc.embedder not in EMBEDDERS:
    raise ConfigError(f"cluster.embedder must be one of {EMBEDDERS}, got {cc.embedder!r}")
  for f, lo in (("embed_tokens", 2), ("embed_batch", 1), ("tfidf_dim", 1)):
    v = cc[f]
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
      raise ConfigError(f"cluster.{f} must be an integer >= {lo}, got {v!r}")
  if cc.embedder == "minilm" and cc.embed_tokens > 512:
    raise ConfigError(f"cluster.embed_tokens must be <= 512 for minilm, got {cc.embed_tokens}")


def make_embedder(cluster_cfg, *, fit_texts: Sequence[str] | None = None, base=None,
                  mesh: Mesh | None = None, seed: int = 0) -> Embedder:
  """The embedder named by `cluster_cfg.embedder` (tfidf is fitted on `fit_texts`)."""
  validate_cluster_embed_config(cluster_cfg)
  kind, tokens, batch = cluster_cfg.embedder, cluster_cfg.embed_tokens, cluster_cfg.embed_batch
  if kind == "minilm":
    return MiniLMEmbedder(tokens, batch=batch, mesh=mesh)
  if kind == "base":
    return BaseEmbedder(base, tokens, batch=batch, mesh=mesh)
  if fit_texts is None:
    raise MixieError("the tfidf embedder must be fitted: pass fit_texts")
  return TfidfEmbedder.fit(fit_texts, tokens, cluster_cfg.tfidf_dim, seed)


def embed_texts(texts: Sequence[str], cluster_cfg, *, base=None, mesh: Mesh | None = None,
                seed: int = 0) -> np.ndarray:
  """Embeds `texts` with the configured embedder (tfidf fitted on `texts`): `[n, d]` float32."""
  return make_embedder(cluster_cfg, fit_texts=texts, base=base, mesh=mesh, seed=seed).embed(texts)


def load_embedder(directory, *, base=None, mesh: Mesh | None = None, batch: int = 64) -> Embedder:
  """The embedder saved in `directory` by `Embedder.save` (`base` needed for kind 'base')."""
  d = mio.path(directory)
  spec = mio.read_json(d / SPEC_JSON)
  kind = spec.get("kind") if isinstance(spec, dict) else None
  if kind not in EMBEDDERS:
    raise MixieError(f"{d / SPEC_JSON}: unknown embedder kind {kind!r}")
  tokens = int(spec["embed_tokens"])
  if kind == "minilm":
    e = MiniLMEmbedder(tokens, batch=batch, mesh=mesh)
  elif kind == "base":
    e = BaseEmbedder(base, tokens, batch=batch, mesh=mesh)
    if e.fingerprint != spec.get("base_fingerprint"):
      raise MixieError(f"{d / SPEC_JSON}: the topics were embedded with another base model "
                       f"(fingerprint {spec.get('base_fingerprint')}, the loaded base is {e.fingerprint})")
  else:
    arrays = mio.load_arrays(d / TFIDF_NPZ)
    vocab = mio.read_json(d / TFIDF_VOCAB)
    if "idf_v" not in arrays or "components_dv" not in arrays or not isinstance(vocab, list):
      raise MixieError(f"{d}: incomplete tfidf embedder files")
    e = TfidfEmbedder(vocab, arrays["idf_v"], arrays["components_dv"], tokens)
  if e.dim != spec.get("dim"):
    raise MixieError(f"{d / SPEC_JSON}: records dim {spec.get('dim')}, the rebuilt embedder has {e.dim}")
  return e

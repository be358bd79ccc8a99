"""The tfidf and base embedders, and saving/loading every embedder so queries embed like the corpus."""

import functools
import json

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from mixie.assets import wiki_summaries_json
from mixie.cluster import embed as E
from mixie.errors import ConfigError, MixieError
from mixie.model.llama import LlamaConfig, forward, init_params
from mixie.sharding import make_mesh


@pytest.fixture(scope="module")
def texts():
  d = json.loads(wiki_summaries_json().read_text())
  return [v["extract"] for v in list(d.values())[::20][:300]]


def _cc(**kw):
  c = ConfigDict(dict(embedder="tfidf", embed_tokens=64, embed_batch=16, tfidf_dim=32))
  c.update(kw)
  return c


def test_tfidf_matches_sklearn_pipeline_and_round_trips(texts, tmp_path):
  from sklearn.decomposition import TruncatedSVD
  from sklearn.feature_extraction.text import TfidfVectorizer
  from sklearn.preprocessing import normalize

  fit, new = texts[:250], texts[250:]
  e = E.make_embedder(_cc(), fit_texts=fit)
  vec = TfidfVectorizer(analyzer=functools.partial(E.tfidf_words, embed_tokens=64), min_df=2,
                        max_df=0.5, sublinear_tf=True, dtype=np.float32)
  svd = TruncatedSVD(32, random_state=0).fit(vec.fit_transform(fit))
  want = normalize(svd.transform(vec.transform(new)))
  got = e.embed(new)
  assert got.shape == (50, 32)
  np.testing.assert_allclose(np.abs((got * want).sum(1)), 1.0, atol=1e-5)  # same directions
  np.testing.assert_allclose(got, want, atol=1e-4)
  e.save(tmp_path / "emb")
  loaded = E.load_embedder(tmp_path / "emb")
  assert loaded.kind == "tfidf" and loaded.dim == 32
  np.testing.assert_array_equal(loaded.embed(new), got)
  assert not list((tmp_path / "emb").glob("*.pkl"))


def test_tfidf_sees_only_the_first_tokens(texts):
  e = E.TfidfEmbedder.fit(texts, embed_tokens=8, dim=16)
  words = texts[0].split()
  np.testing.assert_allclose(e.embed([" ".join(words[:40])]),
                             e.embed([" ".join(words[:40] + ["zebra"] * 9)]))
  assert len(E.tfidf_words(texts[0], 8)) <= 8


class _ToyTokenizer:
  """Word -> id by a stable hash (enough to drive the base embedder)."""
  pad_id = 0

  def encode_batch(self, texts):
    return [[1] + [3 + (sum(map(ord, w)) * 7919) % 500 for w in t.split()] for t in texts]


@pytest.fixture(scope="module")
def toy_base():
  cfg = LlamaConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  return cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)), _ToyTokenizer()


def test_base_embedder_is_mean_pooled_hidden_states(texts, toy_base, tmp_path):
  cfg, params, tok = toy_base
  sub = texts[:4] + ["one"]
  e = E.make_embedder(_cc(embedder="base", embed_tokens=24), base=toy_base)
  got = e.embed(sub)
  fwd = jax.jit(functools.partial(forward, cfg=cfg, return_hidden=True), static_argnums=1)
  for i, t in enumerate(sub):  # one document at a time, no padding
    ids = np.asarray(tok.encode_batch([t])[0][:24])[None]
    _, _, h = fwd(params, None, ids)
    m = np.asarray(h[0]).mean(0)
    np.testing.assert_allclose(got[i], m / np.linalg.norm(m), atol=2e-5)
  sharded = E.BaseEmbedder(toy_base, 24, batch=8, mesh=make_mesh((8,), ("data",)))
  np.testing.assert_allclose(sharded.embed(sub), got, atol=2e-5)
  e.save(tmp_path / "emb")
  np.testing.assert_allclose(E.load_embedder(tmp_path / "emb", base=toy_base).embed(sub), got, atol=1e-6)
  other = (cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(1)), tok)
  with pytest.raises(MixieError, match="another base"):
    E.load_embedder(tmp_path / "emb", base=other)


def test_bad_settings():
  with pytest.raises(ConfigError, match="cluster.embedder"):
    E.make_embedder(_cc(embedder="bert"))
  with pytest.raises(ConfigError, match="cluster.embed_tokens"):
    E.make_embedder(_cc(embed_tokens=0))
  with pytest.raises(ConfigError, match="embedder='base'"):
    E.make_embedder(_cc(embedder="base"))
  with pytest.raises(MixieError, match="at least 2"):
    E.TfidfEmbedder.fit(["only one"])


def test_load_missing_or_unknown(tmp_path):
  with pytest.raises(MixieError, match="not found"):
    E.load_embedder(tmp_path)
  (tmp_path / "embedder.json").write_text('{"kind": "word2vec", "dim": 3, "embed_tokens": 4}')
  with pytest.raises(MixieError, match="unknown embedder kind"):
    E.load_embedder(tmp_path)

"""Router: ScaNN search agrees with exact numpy search; modes; prefix-only routing; save/load."""

import collections
import zlib

import numpy as np
import pytest

from mixie.errors import ConfigError, MixieError
from mixie.route.router import Router, RouterConfig, embed_queries, prefix_texts, vote
from mixie.route.search import Index, SearchConfig, exact_search


def _centroids_and_queries(k=5000, d=384, q=1000, noise=1.0, seed=0):
  """Random centroids; each query is a random centroid's direction plus noise of equal norm
  (cosine to its own centroid ~0.7)."""
  rng = np.random.default_rng(seed)
  c = rng.normal(size=(k, d)).astype(np.float32)
  own = rng.integers(0, k, q)
  u = c[own] / np.linalg.norm(c[own], axis=1, keepdims=True)
  return c, u + noise * rng.normal(size=(q, d)).astype(np.float32) / np.sqrt(d)


@pytest.fixture(scope="module")
def centroids_5k():
  return _centroids_and_queries()


def test_exact_search_matches_brute_force_sort():
  rng = np.random.default_rng(1)
  p, q = rng.normal(size=(300, 16)), rng.normal(size=(40, 16))
  ids, d2 = exact_search(p, q, 5, chunk_elems=1000)  # several chunks
  full = ((q[:, None, :] - p[None]) ** 2).sum(-1)
  ref = np.argsort(full, axis=1, kind="stable")[:, :5]
  np.testing.assert_array_equal(ids, ref)
  np.testing.assert_allclose(d2, np.take_along_axis(full, ref, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["brute", "tree"])
def test_scann_recall_at_1_on_5000_centroids(centroids_5k, backend):
  c, q = centroids_5k
  exact = Router(c, RouterConfig(search=SearchConfig(backend="numpy"))).route(q).expert_ids[:, 0]
  r = Router(c, RouterConfig(search=SearchConfig(backend=backend)))
  assert r.centroid_index.backend == backend
  got = r.route(q).expert_ids[:, 0]
  recall = float(np.mean(got == exact))
  assert recall >= 0.99, recall
  if backend == "brute":
    assert recall == 1.0


def test_auto_picks_by_size_and_l2_metric_agrees():
  c, q = _centroids_and_queries(k=600, d=32, q=200, seed=3)
  cfg = SearchConfig(backend="auto", metric="l2", tree_threshold=500)
  idx = Index(c, 4, cfg)
  assert idx.backend == "tree" and idx.tree.num_leaves >= 2
  assert Index(c[:400], 4, cfg).backend == "brute"
  ids, d2 = Index(c, 4, SearchConfig(backend="brute", metric="l2")).search(q)
  ids_ref, d2_ref = exact_search(c, q, 4)
  np.testing.assert_array_equal(ids, ids_ref)
  np.testing.assert_allclose(d2, d2_ref, rtol=1e-4, atol=1e-3)
  full = ((q[:, None, :] - c[None]) ** 2).sum(-1)  # squared L2, not cosine: unnormalised points
  np.testing.assert_allclose(d2_ref[:, 0], full.min(1), rtol=1e-4, atol=1e-3)


def test_topk_weights_are_softmax_of_negative_squared_distance():
  c, q = _centroids_and_queries(k=50, d=8, q=30, noise=0.5, seed=4)
  r = Router(c, RouterConfig(mode="topk", topk=3, temperature=0.5, search=SearchConfig(backend="brute")))
  res = r.route(q)
  cn = c / np.linalg.norm(c, axis=1, keepdims=True)
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  d2 = ((qn[:, None] - cn[None]) ** 2).sum(-1)
  ref_ids = np.argsort(d2, axis=1)[:, :3]
  z = -np.take_along_axis(d2, ref_ids, 1) / 0.5
  ref_w = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  np.testing.assert_array_equal(res.expert_ids, ref_ids)
  np.testing.assert_allclose(res.weights, ref_w, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(res.top1, ref_ids[:, 0])


def test_knn_vote_matches_counter_reference():
  rng = np.random.default_rng(5)
  docs = rng.normal(size=(2000, 16)).astype(np.float32)
  topics = rng.integers(0, 7, 2000)
  q = rng.normal(size=(100, 16)).astype(np.float32)
  cents = np.stack([docs[topics == t].mean(0) for t in range(7)])
  cfg = RouterConfig(mode="knn", knn_k=9, search=SearchConfig(backend="brute"))
  res = Router(cents, cfg, doc_emb_nd=docs, doc_topics_n=topics).route(q)
  exact = Router(cents, cfg, doc_emb_nd=docs, doc_topics_n=topics).exact().route(q)
  np.testing.assert_array_equal(res.expert_ids, exact.expert_ids)
  dn = docs / np.linalg.norm(docs, axis=1, keepdims=True)
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  nn = np.argsort(-(qn @ dn.T), axis=1)[:, :9]
  for i in range(len(q)):
    counts = collections.Counter(topics[nn[i]].tolist())
    best = max(counts.values())
    winner = next(t for t in topics[nn[i]] if counts[t] == best)  # tie: nearest voter
    assert res.expert_ids[i, 0] == winner


def test_vote_weighted_and_ties():
  t = np.array([[2, 1, 1, 2], [0, 3, 3, 3]])
  d2 = np.array([[0.0, 0.1, 0.2, 5.0], [0.0, 2.0, 2.0, 2.0]])
  np.testing.assert_array_equal(vote(t, d2, 4, "majority"), [2, 3])
  np.testing.assert_array_equal(vote(t, d2, 4, "weighted", temperature=0.1), [2, 0])


def test_oracle_and_expert_mapping():
  c = np.eye(4, dtype=np.float32)
  r = Router(c, RouterConfig(mode="oracle"), expert_of_topic_k=np.array([0, 1, 1, -1]))
  np.testing.assert_array_equal(r.route(np.zeros((3, 4)), topics_n=[3, 2, 0]).expert_ids[:, 0], [-1, 1, 0])
  with pytest.raises(MixieError, match="oracle"):
    r.route(np.zeros((1, 4)))
  centroid = r.with_config(mode="centroid")
  np.testing.assert_array_equal(centroid.route(np.eye(4)[[3, 1]]).expert_ids[:, 0], [-1, 1])


def test_bad_config_and_inputs_fail_clearly():
  with pytest.raises(ConfigError, match="route.mode"):
    RouterConfig(mode="nearest")
  with pytest.raises(ConfigError, match="route.search"):
    SearchConfig(backend="faiss")
  with pytest.raises(MixieError, match="knn needs"):
    Router(np.eye(3), RouterConfig(mode="knn"))
  r = Router(np.eye(3), RouterConfig())
  with pytest.raises(MixieError, match=r"expects \[n, 3\]"):
    r.route(np.zeros((2, 5)))


def test_save_load_round_trip(tmp_path):
  rng = np.random.default_rng(6)
  docs = rng.normal(size=(500, 12)).astype(np.float32)
  topics = rng.integers(0, 5, 500)
  cents = np.stack([docs[topics == t].mean(0) for t in range(5)])
  r = Router(cents, RouterConfig(mode="knn", knn_k=5, route_tokens=7), doc_emb_nd=docs, doc_topics_n=topics,
             expert_of_topic_k=np.array([4, 3, 2, 1, 0]))
  r.save(tmp_path)
  r2 = Router.load(tmp_path)
  assert r2.cfg == r.cfg
  q = rng.normal(size=(50, 12))
  np.testing.assert_array_equal(r2.route(q).expert_ids, r.route(q).expert_ids)
  assert Router.load(tmp_path, mode="centroid").cfg.mode == "centroid"
  (tmp_path / "router.npz").write_bytes(b"not an npz")
  with pytest.raises(MixieError, match="router.npz"):
    Router.load(tmp_path)


class _WordTokenizer:
  """Whitespace tokenizer (a stand-in with the encode/decode interface)."""

  def __init__(self):
    self.vocab = {}

  def encode(self, text):
    return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

  def decode(self, ids):
    inv = {i: w for w, i in self.vocab.items()}
    return " ".join(inv[i] for i in ids)


class _RecordingEmbedder:
  """Bag-of-words hashing embedder that records every text it is given."""

  dim = 32

  def __init__(self):
    self.seen = []

  def embed(self, texts):
    self.seen.extend(texts)
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, t in enumerate(texts):
      for w in t.split():
        out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
    return out


def test_router_sees_only_the_prefix():
  tok, emb = _WordTokenizer(), _RecordingEmbedder()
  rng = np.random.default_rng(7)
  r = Router(rng.normal(size=(16, 32)), RouterConfig(route_tokens=5))
  words = [f"w{i}" for i in range(50)]
  docs = [" ".join(rng.choice(words, 12)) for _ in range(20)]
  changed = [" ".join(d.split()[:5] + list(rng.choice(words, 9))) for d in docs]  # new tail, other length
  a = r.route_queries(emb, tok, texts=docs)
  seen_a = list(emb.seen)
  b = r.route_queries(emb, tok, texts=changed)
  assert emb.seen[len(seen_a):] == seen_a  # the embedder got identical inputs ...
  assert all(len(s.split()) == 5 for s in seen_a)  # ... of route_tokens tokens
  np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
  ids = [tok.encode(d) for d in docs]
  np.testing.assert_array_equal(
      embed_queries(emb, tok, 5, token_ids=ids), embed_queries(emb, tok, 5, texts=docs))
  assert prefix_texts(tok, 3, token_ids=[ids[0] + [1, 2, 3]]) == [" ".join(docs[0].split()[:3])]
  # the tail does change the route when the router is allowed to see it (the test can fail)
  full = Router(r.centroids, RouterConfig(route_tokens=64))
  assert not np.array_equal(full.route_queries(emb, tok, texts=docs).expert_ids,
                            full.route_queries(emb, tok, texts=changed).expert_ids)

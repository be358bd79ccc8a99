"""Routing confidences (distance, margin to another expert, kNN vote share) equal a direct numpy
computation in every mode and with every search backend; the fallback rule and the calibration rules
equal brute-force references; bad fallback settings fail naming the field."""

import collections
import math

import numpy as np
import pytest

from configs.common import base_config
from mixie.errors import ConfigError
from mixie.route.calibrate import MIN_COVERED, choose_threshold
from mixie.route.fallback import (LORA_ALL_KEY, FallbackConfig, Policy, apply_fallback, below,
                                  fallback_expert)
from mixie.route.router import RouteResult, Router, RouterConfig
from mixie.route.search import SearchConfig

K, D = 60, 16
# topics 0..59; topics 1, 2, 3 are served by expert 1 (merged), topic 4 by the base (-1)
EOT = np.arange(K, dtype=np.int32)
EOT[[2, 3]] = 1
EOT[4] = -1


def _data(metric, seed=0, n_q=300, n_docs=3000):
  rng = np.random.default_rng(seed)
  c = rng.normal(size=(K, D)).astype(np.float32)
  c[2] = c[1] + 0.05 * rng.normal(size=D)  # merged topics sit together: the margin must skip them
  c[3] = c[1] + 0.05 * rng.normal(size=D)
  own = rng.integers(0, K, n_q)
  q = (c[own] + 0.6 * rng.normal(size=(n_q, D))).astype(np.float32)
  dt = rng.integers(0, K, n_docs)
  docs = (c[dt] + 0.8 * rng.normal(size=(n_docs, D))).astype(np.float32)
  return c, q, docs, dt


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_confidences(c, q, metric):
  """Distance to the nearest centroid and margin to the nearest centroid of another expert, from the
  full distance matrix (no index)."""
  if metric == "cosine":
    c, q = _unit(c), _unit(q)
  d = np.sqrt(((q[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1))
  order = np.argsort(d, axis=1, kind="stable")
  near = order[:, 0]
  dist = d[np.arange(len(q)), near]
  margin = np.empty(len(q))
  for i in range(len(q)):
    other = [j for j in order[i] if EOT[j] != EOT[near[i]]]
    margin[i] = d[i, other[0]] - dist[i]
  return dist, margin


def _reference_share(docs, dt, q, k, metric):
  if metric == "cosine":
    docs, q = _unit(docs), _unit(q)
  d2 = ((q[:, None, :].astype(np.float64) - docs[None]) ** 2).sum(-1)
  nb = np.argsort(d2, axis=1, kind="stable")[:, :k]
  out = []
  for row in nb:
    cnt = collections.Counter(dt[row].tolist())
    out.append(max(cnt.values()) / k)
  return np.asarray(out)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("backend", ["numpy", "brute", "tree"])
def test_confidences_match_direct_numpy_in_every_mode(metric, backend):
  c, q, docs, dt = _data(metric)
  # tree: every leaf searched and exact reordering, so it must agree exactly with the reference
  search = SearchConfig(backend=backend, metric=metric, tree_search_fraction=1.0)
  dist_ref, margin_ref = _reference_confidences(c, q, metric)
  share_ref = _reference_share(docs, dt, q, 8, metric)
  for mode in ("centroid", "topk", "knn", "oracle"):
    r = Router(c, RouterConfig(mode=mode, topk=3, knn_k=8, search=search), doc_emb_nd=docs,
               doc_topics_n=dt, expert_of_topic_k=EOT)
    res = r.route(q, topics_n=np.zeros(len(q), np.int64) if mode == "oracle" else None)
    assert res.distance.shape == res.margin.shape == res.vote_share.shape == (len(q),)
    np.testing.assert_allclose(res.distance, dist_ref, rtol=1e-4, atol=2e-4, err_msg=mode)
    np.testing.assert_allclose(res.margin, margin_ref, rtol=1e-4, atol=2e-4, err_msg=mode)
    assert (res.margin >= -1e-5).all()
    if mode == "knn":
      if backend != "tree":  # the tree's AH scoring may swap near-tied neighbours of the 3000 docs
        np.testing.assert_allclose(res.vote_share, share_ref, atol=1e-6)
      assert ((res.vote_share > 0) & (res.vote_share <= 1)).all()
    else:
      assert np.isnan(res.vote_share).all()  # documented: no kNN search outside knn mode


def test_margin_skips_centroids_of_the_same_expert():
  # query on top of topic 1; topics 2, 3 (same expert) are nearer than any other expert's centroid
  c, _, _, _ = _data("l2")
  r = Router(c, RouterConfig(search=SearchConfig(backend="brute", metric="l2")), expert_of_topic_k=EOT)
  assert r.n_confidence == 4  # one past the largest group (expert 1: topics 1, 2, 3)
  res = r.route(c[1:2])
  d = np.linalg.norm(c - c[1], axis=1)
  others = d[EOT != 1]
  assert res.distance[0] == pytest.approx(0.0, abs=1e-3)
  assert res.margin[0] == pytest.approx(others.min(), rel=1e-4)
  assert res.margin[0] > d[2] and res.margin[0] > d[3]
  one = Router(c[:1], RouterConfig(search=SearchConfig(backend="numpy"))).route(c[:3])
  assert np.isinf(one.margin).all()  # a single expert has no competitor


def test_vote_share_weighted_is_the_weight_share():
  _, q, docs, dt = _data("cosine", seed=1, n_q=50)
  r = Router(np.eye(K, D, dtype=np.float32), RouterConfig(
      mode="knn", knn_k=6, knn_vote="weighted", temperature=0.3, search=SearchConfig(backend="numpy")),
      doc_emb_nd=docs, doc_topics_n=dt)
  res = r.route(q)
  ids, d2 = r.doc_index.search(q, 6)
  for i in range(len(q)):
    w = np.exp(-(d2[i] - d2[i].min()) / 0.3)
    share = w[dt[ids[i]] == res.expert_ids[i, 0]].sum() / w.sum()
    assert res.vote_share[i] == pytest.approx(share, rel=1e-5)


def test_route_result_defaults_and_confidence_kinds():
  r = RouteResult(np.zeros((3, 1), np.int32), np.ones((3, 1), np.float32))
  assert np.isnan(r.distance).all() and np.isnan(r.margin).all() and np.isnan(r.vote_share).all()
  r = RouteResult(np.zeros((2, 1), np.int32), np.ones((2, 1), np.float32), distance=[0.5, 1.0],
                  margin=[0.1, 0.2], vote_share=[0.75, 1.0])
  np.testing.assert_allclose(r.confidence("margin"), [0.1, 0.2])
  np.testing.assert_allclose(r.confidence("distance"), [-0.5, -1.0])  # higher = surer
  np.testing.assert_allclose(r.confidence("vote"), [0.75, 1.0])
  with pytest.raises(ConfigError, match="route.confidence"):
    r.confidence("entropy")


def test_fallback_rule_below_the_threshold_only():
  r = RouteResult(np.asarray([[3, 5], [4, 1], [2, 0], [7, 6]], np.int32),
                  np.asarray([[0.7, 0.3]] * 4, np.float32), margin=[0.05, 0.5, np.nan, 0.2])
  b = Policy("base", "margin", 0.2).below(r)
  np.testing.assert_array_equal(b, [True, False, False, False])  # NaN: never below; 0.2 is not < 0.2
  np.testing.assert_array_equal(below([0.05, 0.5, np.nan, 0.2], 0.2), b)
  assert not Policy("none", "margin", 0.2).below(r).any()
  out = apply_fallback(r, b, fallback_expert("lora_all"))
  np.testing.assert_array_equal(out.expert_ids, [[LORA_ALL_KEY] * 2, [4, 1], [2, 0], [7, 6]])
  np.testing.assert_allclose(out.weights[0], [0.5, 0.5])
  np.testing.assert_allclose(out.weights[1:], r.weights[1:])
  np.testing.assert_allclose(out.margin, r.margin)  # confidences are the router's, kept
  assert fallback_expert("base") == -1


def _brute_threshold(conf, hit, rule, target):
  """Tries every candidate threshold (each distinct confidence and -inf / +inf)."""
  n = len(conf)
  best = None
  for t in sorted(set(conf.tolist())):
    cov = conf >= t
    k = int(cov.sum())
    if k < min(MIN_COVERED, n):
      continue
    good = hit[cov].mean() >= target if rule == "precision" else k >= math.ceil(target * n - 1e-9)
    if good and (best is None or (t < best if rule == "precision" else t > best)):
      best = t
  if best is None:
    return math.inf
  return -math.inf if (conf >= best).all() else best


@pytest.mark.parametrize("rule", ["precision", "coverage"])
def test_choose_threshold_equals_brute_force(rule):
  rng = np.random.default_rng(3)
  for trial in range(40):
    n = int(rng.integers(5, 80))
    conf = np.round(rng.normal(size=n), 1)  # ties on purpose
    hit = rng.random(n) < 1 / (1 + np.exp(-3 * conf))  # surer rows are right more often
    target = float(rng.choice([0.5, 0.7, 0.9, 1.0]))
    got = choose_threshold(conf, hit, rule, target)
    want = _brute_threshold(conf, hit, rule, target)
    assert got["threshold"] == want, (trial, rule, target)
    cov = conf >= got["threshold"]
    assert got["coverage"] == pytest.approx(cov.mean())
    if rule == "precision" and cov.any():
      assert got["precision"] >= target - 1e-12
    if rule == "coverage":
      assert got["coverage"] >= target - 1e-12


def test_choose_threshold_ends():
  conf = np.linspace(0, 1, 50)
  assert choose_threshold(conf, np.ones(50, bool), "precision", 0.9)["threshold"] == -math.inf
  assert choose_threshold(conf, np.zeros(50, bool), "precision", 0.5)["threshold"] == math.inf
  half = choose_threshold(conf, conf >= 0.5, "precision", 1.0)
  assert half["threshold"] == pytest.approx(conf[conf >= 0.5].min()) and half["coverage"] == 0.5
  got = choose_threshold(np.r_[conf, np.nan], np.r_[conf >= 0.5, True], "coverage", 0.2)
  assert got["docs"] == 50 and got["coverage"] == pytest.approx(0.2)


def test_bad_fallback_settings_name_the_field():
  c = base_config()
  assert FallbackConfig.from_config(c) == FallbackConfig()  # the defaults agree with the dataclass
  for field, value, msg in (("fallback", "expert0", "route.fallback"), ("confidence", "entropy",
                            "route.confidence"), ("calibrate", "auto", "route.calibrate"),
                            ("calibrate_target", 0.0, "route.calibrate_target"),
                            ("calibrate_docs", 0, "route.calibrate_docs"),
                            ("min_confidence", float("nan"), "route.min_confidence")):
    bad = base_config()
    bad.route[field] = value
    with pytest.raises(ConfigError, match=msg):
      FallbackConfig.from_config(bad)
  bad = base_config()
  bad.route.confidence = "vote"
  with pytest.raises(ConfigError, match="route.mode='knn'"):
    FallbackConfig.from_config(bad)
  bad.route.mode = "knn"
  assert FallbackConfig.from_config(bad).confidence == "vote"

"""JAX k-means against scikit-learn, sharded vs single device, balanced mode, empty-cluster re-seeding."""

import jax
import numpy as np
import pytest
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.datasets import make_blobs

from mixie.cluster import kmeans as km
from mixie.cluster.nearest import data_mesh
from mixie.errors import MixieError
from mixie.sharding import make_mesh


# One problem shape for every test, so the compiled functions are shared (compilation dominates).
K = 25
KW = dict(tol=0.0, max_iters=100, chunk=128)


@pytest.fixture(scope="module")
def blobs():
  """25 overlapping blobs of unequal sizes (20 small, 5 large) in 16 dimensions."""
  x, y = make_blobs(n_samples=[100] * 20 + [300] * 5, n_features=16, cluster_std=2.0, random_state=0)
  return x.astype(np.float32), y


@pytest.fixture(scope="module")
def mesh8():
  return make_mesh((8,), ("data",))


def _brute(x, c, metric):
  if metric == "cosine":
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    d = 1.0 - xn.astype(np.float64) @ cn.T.astype(np.float64)
  else:
    d = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
  return d.argmin(1), d.min(1)


def test_lloyd_matches_sklearn_from_the_same_init(blobs):
  """Same initial centroids: the same iterations, assignment and inertia as scikit-learn's Lloyd."""
  x, _ = blobs
  k = K
  for seed in range(3):
    c0, _ = kmeans_plusplus(x, k, random_state=seed)
    ours = km.kmeans(x, k, metric="l2", init=c0, **KW)
    ref = KMeans(k, init=c0, n_init=1, tol=0.0, max_iter=KW["max_iters"]).fit(x)
    np.testing.assert_array_equal(ours.assign_n, ref.labels_)
    np.testing.assert_allclose(ours.inertia, ref.inertia_, rtol=1e-5)
    np.testing.assert_allclose(ours.centroids_kd, ref.cluster_centers_, atol=1e-4)
    assert ours.n_iter == ref.n_iter_
    np.testing.assert_array_equal(ours.sizes_k, np.bincount(ref.labels_, minlength=k))


@pytest.mark.parametrize("init", ["k-means++", "k-means||"])
def test_inertia_within_1pct_of_sklearn(blobs, init):
  """Best of the same number of initialisations (10: with fewer, both sides vary by several % per seed)."""
  x, _ = blobs
  ours = km.kmeans(x, K, metric="l2", n_init=10, seed=0, init=init, **KW)
  ref = KMeans(K, n_init=10, tol=0.0, random_state=0).fit(x)
  assert ours.inertia <= 1.01 * ref.inertia_, (ours.inertia, ref.inertia_)
  a, dmin = _brute(x, ours.centroids_kd, "l2")  # reported figures belong to the returned centroids
  np.testing.assert_allclose(ours.inertia, dmin.sum(), rtol=1e-4)
  np.testing.assert_array_equal(a, ours.assign_n)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_sharded_equals_single_device(blobs, mesh8, metric):
  x, _ = blobs
  x = x + 5.0  # 3500 points: not a multiple of 8 devices x 128: exercises the padding
  one = km.kmeans(x, K, metric=metric, seed=3, **KW)
  eight = km.kmeans(x, K, metric=metric, seed=3, mesh=mesh8, **KW)
  np.testing.assert_array_equal(one.assign_n, eight.assign_n)
  np.testing.assert_allclose(one.inertia, eight.inertia, rtol=1e-5)
  np.testing.assert_allclose(one.centroids_kd, eight.centroids_kd, atol=1e-5)
  a, d = _brute(x, eight.centroids_kd, metric)
  np.testing.assert_array_equal(a, eight.assign_n)
  np.testing.assert_allclose(eight.inertia, d.sum(), rtol=1e-3)
  if metric == "cosine":  # spherical: unit centroids
    np.testing.assert_allclose(np.linalg.norm(eight.centroids_kd, axis=1), 1.0, atol=1e-5)


def test_balanced_caps_sizes(blobs):
  x, _ = blobs
  k, factor = K, 1.2
  cap = int(np.ceil(factor * len(x) / k))
  free = km.kmeans(x, k, metric="l2", seed=0, **KW)
  assert free.sizes_k.max() > cap  # the unequal blobs need the cap
  r = km.kmeans(x, k, metric="l2", balanced_max_size=factor, seed=0, **KW)
  assert r.sizes_k.max() <= cap and r.sizes_k.sum() == len(x)
  np.testing.assert_array_equal(r.sizes_k, np.bincount(r.assign_n, minlength=k))
  own = ((x.astype(np.float64) - r.centroids_kd[r.assign_n]) ** 2).sum(1)
  np.testing.assert_allclose(r.inertia, own.sum(), rtol=1e-4)
  _, d_free = _brute(x, r.centroids_kd, "l2")
  assert r.inertia >= d_free.sum() * (1 - 1e-6)  # capped: no better than the free assignment
  exact = km.kmeans(x, k, metric="l2", balanced_max_size=1.0, seed=0, **KW)
  assert exact.sizes_k.max() == int(np.ceil(len(x) / k))


def test_empty_clusters_are_reseeded():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(size=(100, 4)) + off for off in (0.0, 10.0, 20.0)]).astype(np.float32)
  # two identical initial centroids (ties go to the first: the second starts empty) and one far away
  init = np.stack([x[0], x[0], x[150], np.full(4, 1e3, np.float32)])
  r = km.kmeans(x, 4, metric="l2", init=init, tol=0.0)
  assert (r.sizes_k > 0).all(), r.sizes_k
  ref = KMeans(4, n_init=5, random_state=0).fit(x)
  assert r.inertia <= 1.05 * ref.inertia_


def test_assign_matches_brute_force(mesh8):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1001, 8)).astype(np.float32)
  c = rng.normal(size=(37, 8)).astype(np.float32)
  for metric in ("l2", "cosine"):
    want, dwant = _brute(x, c, metric)
    got, dgot = km.assign(x, c, metric, chunk=64, mesh=mesh8, return_dist=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(dgot, dwant, atol=1e-4)


def test_distance_chunks_never_form_n_by_k():
  """The compiled Lloyd loop holds [chunk, k] score blocks, never an [n, k] matrix."""
  n, k, d, chunk = 4096, 96, 8, 256
  mesh = data_mesh(None)
  prepare, init_fn, lloyd = km._fit_fns(mesh, n, k, "l2", chunk, "k-means||", 5, 0.0)
  x = jax.ShapeDtypeStruct((n, d), np.float32)
  w = jax.ShapeDtypeStruct((n,), np.float32)
  c = jax.ShapeDtypeStruct((k, d), np.float32)
  for text in (lloyd.lower(x, w, c).as_text(), init_fn.lower(x, jax.random.key(0)).as_text()):
    assert f"{chunk}x{k}xf32" in text
    assert f"{n}x{k}xf32" not in text


def test_bad_input():
  x = np.zeros((5, 3), np.float32)
  with pytest.raises(MixieError, match="k=6"):
    km.kmeans(x, 6)
  with pytest.raises(MixieError, match="non-empty"):
    km.kmeans(np.zeros((0, 3), np.float32), 1)
  with pytest.raises(MixieError, match="NaN"):
    km.kmeans(np.full((5, 3), np.nan, np.float32), 2)
  with pytest.raises(MixieError, match="metric"):
    km.kmeans(x, 2, metric="manhattan")
  with pytest.raises(MixieError, match="balanced_max_size"):
    km.kmeans(x, 2, balanced_max_size=0.5)

"""K-means on n x d vectors (default 100k x 384, k = 1024): mixie vs scikit-learn vs faiss-cpu, one run.

All three run Lloyd with one initialisation and the same fixed number of iterations (tolerance 0, so
none stops early unless no point moves), on the same float32 data, with squared-L2 distance.
Initialisations differ: scikit-learn greedy k-means++, mixie k-means|| (5 rounds; `--init` to change),
faiss random points (its only option). Every inertia is recomputed in float64 from the returned
centroids with the nearest-centroid assignment, so the figures are comparable.
Times include initialisation; mixie's first call (compilation) is timed separately and excluded.
scikit-learn runs with BLAS limited to one thread and with its default threads; the speedup is against
the faster of the two. Lloyd alone is also timed from scikit-learn's initial centroids on both sides.

Data: a mixture of 2 * k Gaussian clusters of unequal sizes and overlapping spread (a stand-in for
sentence embeddings; real embeddings of 100k documents are not shipped).

  python bench/kmeans.py [--n 100000 --d 384 --k 1024 --iters 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def make_data(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(2 * k, d)).astype(np.float32)
  sizes = rng.dirichlet(np.full(2 * k, 2.0)) * n
  labels = rng.choice(2 * k, size=n, p=sizes / sizes.sum())
  spread = rng.uniform(0.5, 1.5, size=2 * k).astype(np.float32)
  return (centers[labels] + rng.normal(size=(n, d)).astype(np.float32) * spread[labels, None])


def inertia64(x: np.ndarray, c: np.ndarray, chunk: int = 8192) -> float:
  """Sum of squared distances to the nearest centroid, float64."""
  x64, c64 = x.astype(np.float64), c.astype(np.float64)
  csq = (c64 * c64).sum(1)
  tot = 0.0
  for i in range(0, len(x), chunk):
    xb = x64[i:i + chunk]
    d = (xb * xb).sum(1)[:, None] - 2 * xb @ c64.T + csq[None]
    tot += float(np.maximum(d.min(1), 0).sum())
  return tot


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=100_000)
  ap.add_argument("--d", type=int, default=384)
  ap.add_argument("--k", type=int, default=1024)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--init", default="k-means||")
  ap.add_argument("--chunk", type=int, default=4096)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--skip", default="",
                  help="comma list of peers to skip: sklearn, sklearn_default (default BLAS threads), faiss")
  a = ap.parse_args()
  skip = set(filter(None, a.skip.split(",")))

  import jax

  from mixie.cluster.kmeans import kmeans

  x = make_data(a.n, a.d, a.k, a.seed)
  out = {"n": a.n, "d": a.d, "k": a.k, "iters": a.iters, "n_init": 1, "metric": "l2",
         "threads": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
         "devices": jax.device_count(), "loadavg_start": os.getloadavg()[0]}

  kw = dict(metric="l2", n_init=1, max_iters=a.iters, tol=0.0, chunk=a.chunk, seed=a.seed,
            init=a.init)
  t = time.perf_counter()
  kmeans(x, a.k, **kw)  # compile (and a full run)
  first = time.perf_counter() - t
  t = time.perf_counter()
  r = kmeans(x, a.k, **kw)
  out["mixie"] = {"seconds": time.perf_counter() - t, "first_call_seconds": first,
                  "inertia": inertia64(x, r.centroids_kd), "iters": r.n_iter, "init": a.init}

  if "sklearn" not in skip:
    import sklearn
    from sklearn.cluster import KMeans, kmeans_plusplus
    from threadpoolctl import threadpool_limits

    def run_sklearn(blas_threads):
      """KMeans(init="k-means++") timed in its two parts: the greedy k-means++ init, then Lloyd."""
      with threadpool_limits(limits=blas_threads, user_api="blas"):
        t = time.perf_counter()
        c0, _ = kmeans_plusplus(x, a.k, random_state=a.seed)
        t_init = time.perf_counter() - t
        t = time.perf_counter()
        sk = KMeans(a.k, init=c0, n_init=1, max_iter=a.iters, tol=0.0, algorithm="lloyd").fit(x)
        t_lloyd = time.perf_counter() - t
      return c0, {"seconds": t_init + t_lloyd, "init_seconds": t_init, "lloyd_seconds": t_lloyd,
                  "inertia": inertia64(x, sk.cluster_centers_), "iters": int(sk.n_iter_),
                  "init": "k-means++ (greedy)", "blas_threads": blas_threads or "default",
                  "version": sklearn.__version__}

    # BLAS limited to one thread: sklearn's k-means++ makes ~k small BLAS calls, which a 2-thread
    # OpenBLAS slows down badly on a busy machine; its Lloyd loop is OpenMP-parallel either way.
    c0, out["sklearn_blas1"] = run_sklearn(1)
    if "sklearn_default" not in skip:
      _, out["sklearn"] = run_sklearn(None)
    # Lloyd alone, from the same initial centroids: per-iteration cost, like for like
    kmeans(x, a.k, **{**kw, "init": c0})  # compile this path
    t = time.perf_counter()
    r = kmeans(x, a.k, **{**kw, "init": c0})
    out["mixie"]["lloyd_seconds_from_sklearn_init"] = time.perf_counter() - t
    out["mixie"]["inertia_from_sklearn_init"] = inertia64(x, r.centroids_kd)

  if "faiss" not in skip:
    import faiss
    t = time.perf_counter()
    fk = faiss.Kmeans(a.d, a.k, niter=a.iters, nredo=1, seed=a.seed + 1, verbose=False,
                      max_points_per_centroid=10 ** 9, min_points_per_centroid=1)
    fk.train(x)
    out["faiss"] = {"seconds": time.perf_counter() - t, "inertia": inertia64(x, fk.centroids),
                    "iters": a.iters, "init": "random points", "version": faiss.__version__}

  out["loadavg_end"] = os.getloadavg()[0]  # other work on the machine skews every timing
  m = out["mixie"]
  sk = [out[p] for p in ("sklearn", "sklearn_blas1") if p in out]
  if sk:
    best = min(sk, key=lambda r: r["seconds"])
    out["speedup_vs_sklearn_best"] = best["seconds"] / m["seconds"]
    out["inertia_ratio_vs_sklearn_best"] = m["inertia"] / best["inertia"]
    out["lloyd_speedup_vs_sklearn_same_init"] = (min(r["lloyd_seconds"] for r in sk) /
                                                 m["lloyd_seconds_from_sklearn_init"])
  if "faiss" in out:
    out["speedup_vs_faiss"] = out["faiss"]["seconds"] / m["seconds"]
    out["inertia_ratio_vs_faiss"] = m["inertia"] / out["faiss"]["inertia"]
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()

"""The router of a run: built from `workdir/topics` and the expert store, saved in `workdir/router`.

    workdir/router/router.npz    centroids, expert_of_topic (and document embeddings + topics for knn)
    workdir/router/router.json   the routing settings it was built with

Topic t is served by the expert stored for t, or by the expert it was merged into (a small topic's
`merged_topics` in that expert's metadata); a topic with neither is served by the base (-1). Store
experts beyond the clustered topics (brought in by `python -m mixie.import`) get one router row each,
their metadata's centroid, after the clustered topics' rows (`knn` votes with training documents, which
they have none of: they are reached in `centroid` and `topk` modes).
"""

from __future__ import annotations

import numpy as np

from mixie import io as mio
from mixie.distributed import is_main_process
from mixie.errors import MixieError, check
from mixie.route.router import ROUTER_JSON, Router, RouterConfig


def router_dir(workdir):
  """Where the router is written under `workdir`."""
  return mio.path(workdir) / "router"


def expert_of_topic(store, n_topics: int) -> np.ndarray:
  """Expert id of each topic `[k]` from an `ExpertStore`'s entries (-1: no expert, the base)."""
  out = np.full((n_topics,), -1, np.int32)
  for t in store.topics():
    if 0 <= t < n_topics:
      out[t] = t
      for k in store.meta(t).get("merged_topics", []):
        if 0 <= int(k) < n_topics and out[int(k)] < 0:
          out[int(k)] = t
  return out


def imported_experts(store, n_topics: int, dim: int) -> tuple[list[int], np.ndarray]:
  """Store experts beyond the `n_topics` clustered topics that carry a routing centroid (imported):
  their topic ids and centroids `[m, dim]`."""
  ids, rows = [], []
  for t in store.topics():
    c = store.meta(t).get("centroid") if t >= n_topics else None
    if c is None:
      continue  # a clustered topic, or no centroid: reachable by the oracle only
    c = np.asarray(c, np.float32)
    check(c.shape == (dim,), f"{store.entry_dir(t)}: centroid has shape {c.shape}, the router's "
                             f"embedding space has dimension {dim}")
    ids.append(t)
    rows.append(c)
  return ids, np.asarray(rows, np.float32).reshape(len(rows), dim)


def routed_experts(store, n_topics: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Expert id of every router row `[n_topics + m]` (the clustered topics' by `expert_of_topic`, then
  the imported ones) and the imported experts' centroids `[m, dim]`; each expert's metadata read once."""
  ids, centroids_md = imported_experts(store, n_topics, dim)
  return np.concatenate([expert_of_topic(store, n_topics), np.asarray(ids, np.int32)]), centroids_md


def build_router(config, store=None) -> Router:
  """A router from the run's topics (and, for knn, its training document embeddings)."""
  from mixie.cluster.topics import load_embeddings, load_topics

  cfg = RouterConfig.from_config(config)
  topics = load_topics(config.workdir)
  if topics.metric != cfg.search.metric:
    raise MixieError(f"cluster.metric={cfg.search.metric!r} but the topics of {config.workdir} were "
                     f"clustered with {topics.metric!r}; route with the clustering metric")
  k, dim = topics.centroids_kd.shape
  centroids = topics.centroids_kd
  eot = np.arange(k, dtype=np.int32)
  if store is not None:
    eot, imported_md = routed_experts(store, k, dim)
    centroids = np.concatenate([centroids, imported_md])
  doc_emb = doc_topics = None
  if cfg.mode == "knn":
    emb = load_embeddings(config.workdir)
    pos = {d: i for i, d in enumerate(emb["doc_id"].tolist())}
    train = ~topics.heldout_n
    rows = np.asarray([pos[d] for d in topics.doc_ids[train].tolist()], np.int64)
    doc_emb, doc_topics = emb["emb_nd"][rows], topics.topic_n[train]
  return Router(centroids, cfg, doc_emb_nd=doc_emb, doc_topics_n=doc_topics, expert_of_topic_k=eot)


def load_router(config, store=None) -> Router:
  """The saved router of the run when it was built with the same settings, else a fresh one (saved)."""
  d = router_dir(config.workdir)
  want = RouterConfig.from_config(config)
  if (d / ROUTER_JSON).exists():
    try:
      saved = RouterConfig.from_json(mio.read_json(d / ROUTER_JSON)["config"])
    except (MixieError, KeyError, TypeError):
      saved = None  # unreadable: rebuilt below
    if saved == want:
      router = Router.load(d)
      if store is None:
        return router
      from mixie.cluster.topics import load_topics

      k = load_topics(config.workdir).num_topics
      if np.array_equal(router.expert_of_topic, routed_experts(store, k, router.dim)[0]):
        return router
  router = build_router(config, store)
  if is_main_process():  # every process of a multi-process run builds the same router; one saves it
    router.save(d)
  return router

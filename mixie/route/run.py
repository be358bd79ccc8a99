"""The router of a run, for every mode: the one builder that generation, evaluation, export and the
analysis notebooks use.

    workdir/router/router.npz    centroids, expert_of_topic (and document embeddings + topics for knn)
    workdir/router/router.json   the routing settings it was built with

Rows: one per clustered topic (`workdir/topics`), served by the expert stored for it or by the expert it
was merged into (a small topic's `merged_topics` in that expert's metadata), else by the base (-1);
then one per store expert beyond the clustered topics that carries a routing centroid (brought in by
`python -m mixie.experts import`). `knn` votes with the run's training documents, which imported experts
have none of: they are reached in `centroid` and `topk` modes. A work directory without topics (an
imports-only store) gets a router over the store's centroids alone.

- `build_router(config, store, mode=)`: the router of `route.mode` (or `mode`);
- `build_routers(config, store, modes)`: one per mode, sharing one build (evaluation);
- `load_router(config, store)`: the saved router when it was built with the same settings and rows, else
  a fresh one, saved (generation).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from mixie import io as mio
from mixie.cluster.topics import load_embeddings, load_topics, topics_complete
from mixie.errors import ConfigError, MixieError, check
from mixie.route.router import ROUTER_JSON, Router, RouterConfig
from mixie.store import ExpertMeta, ExpertStore, run_store


def router_dir(workdir):
  """Where the router is written under `workdir`."""
  return mio.path(workdir) / "router"


def expert_of_topic(store: ExpertStore, n_topics: int,
                    metas: Mapping[int, ExpertMeta] | None = None) -> np.ndarray:
  """Expert id of each clustered topic `[k]` from the store's entries (-1: no expert, the base)."""
  metas = store.metas() if metas is None else metas
  out = np.full((n_topics,), -1, np.int32)
  for t, m in metas.items():
    if 0 <= t < n_topics:
      out[t] = t
      for k in m.merged_topics or ():
        if 0 <= k < n_topics and out[k] < 0:
          out[k] = t
  return out


def imported_experts(store: ExpertStore, n_topics: int, dim: int,
                     metas: Mapping[int, ExpertMeta] | None = None) -> tuple[list[int], np.ndarray]:
  """Store experts beyond the `n_topics` clustered topics that carry a routing centroid (imported):
  their ids and centroids `[m, dim]`."""
  metas = store.metas() if metas is None else metas
  ids, rows = [], []
  for t, m in metas.items():
    if t < n_topics or m.centroid is None:
      continue  # a clustered topic, or no centroid: reachable by the oracle only
    c = np.asarray(m.centroid, np.float32)
    check(c.shape == (dim,), f"{store.entry_dir(t)}: centroid has shape {c.shape}, the router's "
                             f"embedding space has dimension {dim}")
    ids.append(t)
    rows.append(c)
  return ids, np.asarray(rows, np.float32).reshape(len(rows), dim)


def routed_experts(store: ExpertStore, n_topics: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Expert id of every router row `[n_topics + m]` (the clustered topics' by `expert_of_topic`, then
  the imported ones) and the imported experts' centroids `[m, dim]`; each expert's metadata read once."""
  metas = store.metas()
  ids, centroids_md = imported_experts(store, n_topics, dim, metas)
  return np.concatenate([expert_of_topic(store, n_topics, metas), np.asarray(ids, np.int32)]), centroids_md


def router_config(config, mode: str | None = None) -> RouterConfig:
  """The routing settings of `config` (`route.*`, `cluster.metric`), with `mode` for `route.mode`."""
  cfg = RouterConfig.from_config(config)
  return cfg if mode is None else dataclasses.replace(cfg, mode=mode)


def _store_router(store: ExpertStore, cfg: RouterConfig) -> Router:
  """A router over the store's own centroids (a run with no clustered topics, e.g. imports only)."""
  metas = {t: m for t, m in store.metas().items() if m.centroid is not None}
  check(bool(metas), f"expert store {store.dir}: no expert has a routing centroid, and {store.dir.parent} "
                     "has no topics to route with")
  check(cfg.mode != "knn", f"route.mode=knn votes with the run's training documents, and "
                           f"{store.dir.parent} has no topics: route with centroid or topk", ConfigError)
  cents = np.stack([np.asarray(m.centroid, np.float32) for m in metas.values()])
  return Router(cents, cfg, expert_of_topic_k=np.asarray(list(metas), np.int32))


def build_router(config, store: ExpertStore | None = None, *, mode: str | None = None) -> Router:
  """The router of the run in `config.workdir` (see the module docstring) for `route.mode`, or `mode`.

  `store`: the run's expert store (default `workdir/experts`).
  """
  cfg = router_config(config, mode)
  store = store if store is not None else run_store(config.workdir)
  if not topics_complete(config.workdir):
    return _store_router(store, cfg)
  topics = load_topics(config.workdir)
  if topics.metric != cfg.search.metric:
    raise MixieError(f"cluster.metric={cfg.search.metric!r} but the topics of {config.workdir} were "
                     f"clustered with {topics.metric!r}; route with the clustering metric")
  k, dim = topics.centroids_kd.shape
  eot, imported_md = routed_experts(store, k, dim)
  centroids = np.concatenate([topics.centroids_kd, imported_md])
  doc_emb = doc_topics = None
  if cfg.mode == "knn":
    emb = load_embeddings(config.workdir)
    pos = {d: i for i, d in enumerate(emb["doc_id"].tolist())}
    train = ~topics.heldout_n
    rows = np.asarray([pos[d] for d in topics.doc_ids[train].tolist()], np.int64)
    doc_emb, doc_topics = emb["emb_nd"][rows], topics.topic_n[train]
  return Router(centroids, cfg, doc_emb_nd=doc_emb, doc_topics_n=doc_topics, expert_of_topic_k=eot)


def build_routers(config, store: ExpertStore | None, modes: Sequence[str]) -> dict[str, Router]:
  """One router per mode of `modes` over the same rows, built once (with the training documents when
  `knn` is among them)."""
  if not modes:
    return {}
  first = build_router(config, store, mode="knn" if "knn" in modes else modes[0])
  return {m: first if m == first.cfg.mode else first.with_config(mode=m) for m in modes}


def load_router(config, store: ExpertStore | None = None) -> Router:
  """The saved router of the run when it was built with the same settings and routes to the store's
  current experts, else a fresh one (saved)."""
  d = router_dir(config.workdir)
  store = store if store is not None else run_store(config.workdir)
  want = router_config(config)
  if (d / ROUTER_JSON).exists() and topics_complete(config.workdir):
    try:
      saved = RouterConfig.from_json(mio.read_json(d / ROUTER_JSON)["config"])
    except (MixieError, KeyError, TypeError):
      saved = None  # unreadable: rebuilt below
    if saved == want:
      router = Router.load(d)
      k = load_topics(config.workdir).num_topics
      if np.array_equal(router.expert_of_topic, routed_experts(store, k, router.dim)[0]):
        return router
  router = build_router(config, store)
  router.save(d)
  return router

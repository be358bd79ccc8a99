"""`python -m mixie.experts add --docs new.jsonl`: new documents join the run's topics or form new ones;
only the affected experts train; one new generation of the store.

Assignment (`plan_batch`), in the space the topics were clustered in (the run's embedder on each
document's first `cluster.embed_tokens` tokens; unit vectors under the cosine metric):
- Join: a document joins its nearest topic when its distance to that topic's centroid is at most the
  topic's radius: the `lifecycle.join_quantile` quantile of the distances of the topic's own training
  documents to its centroid (for a topic an earlier `add` made: of its own documents). Candidates are
  the clustered topics that have an expert and the topics of earlier adds, except retired experts'.
- New topics: the other documents are clustered by k-means (the run's `cluster.*` settings) into
  k = max(1, round(n / m)) topics, m = `lifecycle.new_topic_docs`, or (0) the run's median training
  documents per topic, so that new topics are about as large as the run's; a new topic with fewer tokens
  than one training batch (b x T) is merged into its nearest new topic (`resolve_small_topics`). When
  all of them together hold less than one batch, they join their nearest topics instead.
- Each new topic gets a fresh expert with a new id after every clustered topic and stored expert; its
  routing centroid is the (renormalised) mean of its documents' embeddings.
Training (`mixie.lifecycle.train`): the new topics' experts, and with `lifecycle.retrain_joined` also
the experts of the topics documents joined (on their old data plus the joined documents; otherwise they
keep their weights, and `retrain --topic N` uses the documents later). Every other expert stays the very
same file. The router reaches the new experts by their centroids, and its kNN index holds the added
documents (`mixie.route.run`). The batch is kept in `workdir/added/` (`mixie.lifecycle.batches`).
Rerunning the same `add` resumes an interrupted one, and does nothing after a finished one.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from mixie.cluster import kmeans as km
from mixie.cluster.topics import load_embeddings, load_topics, topics_complete
from mixie.data.dataset import tokenize_records
from mixie.data.loader import resolve_small_topics
from mixie.errors import ConfigError, MixieError, check
from mixie.interop.importer import next_topic_id, read_docs, run_embedder
from mixie.lifecycle import batches as lb
from mixie.lifecycle.train import LoadedRun, finish, load_run, train_topics
from mixie.route.run import expert_of_topic
from mixie.route.search import l2_normalize
from mixie.store import ExpertStore, run_store


def validate_config(config) -> None:
  """Checks the `lifecycle` settings (ConfigError naming the field)."""
  q = config.lifecycle.join_quantile
  check(isinstance(q, (int, float)) and 0.0 < q <= 1.0,
        f"lifecycle.join_quantile must be in (0, 1], got {q!r}", ConfigError)
  m = config.lifecycle.new_topic_docs
  check(isinstance(m, int) and m >= 0, f"lifecycle.new_topic_docs must be an integer >= 0, got {m!r}",
        ConfigError)


def batch_id(texts: Sequence[str]) -> str:
  """The batch name of a list of documents: `add-` and a hash of their texts (the same documents are
  the same batch: a rerun resumes it)."""
  h = hashlib.sha256()
  for t in texts:
    h.update(t.encode("utf-8") + b"\0")
  return f"add-{h.hexdigest()[:12]}"


def _space(x_nd: np.ndarray, metric: str) -> np.ndarray:
  return l2_normalize(x_nd).astype(np.float64) if metric == "cosine" else np.asarray(x_nd, np.float64)


def _dist(x_nd: np.ndarray, c_kd: np.ndarray) -> np.ndarray:
  """Euclidean distances `[n, k]`."""
  d2 = (x_nd * x_nd).sum(1)[:, None] - 2.0 * x_nd @ c_kd.T + (c_kd * c_kd).sum(1)[None, :]
  return np.sqrt(np.maximum(d2, 0.0))


def topic_radius(x_nd: np.ndarray, centroid_d: np.ndarray, q: float) -> float:
  """The join radius of a topic: the `q` quantile of its documents' distances to its centroid."""
  return float(np.quantile(_dist(x_nd, centroid_d[None, :])[:, 0], q)) if len(x_nd) else 0.0


def join_targets(config, store: ExpertStore, metric: str) -> tuple[list[int], np.ndarray, np.ndarray]:
  """The topics added documents may join: ids, centroids `[k, d]` and radii `[k]` (module docstring)."""
  q = float(config.lifecycle.join_quantile)
  topics = load_topics(config.workdir)
  emb = load_embeddings(config.workdir)
  pos = {d: i for i, d in enumerate(emb["doc_id"].tolist())}
  train = ~topics.heldout_n
  x = _space(emb["emb_nd"][[pos[d] for d in topics.doc_ids[train].tolist()]], metric)
  t_n = topics.topic_n[train]
  cents = _space(topics.centroids_kd, metric)
  eot = expert_of_topic(store, topics.num_topics)
  retired = store.retired()
  ids, cs, radii = [], [], []
  for k in range(topics.num_topics):
    if eot[k] >= 0 and int(eot[k]) not in retired:
      ids.append(k)
      cs.append(cents[k])
      radii.append(topic_radius(x[t_n == k], cents[k], q))
  for b in lb.store_batches(store):
    for t in lb.read_batch(config.workdir, b)["new_topics"]:
      if t["topic"] in store and t["topic"] not in retired:
        ids.append(int(t["topic"]))
        cs.append(_space(np.asarray([t["centroid"]]), metric)[0])
        radii.append(float(t["radius"]))
  check(bool(ids), f"{config.workdir}: no topic can take new documents (every expert is retired?)")
  return ids, np.stack(cs), np.asarray(radii)


def new_topic_count(config, n_docs: int) -> int:
  """k of the new documents' k-means: max(1, round(n / m)) (module docstring), at most n."""
  m = int(config.lifecycle.new_topic_docs)
  if m == 0:
    m = max(1, int(np.median(load_topics(config.workdir).sizes_k)))
  return int(min(n_docs, max(1, round(n_docs / m))))


def _new_topics(config, x_nd, tok_counts, first_id: int, min_tokens: int, metric: str):
  """k-means of the documents that joined no topic; small clusters merged. Returns (topic of each
  document [n], [(id, centroid [d])], k asked)."""
  cc = config.cluster
  k = new_topic_count(config, len(x_nd))
  r = km.kmeans(x_nd.astype(np.float32), k, metric=metric, n_init=int(cc.n_init), max_iters=int(cc.max_iters),
                tol=float(cc.tol), chunk=int(cc.chunk), seed=int(config.seed))
  counts = np.bincount(r.assign_n, weights=tok_counts, minlength=k)
  cmap, _ = resolve_small_topics(counts, r.centroids_kd, min_tokens, "merge")
  kept = np.unique(cmap[r.assign_n])
  new_id = {int(c): first_id + i for i, c in enumerate(kept)}
  topic_n = np.asarray([new_id[int(cmap[a])] for a in r.assign_n], np.int32)
  out = []
  for c in kept:
    c_d = x_nd[cmap[r.assign_n] == c].mean(0)
    out.append((new_id[int(c)], c_d / max(np.linalg.norm(c_d), 1e-12) if metric == "cosine" else c_d))
  return topic_n, out, k


def plan_batch(config, run: LoadedRun, store: ExpertStore, texts: Sequence[str], batch: str,
               log=print) -> dict[str, Any]:
  """Embeds, assigns, clusters and tokenizes the documents and writes the batch (module docstring);
  returns its `batch.json`."""
  topics = load_topics(config.workdir)
  metric, q = topics.metric, float(config.lifecycle.join_quantile)
  embedder = run_embedder(config, (run.cfg, run.base, run.tokenizer))
  log(f"mixie.experts add: embedding {len(texts)} documents")
  emb = np.asarray(embedder.embed(list(texts)), np.float32)
  x = _space(emb, metric)
  ids, cents, radii = join_targets(config, store, metric)
  d_nk = _dist(x, cents)
  near = np.argmin(d_nk, axis=1)
  d_near = d_nk[np.arange(len(x)), near]
  joined = d_near <= radii[near]
  recs = list(tokenize_records(((str(i), t, 0) for i, t in enumerate(texts)), run.tokenizer))
  tokens = [r["tokens"] for r in recs]
  tok_n = np.asarray([len(t) for t in tokens], np.float64)
  min_tokens = int(config.train.batch_per_slot) * int(config.dataset.seq_len)
  topic_n = np.where(joined, np.asarray(ids)[near], -1).astype(np.int32)
  how = np.where(joined, "joined", "new").astype(object)
  new_topics, k_asked = [], 0
  novel = ~joined
  if novel.any() and tok_n[novel].sum() >= min_tokens:
    first = next_topic_id(store, topics.num_topics)
    t_new, made, k_asked = _new_topics(config, x[novel], tok_n[novel], first, min_tokens, metric)
    topic_n[novel] = t_new
    for t, c in made:
      members = x[novel][t_new == t]
      new_topics.append({"topic": int(t), "centroid": np.asarray(c, np.float64).tolist(),
                         "docs": int(len(members)), "tokens": int(tok_n[novel][t_new == t].sum()),
                         "radius": topic_radius(members, np.asarray(c), q)})
  elif novel.any():  # too few tokens for an expert of their own: they join their nearest topics
    topic_n[novel] = np.asarray(ids)[near[novel]]
    how[novel] = "nearest"
  joined_topics = sorted({int(t) for t in topic_n[how != "new"].tolist()})
  info = {"batch": batch, "docs": len(texts), "tokens": int(tok_n.sum()), "metric": metric,
          "base_generation": store.generation,
          "rule": {"join_quantile": q, "new_topic_docs": int(config.lifecycle.new_topic_docs),
                   "k_asked": int(k_asked), "min_tokens": min_tokens},
          "radii": {str(t): float(r) for t, r in zip(ids, radii)},
          "joined": {str(t): int((topic_n[how != "new"] == t).sum()) for t in joined_topics},
          "nearest_only": int((how == "nearest").sum()), "new_topics": new_topics}
  lb.write_batch(config.workdir, batch, ids=[f"{batch}/{i}" for i in range(len(texts))], texts=texts,
                 how=how.tolist(), emb_nd=emb, topic_n=topic_n, tokens=tokens, info=info)
  return info


def _reusable(info: dict[str, Any], store: ExpertStore) -> bool:
  """Whether a written batch can be trained and committed as planned (its new ids are still free)."""
  return not any(t["topic"] in store for t in info["new_topics"])


def add_documents(config, docs, *, loaded=None, log=print) -> dict[str, Any]:
  """`add` (module docstring): `docs` is a .jsonl / .txt file or a directory of .txt files. Returns a
  summary: the batch, its assignment, the experts trained and the generation committed."""
  validate_config(config)
  check(topics_complete(config.workdir), f"{config.workdir}: no topics to add documents to; train the "
                                         "run first (python -m mixie.train)")
  texts = read_docs(docs, config.data.text_field)
  batch = batch_id(texts)
  store = run_store(config.workdir)
  if batch in lb.store_batches(store):
    log(f"mixie.experts add: {docs} was added already (batch {batch}, in generation {store.generation})")
    return {"batch": batch, "generation": store.generation, "status": "already added"}
  run = load_run(config, loaded)
  info = lb.read_batch(config.workdir, batch) if lb.batch_complete(config.workdir, batch) else None
  if info is None or not _reusable(info, store):
    info = plan_batch(config, run, store, texts, batch, log=log)
  new = [t["topic"] for t in info["new_topics"]]
  log(f"mixie.experts add: {info['docs']} documents: {sum(info['joined'].values())} join topics "
      f"{sorted(map(int, info['joined']))}, {sum(t['docs'] for t in info['new_topics'])} form new topic(s) "
      f"{new}")
  train = list(new)
  if config.lifecycle.retrain_joined:
    eot = expert_of_topic(store, load_topics(config.workdir).num_topics)
    train += sorted({int(eot[int(t)]) if int(t) < eot.size else int(t) for t in info["joined"]} - set(new))
  gen, seconds = None, 0.0
  extra = {**store.extra, lb.ADDED_KEY: lb.store_batches(store) + [batch]}
  message = f"add {info['docs']} documents ({batch}): new expert(s) {new}, retrained {train[len(new):]}"
  if train:
    res, staging = train_topics(config, run, store, train, batch, pending=[batch],
                                centroids={t["topic"]: t["centroid"] for t in info["new_topics"]}, log=log)
    seconds = res.seconds
    if res.status != "finished":
      log(f"mixie.experts add: stopped ({res.status}); rerun the same command to resume")
      return {"batch": batch, "status": res.status}
    gen = staging.commit(message, extra=extra)
  else:
    gen = store.commit(message, extra=extra)
  finish(config, batch)
  log(f"mixie.experts add: generation {gen} of {store.dir}: {message}")
  return {"batch": batch, "status": "finished", "generation": gen, "new_topics": new, "trained": train,
          "joined": info["joined"], "train_seconds": round(seconds, 1)}


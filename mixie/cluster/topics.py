"""The `mixie.cluster` stage: corpus -> embeddings -> topics -> clustered dataset, into `workdir`.

    workdir/topics/
      embeddings.npz     doc_id (U16) [N], emb_nd float32 [N, d], heldout bool [N], label int32 [N]
                         (-1: none), in corpus order (held-out documents included)
      labels.json        reference label names (index = label id), [] when the corpus has none
      embedder/          the embedder (`load_embedder`): embedder.json (+ TF-IDF arrays)
      centroids.npy      float32 [K, d] in the embedding space (unit rows for metric=cosine)
      assignment.npz     doc_id [N], topic int32 [N], heldout bool [N] (held-out documents are assigned
                         to their nearest centroid; clustering is fitted on training documents only)
      sizes.json         training documents per topic [K]
      quality.json       silhouette (sample), NMI / ARI against labels, sizes, what HDBSCAN found
      small_topics.json  topics with fewer tokens than one training batch and what happens to them
      steps.jsonl        one line per step run or skipped
      done/{embed,cluster,dataset}.json   completion markers: the settings each step was run with
    workdir/dataset/     the tokenized clustered dataset (`mixie.data.dataset`, its own manifest.json)

Every file is written atomically and a step's marker is written after all its outputs, so a killed
run re-run redoes only the unfinished steps. Running a step first removes the markers of the steps after
it. A marker whose settings differ from the config is an error (naming the fields), never silently
overwritten: topics that experts were trained on must not change under them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from typing import Any

import numpy as np

from mixie import io as mio
from mixie.cluster import kmeans as km
from mixie.cluster.embed import make_embedder, validate_cluster_embed_config
from mixie.cluster.hdbscan import umap_hdbscan
from mixie.cluster.kmeans import METRICS
from mixie.cluster.metrics import cluster_quality
from mixie.data import dataset as ds
from mixie.data.corpus import corpus_report, load_corpus, validate_data_config
from mixie.data.dataset import topic_token_counts
from mixie.data.loader import resolve_small_topics
from mixie.errors import ConfigError, MixieError, check
from mixie.model.llama import PRESETS
from mixie.model.load import has_shipped_vocab, load_base, load_tokenizer
from mixie.sharding import make_mesh
from mixie.validate import check_run_inputs

METHODS = ("kmeans", "hdbscan")
STEPS = ("embed", "cluster", "dataset")


# ---------------------------------------------------------------------------------------------------
# Paths and loading (for later stages).


def topics_dir(workdir) -> Any:
  """Where the cluster stage writes its topics under `workdir`."""
  return mio.path(workdir) / "topics"


def dataset_dir(workdir) -> Any:
  """Where the cluster stage writes the tokenized per-topic dataset under `workdir`."""
  return mio.path(workdir) / "dataset"


@dataclasses.dataclass
class Topics:
  """The topics of a work directory (`load_topics`)."""

  centroids_kd: np.ndarray
  doc_ids: np.ndarray  # U16 [N]
  topic_n: np.ndarray  # int32 [N]
  heldout_n: np.ndarray  # bool [N]
  sizes_k: np.ndarray  # training documents per topic
  metric: str
  quality: dict

  @property
  def num_topics(self) -> int:
    """Number of topics K (rows of the centroid matrix)."""
    return int(self.centroids_kd.shape[0])


def topics_complete(workdir) -> bool:
  """Whether the topics (embed + cluster steps) of `workdir` are complete."""
  d = topics_dir(workdir)
  return (d / "done" / "embed.json").exists() and (d / "done" / "cluster.json").exists()


def load_topics(workdir) -> Topics:
  """The topics written by `run_cluster`; `MixieError` when missing or incomplete."""
  d = topics_dir(workdir)
  if not topics_complete(workdir):
    raise MixieError(f"{d}: no complete topics; run `python -m mixie.cluster --config=...` first")
  marker = mio.read_json(d / "done" / "cluster.json")
  a = mio.load_arrays(d / "assignment.npz")
  try:
    with (d / "centroids.npy").open("rb") as f:
      c = np.load(f, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise MixieError(f"{d / 'centroids.npy'}: corrupt ({e})") from None
  return Topics(centroids_kd=c, doc_ids=a["doc_id"], topic_n=a["topic"], heldout_n=a["heldout"],
                sizes_k=np.asarray(mio.read_json(d / "sizes.json"), np.int64),
                metric=marker["settings"]["cluster.metric"], quality=mio.read_json(d / "quality.json"))


def load_embeddings(workdir) -> dict[str, np.ndarray]:
  """`embeddings.npz` of a work directory (doc_id, emb_nd, heldout, label)."""
  d = topics_dir(workdir)
  check((d / "done" / "embed.json").exists(), f"{d}: no complete embeddings; run mixie.cluster first")
  return mio.load_arrays(d / "embeddings.npz")


# ---------------------------------------------------------------------------------------------------
# Config validation.


def _int(c, section, field, lo):
  v = c[section][field]
  if not isinstance(v, int) or isinstance(v, bool) or v < lo:
    raise ConfigError(f"{section}.{field} must be an integer >= {lo}, got {v!r}")
  return v


def validate_config(config) -> None:
  """Checks the settings this stage uses before any work; `ConfigError` names the field."""
  if not config.get("workdir"):
    raise ConfigError("workdir must be set (--workdir or config.workdir)")
  validate_data_config(config.data)
  cc = config.cluster
  validate_cluster_embed_config(cc)
  if cc.method not in METHODS:
    raise ConfigError(f"cluster.method must be one of {METHODS}, got {cc.method!r}")
  if cc.metric not in METRICS:
    raise ConfigError(f"cluster.metric must be one of {METRICS}, got {cc.metric!r}")
  for field, lo in (("k", 1), ("n_init", 1), ("max_iters", 1), ("chunk", 8), ("umap_dim", 1),
                    ("umap_neighbors", 2), ("min_cluster_size", 2), ("silhouette_sample", 0)):
    _int(config, "cluster", field, lo)
  if not float(cc.tol) >= 0:
    raise ConfigError(f"cluster.tol must be >= 0, got {cc.tol!r}")
  if cc.balanced_max_size and not float(cc.balanced_max_size) >= 1.0:
    raise ConfigError(f"cluster.balanced_max_size must be 0 (off) or >= 1, got {cc.balanced_max_size!r}")
  if config.model.source == "random":  # the dataset is tokenized with the shipped SmolLM2 tokenizer
    preset = PRESETS.get(config.model.preset)
    if preset is not None and not has_shipped_vocab(preset):
      raise ConfigError(
          f"model.preset={config.model.preset!r} with model.source='random' has no tokenizer (its "
          f"vocabulary of {preset.vocab_size} differs from the shipped SmolLM2 tokenizer's "
          f"{PRESETS['smollm2_135m'].vocab_size}), so no dataset can be built for it")
  max_docs = int(config.data.max_docs)
  if cc.method == "kmeans" and max_docs and cc.k > max_docs:
    raise ConfigError(f"cluster.k={cc.k} is larger than data.max_docs={max_docs}: "
                      "k-means needs at least k documents")
  check_run_inputs(config)  # corpus, base headers, tokenizer: a bad input fails before any compute


def _check_against_corpus(config, n_train: int) -> None:
  cc = config.cluster
  if cc.method == "kmeans" and cc.k > n_train:
    raise ConfigError(f"cluster.k={cc.k} is larger than the number of training documents ({n_train}): "
                      "lower cluster.k or use more documents")
  if cc.method == "hdbscan" and n_train <= max(cc.umap_neighbors, cc.umap_dim + 1, cc.min_cluster_size):
    raise ConfigError(f"cluster.method='hdbscan' needs more than max(cluster.umap_neighbors, "
                      f"cluster.umap_dim + 1, cluster.min_cluster_size) training documents, got {n_train}")


# ---------------------------------------------------------------------------------------------------
# Step settings (what a marker records) and markers.


def _plain(x):
  return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def step_settings(config) -> dict[str, dict]:
  """The config fields (flat `section.field` names) each step's output depends on; a step includes
  the fields of the steps before it."""
  cc = config.cluster
  embed = {f"data.{k}": v for k, v in _plain(config.data.to_dict()).items()}
  embed.update({"cluster.embedder": cc.embedder, "cluster.embed_tokens": cc.embed_tokens})
  model = {f"model.{k}": config.model.get(k) for k in ("source", "path", "preset")}
  if cc.embedder == "tfidf":
    embed.update({"cluster.tfidf_dim": cc.tfidf_dim, "seed": config.seed})
  if cc.embedder == "base":
    embed.update(model)
  fields = ["method", "metric", "silhouette_sample"]
  fields += (["k", "n_init", "max_iters", "tol", "balanced_max_size"] if cc.method == "kmeans" else
             ["umap_dim", "umap_neighbors", "min_cluster_size"])
  cluster = {**embed, "seed": config.seed, **{f"cluster.{f}": _plain(cc[f]) for f in fields}}
  return {"embed": embed, "cluster": cluster, "dataset": {**cluster, **model}}


def _diff(old: dict, new: dict) -> list[str]:
  return [f"{k}={old.get(k)!r} there, {new.get(k)!r} in the config"
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class _Steps:
  """Completion markers and the step log of one work directory."""

  def __init__(self, workdir, settings: dict[str, dict]):
    self.dir = topics_dir(workdir)
    self.settings = settings
    self.log: list[dict] = []

  def marker(self, step):
    return self.dir / "done" / f"{step}.json"

  def done(self, step) -> bool:
    """True when `step` completed with these settings; `ConfigError` when with other settings."""
    m = self.marker(step)
    if not m.exists():
      return False
    try:
      old = mio.read_json(m)["settings"]
    except (MixieError, KeyError, TypeError):
      return False  # unreadable marker: redo the step
    diffs = _diff(old, self.settings[step])
    if diffs:
      raise ConfigError(
          f"{self.dir}: the {step} step was run with other settings ({'; '.join(diffs[:4])}). "
          "Use a fresh --workdir, or delete the topics (and anything trained on them) to redo it")
    return True

  def start(self, step) -> float:
    for later in STEPS[STEPS.index(step):]:
      if self.marker(later).exists():
        self.marker(later).unlink()
    return time.time()

  def finish(self, step, t0: float, extra: dict | None = None) -> None:
    rec = {"step": step, "settings": self.settings[step], "seconds": round(time.time() - t0, 3),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
    mio.atomic_write_json(self.marker(step), rec)
    self._log(step, "ran", rec["seconds"])

  def skip(self, step) -> None:
    self._log(step, "skipped", 0.0)

  def _log(self, step, status, seconds):
    entry = {"step": step, "status": status, "seconds": seconds,
             "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    self.log.append(entry)
    p = self.dir / "steps.jsonl"
    old = p.read_text() if p.exists() else ""
    mio.atomic_write_text(p, old + json.dumps(entry) + "\n")


# ---------------------------------------------------------------------------------------------------
# The stage.


def stage_mesh(config):
  """The mesh of this stage: every device on `data` (batches and points are sharded over it), times the
  config's `model` axis (a base too large to replicate is sharded over it by `mesh.rules`)."""
  shape = dict(zip(tuple(config.mesh.axes), tuple(config.mesh.shape)))
  model = shape.get("model", 1)
  model = model if isinstance(model, int) and model > 0 else 1
  return make_mesh((-1, model), ("data", "model"))


def _base_tokenizer(model_cfg):
  """The base model's tokenizer alone (no weights loaded) for tokenizing the dataset."""
  return load_tokenizer(model_cfg.source, model_cfg.path, model_cfg.get("preset", ""))


def _min_batch_tokens(config) -> int:
  return int(config.train.batch_per_slot) * int(config.dataset.seq_len)


def run_cluster(config, *, log=print) -> dict[str, Any]:
  """Runs the missing steps of the stage into `config.workdir`; returns a JSON-able summary.

  Steps: embed (corpus -> embeddings + saved embedder), cluster (-> centroids, assignment, sizes,
  quality), dataset (-> tokenized clustered dataset). Finished steps are skipped.
  """
  validate_config(config)
  settings = step_settings(config)
  steps = _Steps(config.workdir, settings)
  d = steps.dir
  cc = config.cluster
  mesh = None
  corpus = None

  def get_mesh():
    nonlocal mesh
    if mesh is None:
      mesh = stage_mesh(config)
    return mesh

  def get_corpus():
    nonlocal corpus
    if corpus is None:
      corpus = load_corpus(config.data)
      log(f"mixie.cluster: {corpus_report(config.data, corpus.stats)}")
      _check_against_corpus(config, int((~corpus.heldout).sum()))
    return corpus

  # --- embed --------------------------------------------------------------------------------------
  if steps.done("embed"):
    steps.skip("embed")
  else:
    t0 = steps.start("embed")
    corp = get_corpus()

    base = None
    if cc.embedder == "base":
      base = load_base(config.model, mesh=get_mesh(), rules=tuple(config.mesh.rules), seed=config.seed)
    train_texts = [corp.texts[i] for i in corp.train_indices()]
    log(f"mixie.cluster: embedding {len(corp)} documents with {cc.embedder} "
        f"(first {cc.embed_tokens} tokens)")
    embedder = make_embedder(cc, fit_texts=train_texts, base=base, mesh=get_mesh(), seed=config.seed)
    emb_nd = embedder.embed(corp.texts)
    if corp.labels is not None:
      label_n, names = corp.label_ids()
    else:
      label_n, names = np.full(len(corp), -1, np.int32), []
    embedder.save(d / "embedder")
    mio.atomic_write_json(d / "labels.json", names)
    mio.save_arrays(d / "embeddings.npz", {"doc_id": np.asarray(corp.ids, "U16"), "emb_nd": emb_nd,
                                           "heldout": corp.heldout, "label": label_n})
    steps.finish("embed", t0, {"num_docs": len(corp), "dim": int(emb_nd.shape[1]),
                               "corpus_stats": _plain(corp.stats)})

  # --- cluster ------------------------------------------------------------------------------------
  if steps.done("cluster"):
    steps.skip("cluster")
  else:
    t0 = steps.start("cluster")
    e = mio.load_arrays(d / "embeddings.npz")
    train = ~e["heldout"]
    _check_against_corpus(config, int(train.sum()))
    x_nd = e["emb_nd"]

    extra: dict[str, Any] = {}
    log(f"mixie.cluster: clustering {int(train.sum())} training documents ({cc.method})")
    if cc.method == "kmeans":
      r = km.kmeans(x_nd[train], cc.k, metric=cc.metric, n_init=cc.n_init, max_iters=cc.max_iters,
                    tol=float(cc.tol), balanced_max_size=float(cc.balanced_max_size), chunk=cc.chunk,
                    seed=config.seed, mesh=get_mesh())
      extra = {"inertia": r.inertia, "iterations": r.n_iter}
    else:
      r = umap_hdbscan(x_nd[train], umap_dim=cc.umap_dim, umap_neighbors=cc.umap_neighbors,
                       min_cluster_size=cc.min_cluster_size, metric=cc.metric, seed=config.seed,
                       chunk=cc.chunk)
      extra = {"hdbscan_topics_found": r.num_topics, "hdbscan_noise_points": r.num_noise}
      log(f"mixie.cluster: HDBSCAN found {r.num_topics} topics ({r.num_noise} noise points joined "
          "their nearest topic)")
    centroids = r.centroids_kd
    topic_n = np.zeros(x_nd.shape[0], np.int32)
    topic_n[train] = r.assign_n
    if (~train).any():
      topic_n[~train] = km.assign(x_nd[~train], centroids, cc.metric, cc.chunk, mesh=get_mesh())
    labels = e["label"][train] if (e["label"] >= 0).any() else None
    quality = cluster_quality(x_nd[train], r.assign_n, labels, metric=cc.metric,
                              sample=cc.silhouette_sample, seed=config.seed)
    quality.update(method=cc.method, embedder=cc.embedder, **extra)
    if labels is not None and (e["heldout"]).any() and (e["label"][~train] >= 0).all():
      from sklearn.metrics import normalized_mutual_info_score
      quality["heldout_nmi"] = float(normalized_mutual_info_score(e["label"][~train], topic_n[~train]))
    sizes = np.bincount(r.assign_n, minlength=centroids.shape[0])
    buf = io.BytesIO()
    np.save(buf, centroids.astype(np.float32), allow_pickle=False)
    mio.atomic_write_bytes(d / "centroids.npy", buf.getvalue())
    mio.save_arrays(d / "assignment.npz", {"doc_id": e["doc_id"], "topic": topic_n,
                                           "heldout": e["heldout"]})
    mio.atomic_write_json(d / "sizes.json", sizes.tolist())
    mio.atomic_write_json(d / "quality.json", quality)
    steps.finish("cluster", t0, {"num_topics": int(centroids.shape[0])})

  # --- dataset ------------------------------------------------------------------------------------
  out = dataset_dir(config.workdir)
  if steps.done("dataset") and _dataset_ok(out, log):
    steps.skip("dataset")
  else:
    t0 = steps.start("dataset")
    corp = get_corpus()
    topics = load_topics(config.workdir)
    if list(topics.doc_ids) != list(corp.ids):
      raise MixieError(f"{d}: the corpus changed since it was embedded (document ids differ); "
                       "use a fresh --workdir")
    log(f"mixie.cluster: tokenizing {len(corp)} documents into {out}")
    ds.build_dataset(out, corp, topics.topic_n, _base_tokenizer(config.model),
                     num_topics=topics.num_topics,
                     metadata={"embedder": cc.embedder, "method": cc.method,
                               "num_topics": topics.num_topics})
    steps.finish("dataset", t0)

  # --- summary ------------------------------------------------------------------------------------
  topics = load_topics(config.workdir)
  small = _small_topics_report(config, out, topics)
  mio.atomic_write_json(d / "small_topics.json", small)
  manifest = ds.read_manifest(out)
  return {
      "workdir": str(config.workdir), "embedder": cc.embedder, "method": cc.method,
      "num_topics": topics.num_topics, "num_docs": int(topics.doc_ids.size),
      "num_train_docs": int((~topics.heldout_n).sum()), "num_heldout_docs": int(topics.heldout_n.sum()),
      "quality": topics.quality, "small_topics": small,
      "dataset": {s: {k: v for k, v in m.items() if k != "shards"}
                  for s, m in manifest["splits"].items()},
      "steps": {e["step"]: e["status"] for e in steps.log},
      "paths": {"topics": str(d), "dataset": str(out)},
  }


def _dataset_ok(out, log) -> bool:
  """Whether the clustered dataset is complete and intact (shard sizes as the manifest says)."""
  if ds.dataset_status(out) != "complete":
    return False
  try:
    for split in ds.read_manifest(out)["splits"]:
      ds.open_dataset(out, split)
  except MixieError as e:
    log(f"mixie.cluster: rewriting the clustered dataset ({e})")
    return False
  return True


def _small_topics_report(config, out, topics: Topics) -> dict:
  """Topics with fewer tokens than one training batch (b x T) and what `dataset.small_topics` does."""
  counts = topic_token_counts(out, "train")
  try:
    _, report = resolve_small_topics(counts, topics.centroids_kd, _min_batch_tokens(config),
                                     config.dataset.small_topics)
  except MixieError as e:  # reported here; training refuses to start on it
    report = {"error": str(e)}
  return report


def summary_line(summary: dict) -> str:
  """A one-line human summary."""
  q = summary["quality"]
  bits = [f"{summary['num_topics']} topics", f"{summary['num_train_docs']} training docs",
          f"embedder={summary['embedder']}", f"method={summary['method']}"]
  for k in ("nmi", "ari", "silhouette"):
    if q.get(k) is not None:
      bits.append(f"{k}={q[k]:.3f}")
  return "mixie.cluster: " + ", ".join(bits)

"""Analysis of a work directory (what `notebooks/` call): loaders that read a run's artefacts into plain
numpy arrays and dicts, summaries computed from them, and matplotlib figures drawn from those.

Loaders (no pandas; jax is imported only where routes must be computed or evaluation files located):
- `load_topics_data(workdir)`: topics, document embeddings and reference labels (`workdir/topics`);
- `load_texts(workdir)`: text and title of every document (the corpus is re-read with the `data.*`
  settings the cluster stage recorded in `topics/done/embed.json`);
- `load_metrics(workdir)`: loss / lr / grad-norm curves per run and expert (`metrics.jsonl`);
- `load_perplexity(workdir)`: held-out perplexity tables per routing prefix P from `eval/results.json`
  (`python -m mixie.evaluate`), else the trainer's `eval_train.json` (oracle experts, whole documents);
- `load_routes(workdir, prefix, mode)`: each held-out document's own topic's expert and its routed
  expert, from `eval/per_doc.npz`, else computed with the run's embedder and router (`compute_routes`).

Summaries: `top_terms` (TF-IDF per topic, titles nearest each centroid; `format_top_terms` as text),
`nearest_to_centroid`, `label_agreement` (NMI, ARI, contingency table), `project_2d` (PCA or UMAP),
`routing_confusion` (own expert x routed expert counts).

Figures: `plot_topic_sizes`, `plot_topic_map`, `plot_top_terms`, `plot_label_agreement`,
`plot_training_curves`, `plot_perplexity`, `plot_routing_confusion`, `plot_prefix_effect`. Each returns
a `matplotlib.figure.Figure` and, given `save_dir`, also writes `<save_dir>/<name>.png` atomically
(`FIGURE_NAMES`, `save_figure`; `figure_dir` is a notebook's default). Figures are built without
pyplot (no global state); a notebook shows them after `%matplotlib inline`. A figure whose input is
missing (no labels, no evaluation yet) says so in its axes instead of failing, so a notebook runs
through on a partial work directory.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from mixie import io as mio
from mixie.errors import MixieError, check

FIGURE_NAMES = {
    "plot_topic_sizes": "topic_sizes", "plot_topic_map": "topic_map", "plot_top_terms": "top_terms",
    "plot_label_agreement": "label_agreement", "plot_training_curves": "training_curves",
    "plot_perplexity": "perplexity", "plot_routing_confusion": "routing_confusion",
    "plot_prefix_effect": "prefix_effect",
}
EVAL_TRAIN_JSON = "eval_train.json"  # the trainer's table (`mixie.train.main.evaluate`)
METRICS_JSONL = "metrics.jsonl"
MANY = 40  # from this many topics on, figures switch from one bar / row per topic to summaries


# ---------------------------------------------------------------------------------------------------
# Figures: creation and saving.


def new_figure(width: float, height: float):
  """A `Figure` with an Agg canvas and constrained layout, outside pyplot's global state."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig, save_dir, name: str, *, dpi: int = 110):
  """Writes `fig` as `<save_dir>/<name>.png` (atomic; local or gs://); returns the path."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  p = mio.path(save_dir) / f"{name}.png"
  mio.atomic_write_bytes(p, buf.getvalue())
  return p


def figure_dir(workdir, figdir: str = "") -> str:
  """Where a notebook writes its figures: `figdir`, or `<workdir>/figures` when empty."""
  return str(figdir) if figdir else f"{str(workdir).rstrip('/')}/figures"


def _done(fig, save_dir, func: str):
  if save_dir is not None:
    save_figure(fig, save_dir, FIGURE_NAMES[func])
  return fig


def _message(fig, text: str) -> None:
  ax = fig.add_subplot()
  ax.axis("off")
  ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11)


def _colors(n: int):
  from matplotlib import colormaps

  cmap = colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# Topics.


def load_topics_data(workdir) -> dict[str, Any]:
  """The topics of `workdir` with the document embeddings and reference labels.

  Keys: `workdir`, `num_topics` K, `metric`, `doc_ids` [N] (corpus order), `topic_n` int [N],
  `heldout_n` bool [N], `sizes_k` (training documents per topic), `emb_nd` float32 [N, d],
  `centroids_kd`, `label_n` int [N] (-1: none), `label_names` (list), `quality` (quality.json).
  """
  from mixie.cluster.topics import load_embeddings, load_topics, topics_dir

  t = load_topics(workdir)
  e = load_embeddings(workdir)
  d = topics_dir(workdir)
  check(np.array_equal(e["doc_id"], t.doc_ids),
        f"{d}: embeddings.npz and assignment.npz list different documents; rerun mixie.cluster")
  names = mio.read_json(d / "labels.json") if (d / "labels.json").exists() else []
  return {"workdir": str(workdir), "num_topics": t.num_topics, "metric": t.metric,
          "doc_ids": t.doc_ids, "topic_n": np.asarray(t.topic_n, np.int64),
          "heldout_n": np.asarray(t.heldout_n, bool), "sizes_k": np.asarray(t.sizes_k, np.int64),
          "emb_nd": np.asarray(e["emb_nd"], np.float32), "centroids_kd": np.asarray(t.centroids_kd),
          "label_n": np.asarray(e["label"], np.int64), "label_names": list(names), "quality": t.quality}


def _marker_settings(workdir, step: str) -> dict[str, Any]:
  from mixie.cluster.topics import topics_dir

  return mio.read_json(topics_dir(workdir) / "done" / f"{step}.json")["settings"]


def load_texts(workdir, doc_ids: Sequence[str] | None = None) -> dict[str, list[str]]:
  """`{"texts": [...], "titles": [...]}` of the documents `doc_ids` (default: all of the topics, in
  corpus order), re-read from the corpus with the `data.*` settings the cluster stage recorded."""
  import ml_collections

  from mixie.data.corpus import load_corpus

  settings = _marker_settings(workdir, "embed")
  data_cfg = ml_collections.ConfigDict({k.split(".", 1)[1]: v for k, v in settings.items()
                                        if k.startswith("data.")})
  if doc_ids is None:
    doc_ids = load_topics_data(workdir)["doc_ids"]
  corpus = load_corpus(data_cfg)
  pos = {d: i for i, d in enumerate(corpus.ids)}
  missing = [d for d in doc_ids if d not in pos]
  check(not missing, f"{workdir}: {len(missing)} document(s) of the topics are no longer in the corpus "
                     f"({data_cfg.source} {data_cfg.path!r}), e.g. {missing[:3]}")
  rows = [pos[d] for d in doc_ids]
  return {"texts": [corpus.texts[i] for i in rows], "titles": [corpus.titles[i] for i in rows]}


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_to_centroid(topics: Mapping[str, Any], n: int = 5) -> dict[int, np.ndarray]:
  """Row indices of the `n` training documents of each topic nearest its centroid (in the clustering
  metric), nearest first."""
  cos = topics["metric"] == "cosine"
  x = _unit(topics["emb_nd"]) if cos else np.asarray(topics["emb_nd"], np.float64)
  c = _unit(topics["centroids_kd"]) if cos else np.asarray(topics["centroids_kd"], np.float64)
  train = ~topics["heldout_n"]
  out = {}
  for k in range(topics["num_topics"]):
    idx = np.flatnonzero(train & (topics["topic_n"] == k))
    d2 = ((x[idx] - c[k]) ** 2).sum(axis=1)
    out[k] = idx[np.argsort(d2, kind="stable")[:n]]
  return out


def top_terms(topics: Mapping[str, Any], texts: Mapping[str, Sequence[str]], *, n_terms: int = 10,
              n_titles: int = 3) -> list[dict[str, Any]]:
  """Per topic: its most characteristic words and example titles.

  Words: TF-IDF (sublinear tf, English stop words and numbers dropped, rows L2-normalised) fitted on
  the training documents; a word's score in a topic is its mean TF-IDF over the topic's training
  documents. Titles: the training documents nearest the topic's centroid.

  Returns a list (by topic id) of `{"topic", "size", "terms": [(word, score)], "titles": [...]}`.
  """
  from sklearn.feature_extraction.text import TfidfVectorizer

  train = np.flatnonzero(~topics["heldout_n"])
  check(train.size > 0, f"{topics['workdir']}: no training documents")
  docs = [texts["texts"][i] for i in train]
  vec = TfidfVectorizer(stop_words="english", sublinear_tf=True, token_pattern=r"(?u)\b[^\W\d_]{2,}\b",
                        min_df=2 if len(docs) >= 50 else 1, max_df=0.5 if len(docs) >= 50 else 1.0)
  try:
    x = vec.fit_transform(docs)
  except ValueError as e:  # empty vocabulary
    raise MixieError(f"{topics['workdir']}: no words to rank in the topics' documents ({e})") from None
  vocab = vec.get_feature_names_out()
  topic_t = topics["topic_n"][train]
  near = nearest_to_centroid(topics, n_titles)
  out = []
  for k in range(topics["num_topics"]):
    rows = np.flatnonzero(topic_t == k)
    terms = []
    if rows.size:
      score = np.asarray(x[rows].mean(axis=0)).ravel()
      best = np.argsort(-score, kind="stable")[:n_terms]
      terms = [(str(vocab[j]), float(score[j])) for j in best if score[j] > 0]
    out.append({"topic": k, "size": int(rows.size), "terms": terms,
                "titles": [texts["titles"][i] for i in near[k]]})
  return out


def label_agreement(topics: Mapping[str, Any], *, heldout: bool = False) -> dict[str, Any] | None:
  """Agreement of the topics with the reference labels on the training (or held-out) documents.

  Returns None when the corpus has no labels, else `{"nmi", "ari", "n", "contingency_kl"` (int [K, L]:
  documents of topic k with label l)`, "label_names"}`. NMI and ARI are those of
  `mixie.cluster.metrics.cluster_quality` (the numbers in quality.json for the training documents).
  """
  from mixie.cluster.metrics import cluster_quality

  sel = (topics["heldout_n"] if heldout else ~topics["heldout_n"]) & (topics["label_n"] >= 0)
  if not sel.any() or not topics["label_names"]:
    return None
  t, l = topics["topic_n"][sel], topics["label_n"][sel]
  q = cluster_quality(topics["emb_nd"][sel], t, l, metric=topics["metric"], sample=0)
  table = np.zeros((topics["num_topics"], len(topics["label_names"])), np.int64)
  np.add.at(table, (t, l), 1)
  return {"nmi": q["nmi"], "ari": q["ari"], "n": int(sel.sum()), "contingency_kl": table,
          "label_names": list(topics["label_names"])}


def project_2d(x_nd: np.ndarray, method: str = "pca", *, seed: int = 0) -> np.ndarray:
  """`[n, 2]` coordinates of `x_nd`: "pca" (scikit-learn) or "umap" (umap-learn, cosine)."""
  x = np.asarray(x_nd, np.float32)
  if method == "pca":
    from sklearn.decomposition import PCA
    return PCA(n_components=2, random_state=seed).fit_transform(x)
  if method == "umap":
    import umap
    return umap.UMAP(n_components=2, metric="cosine", random_state=seed,
                     n_neighbors=min(15, max(2, x.shape[0] - 1))).fit_transform(x)
  raise MixieError(f"project_2d: method must be 'pca' or 'umap', got {method!r}")


def plot_topic_sizes(topics: Mapping[str, Any], *, save_dir=None):
  """Training (and held-out) documents per topic; sorted sizes and a histogram for many topics."""
  K = topics["num_topics"]
  train = topics["sizes_k"]
  held = np.bincount(topics["topic_n"][topics["heldout_n"]], minlength=K)
  fig = new_figure(min(4 + 0.45 * K, 12) if K < MANY else 11, 3.8)
  title = (f"{K} topics, {int(train.sum())} training documents (min {train.min()}, median "
           f"{np.median(train):g}, max {train.max()})")
  if K < MANY:
    ax = fig.add_subplot()
    x = np.arange(K)
    ax.bar(x, train, label="training")
    ax.bar(x, held, bottom=train, label="held out", alpha=0.6)
    ax.set_xticks(x, [str(k) for k in x])
    ax.set_xlabel("topic")
    ax.set_ylabel("documents")
    ax.legend()
  else:
    a1, a2 = fig.subplots(1, 2)
    a1.plot(np.arange(1, K + 1), np.sort(train)[::-1])
    a1.set_xlabel("topic rank")
    a1.set_ylabel("training documents")
    a1.set_yscale("log")
    a2.hist(train, bins=min(50, K))
    a2.set_xlabel("training documents per topic")
    a2.set_ylabel("topics")
  fig.suptitle(title, fontsize=10)
  return _done(fig, save_dir, "plot_topic_sizes")


def plot_topic_map(topics: Mapping[str, Any], *, method: str = "pca", max_points: int = 5000,
                   seed: int = 0, save_dir=None):
  """A 2-D map (`project_2d`) of the documents coloured by topic, centroids marked; at most
  `max_points` documents (a fixed-seed sample)."""
  n = topics["emb_nd"].shape[0]
  idx = np.arange(n)
  if n > max_points:
    idx = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
  K = topics["num_topics"]
  cos = topics["metric"] == "cosine"
  x = topics["emb_nd"][idx]
  c = topics["centroids_kd"]
  pts = project_2d(np.concatenate([_unit(x) if cos else x, _unit(c) if cos else c]), method, seed=seed)
  p, pc = pts[:len(idx)], pts[len(idx):]
  t, h = topics["topic_n"][idx], topics["heldout_n"][idx]
  fig = new_figure(7.5, 6.2)
  ax = fig.add_subplot()
  colors = np.asarray(_colors(K))
  ax.scatter(p[~h, 0], p[~h, 1], c=colors[t[~h]], s=9, alpha=0.7, linewidths=0, label="training")
  if h.any():
    ax.scatter(p[h, 0], p[h, 1], c=colors[t[h]], s=22, marker="x", linewidths=0.9, label="held out")
  ax.scatter(pc[:, 0], pc[:, 1], c=colors, s=140, marker="*", edgecolors="black", linewidths=0.7,
             label="centroids")
  if K <= MANY:
    for k in range(K):
      ax.annotate(str(k), pc[k], xytext=(4, 4), textcoords="offset points", fontsize=9, weight="bold")
  ax.set_xticks([])
  ax.set_yticks([])
  ax.legend(fontsize=8, loc="best")
  ax.set_title(f"documents by topic ({method.upper()} of the {'unit ' if cos else ''}embeddings, "
               f"{len(idx)} of {n})", fontsize=10)
  return _done(fig, save_dir, "plot_topic_map")


def plot_top_terms(terms: Sequence[Mapping[str, Any]], *, max_topics: int = 12, save_dir=None):
  """One panel per topic (the `max_topics` largest): its top TF-IDF words as bars, example titles
  in the panel's title."""
  show = sorted(terms, key=lambda r: -r["size"])[:max_topics]
  show = sorted(show, key=lambda r: r["topic"])
  cols = min(4, max(1, len(show)))
  rows = math.ceil(len(show) / cols)
  fig = new_figure(4.2 * cols, 3.4 * rows)
  if not show:
    _message(fig, "no topics")
    return _done(fig, save_dir, "plot_top_terms")
  axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
  colors = _colors(max(r["topic"] for r in terms) + 1)
  for ax, r in zip(axes, show):
    words = [w for w, _ in r["terms"]][::-1]
    ax.barh(np.arange(len(words)), [s for _, s in r["terms"]][::-1], color=colors[r["topic"]])
    ax.set_yticks(np.arange(len(words)), words, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    titles = "; ".join(_short(t, 28) for t in r["titles"])
    ax.set_title(f"topic {r['topic']} ({r['size']} docs)\n{titles}", fontsize=8)
  for ax in axes[len(show):]:
    ax.axis("off")
  fig.suptitle("top words per topic (mean TF-IDF) and the titles nearest each centroid", fontsize=10)
  return _done(fig, save_dir, "plot_top_terms")


def format_top_terms(terms: Sequence[Mapping[str, Any]]) -> str:
  """`top_terms` as text: one line of words and one of titles per topic."""
  lines = []
  for r in terms:
    lines.append(f"topic {r['topic']:>3} ({r['size']} docs): " + ", ".join(w for w, _ in r["terms"]))
    lines.append("      e.g. " + "; ".join(r["titles"]))
  return "\n".join(lines)


def _short(s: str, n: int) -> str:
  return s if len(s) <= n else s[:n - 1] + "…"


def plot_label_agreement(agreement: Mapping[str, Any] | None, *, max_topics: int = MANY, save_dir=None):
  """Heatmap of the topic x label contingency table (each topic's row normalised to fractions, topics
  ordered by their dominant label), NMI and ARI in the title; the `max_topics` largest topics."""
  fig = new_figure(8.5, 5.5)
  if agreement is None:
    _message(fig, "the corpus has no reference labels: no agreement to show")
    return _done(fig, save_dir, "plot_label_agreement")
  table = agreement["contingency_kl"]
  sizes = table.sum(axis=1)
  keep = np.flatnonzero(sizes > 0)
  keep = keep[np.argsort(-sizes[keep], kind="stable")[:max_topics]]
  keep = keep[np.lexsort((-table[keep].max(axis=1) / sizes[keep], table[keep].argmax(axis=1)))]
  frac = table[keep] / sizes[keep][:, None]
  fig.set_size_inches(max(6, 0.55 * table.shape[1] + 3), max(3.5, 0.32 * keep.size + 2.2))
  ax = fig.add_subplot()
  im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=max(float(frac.max()), 1e-9), aspect="auto")
  ax.set_xticks(np.arange(table.shape[1]), agreement["label_names"], rotation=40, ha="right", fontsize=8)
  ax.set_yticks(np.arange(keep.size), [f"{k} ({sizes[k]})" for k in keep], fontsize=8)
  if frac.size <= 400:
    for i, k in enumerate(keep):
      for j in range(table.shape[1]):
        if table[k, j]:
          ax.text(j, i, str(table[k, j]), ha="center", va="center", fontsize=7,
                  color="black" if frac[i, j] > 0.6 * frac.max() else "white")
  ax.set_xlabel("reference label")
  ax.set_ylabel("topic (documents)")
  fig.colorbar(im, ax=ax, label="fraction of the topic's documents")
  ax.set_title(f"topics vs labels on {agreement['n']} documents: NMI {agreement['nmi']:.3f}, "
               f"ARI {agreement['ari']:.3f}", fontsize=10)
  return _done(fig, save_dir, "plot_label_agreement")


# ---------------------------------------------------------------------------------------------------
# Training curves.


def load_metrics(workdir) -> dict[str, dict[int, dict[str, np.ndarray]]] | None:
  """Curves from `workdir/metrics.jsonl`: `{mode: {topic: {"step", "tokens", "loss", "lr",
  "grad_norm"}}}` (arrays in step order; `tokens` are the expert's cumulative tokens). Runs other
  than "experts" have one curve, under topic 0. None when the file does not exist; lines cut by a
  kill are skipped."""
  p = mio.path(workdir) / METRICS_JSONL
  if not p.exists():
    return None
  rows: dict[str, dict[int, list]] = {}
  for line in p.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if not isinstance(rec, dict) or "experts" not in rec:
      continue
    mode = str(rec.get("mode", "train"))
    for e in rec["experts"]:
      topic = int(e.get("topic", 0)) if mode == "experts" else 0
      rows.setdefault(mode, {}).setdefault(topic, []).append(
          (int(rec["step"]), int(e.get("tokens", 0)), float(e["loss"]), float(e.get("lr", np.nan)),
           float(e.get("grad_norm", np.nan))))
  out: dict[str, dict[int, dict[str, np.ndarray]]] = {}
  for mode, per in rows.items():
    out[mode] = {}
    for topic, r in sorted(per.items()):
      r.sort()
      a = np.asarray(r, np.float64)
      out[mode][topic] = {"step": a[:, 0].astype(np.int64), "tokens": np.cumsum(a[:, 1]).astype(np.int64),
                          "loss": a[:, 2], "lr": a[:, 3], "grad_norm": a[:, 4]}
  return out


def plot_training_curves(metrics: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]] | None, *,
                         x: str = "tokens", save_dir=None):
  """Training loss per expert against its own tokens (`x="tokens"`) or the run's step (`x="step"`);
  one panel per run (experts, lora_all, full), learning rate under it."""
  fig = new_figure(11, 6)
  if not metrics:
    _message(fig, "no metrics.jsonl in the work directory: nothing was trained yet")
    return _done(fig, save_dir, "plot_training_curves")
  check(x in ("tokens", "step"), f"plot_training_curves: x must be 'tokens' or 'step', got {x!r}")
  modes = list(metrics)
  axes = fig.subplots(2, len(modes), squeeze=False, sharex="col", height_ratios=[3, 1])
  for j, mode in enumerate(modes):
    curves = metrics[mode]
    colors = _colors(max(curves) + 1)
    many = len(curves) > 20
    for topic, c in curves.items():
      kw = dict(color="grey", alpha=0.25, lw=0.8) if many else dict(color=colors[topic], lw=1.3,
                                                                    label=f"topic {topic}")
      if mode != "experts":
        kw = dict(color="black", lw=1.3, label=mode)
      axes[0, j].plot(c[x], c["loss"], **kw)
      axes[1, j].plot(c[x], c["lr"], **{k: v for k, v in kw.items() if k != "label"})
    if many:
      grid = np.linspace(min(c[x][0] for c in curves.values()), max(c[x][-1] for c in curves.values()), 100)
      mean = np.nanmean([np.interp(grid, c[x], c["loss"], left=np.nan, right=np.nan)
                         for c in curves.values()], axis=0)
      axes[0, j].plot(grid, mean, color="black", lw=2, label=f"mean of {len(curves)} experts")
    axes[0, j].set_title(f"{mode}: training loss" + (" per expert" if mode == "experts" else ""),
                         fontsize=10)
    axes[0, j].set_ylabel("loss (nats / token)")
    axes[0, j].legend(fontsize=7, ncols=2 if len(curves) > 6 and not many else 1)
    axes[1, j].set_ylabel("lr")
    axes[1, j].set_xlabel("tokens seen by the expert" if x == "tokens" else "step of the run")
  return _done(fig, save_dir, "plot_training_curves")


# ---------------------------------------------------------------------------------------------------
# Held-out perplexity and routing.


def _eval_paths(workdir):
  from mixie.evaluate.run import PER_DOC_NPZ, RESULTS_JSON, eval_dir

  d = eval_dir(workdir)
  return d / RESULTS_JSON, d / PER_DOC_NPZ


def load_perplexity(workdir) -> dict[str, Any] | None:
  """The held-out perplexity tables of `workdir`, one per routing prefix P.

  From `eval/results.json` when `python -m mixie.evaluate` ran (rows: base, baselines, routed modes,
  oracle; scored after the first P tokens); else from the trainer's `eval_train.json` (rows base,
  baselines, oracle; whole documents: P = 0, no routing). None when neither exists.

  Returns `{"source", "prefix_tokens": [P...], "rows", "routed": [routed rows], "topics": [str],
  "by_prefix": {str(P): {"ppl": {row: v}, "ppl_per_topic": {row: {topic: v}}, "routing_accuracy":
  {row: v | None}, "docs_per_topic": {topic: n}}}}`.
  """
  results_p, _ = _eval_paths(workdir)
  if results_p.exists():
    r = mio.read_json(results_p)
    rows = list(r["rows"])
    return {"source": str(results_p), "prefix_tokens": [int(p) for p in r["prefix_tokens"]], "rows": rows,
            "routed": [m for m in r.get("route", {}).get("modes", []) if m in rows],
            "topics": [str(t) for t in r["topics"]],
            "by_prefix": {str(p): {k: r["by_prefix"][str(p)][k] for k in
                                   ("ppl", "ppl_per_topic", "routing_accuracy", "docs_per_topic")}
                          for p in r["prefix_tokens"]}}
  p = mio.path(workdir) / EVAL_TRAIN_JSON
  if not p.exists():
    return None
  t = mio.read_json(p)
  rename = lambda c: "oracle" if c == "experts_oracle" else c  # noqa: E731
  rows = [rename(c) for c in t["columns"]]
  topics = list(t["per_topic"])
  tab = {"ppl": {rename(c): v for c, v in t["overall"].items()},
         "ppl_per_topic": {rename(c): {k: t["per_topic"][k][c] for k in topics} for c in t["columns"]},
         "routing_accuracy": {r: None for r in rows},
         "docs_per_topic": {k: t["per_topic"][k]["docs"] for k in topics}}
  return {"source": str(p), "prefix_tokens": [0], "rows": rows, "routed": [], "topics": topics,
          "by_prefix": {"0": tab}}


def _pick_prefix(ppl: Mapping[str, Any], prefix: int | None) -> int:
  ps = ppl["prefix_tokens"]
  if prefix is None:
    return ps[-1]
  check(prefix in ps, f"prefix {prefix} was not evaluated; evaluated: {ps}")
  return prefix


def plot_perplexity(ppl: Mapping[str, Any] | None, *, prefix: int | None = None,
                    rows: Sequence[str] | None = None, save_dir=None):
  """Held-out perplexity per topic and overall, one bar per row (default: every row of the table:
  base, baselines, routed modes, oracle) at routing prefix `prefix` (default: the largest P)."""
  fig = new_figure(11, 4.6)
  if ppl is None:
    _message(fig, "no held-out evaluation in the work directory: run `python -m mixie.evaluate "
                  "--config=...` (or train with train.eval_after=True)")
    return _done(fig, save_dir, "plot_perplexity")
  P = _pick_prefix(ppl, prefix)
  tab = ppl["by_prefix"][str(P)]
  rows = list(rows or ppl["rows"])
  bad = [r for r in rows if r not in tab["ppl"]]
  check(not bad, f"plot_perplexity: rows {bad} are not in the table (rows: {ppl['rows']})")
  topics = ppl["topics"]
  groups = ["all"] + topics
  vals = np.asarray([[tab["ppl"][r]] + [tab["ppl_per_topic"][r][t] for t in topics] for r in rows],
                    np.float64)
  ax = fig.add_subplot()
  width = 0.8 / len(rows)
  x = np.arange(len(groups))
  colors = _colors(len(rows))
  for i, r in enumerate(rows):
    ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals[i], width, label=r, color=colors[i])
  finite = vals[np.isfinite(vals)]
  if finite.size:
    lo, hi = finite.min(), finite.max()
    pad = hi - lo + 1e-9
    ax.set_ylim(max(0.0, lo - 0.3 * pad), hi + 0.1 * pad)
  many = len(topics) >= MANY
  ax.set_xticks(x, ["all"] + ([""] * len(topics) if many else
                             [f"{t}\n({tab['docs_per_topic'][t]})" for t in topics]), fontsize=8)
  ax.set_xlabel("topic (held-out documents)")
  ax.set_ylabel("perplexity (axis not from 0)")
  where = (f"after the first P = {P} tokens, routed on them" if P else "whole documents (trainer's table)")
  ax.set_title(f"held-out perplexity, {where}; lower is better", fontsize=10)
  ax.legend(fontsize=8, ncols=min(len(rows), 6))
  return _done(fig, save_dir, "plot_perplexity")


def compute_routes(workdir, *, prefix: int, mode: str = "centroid", config=None) -> dict[str, Any]:
  """Routes of the held-out documents of `workdir` from their first `prefix` tokens, computed with the
  run's embedder and a `mode` router over its topics and experts (as `mixie.evaluate` does).

  `config`: a full mixie config for the router settings (`route.*`) and `eval.max_docs`; default: the
  defaults of `configs.common` with this work directory's clustering metric. The base tokenizer is
  the one the dataset was tokenized with (recorded in `topics/done/dataset.json`).
  """
  from mixie.cluster.embed import SPEC_JSON, load_embedder
  from mixie.cluster.topics import load_topics, topics_dir
  from mixie.evaluate.run import heldout_set, make_routers, prefix_routes
  from mixie.model.load import load_tokenizer
  from mixie.route.run import expert_of_topic
  from mixie.store import ExpertStore

  topics = load_topics(workdir)
  if config is None:
    from configs.common import base_config
    config = base_config()
    config.cluster.metric = topics.metric
  else:
    import copy
    config = copy.deepcopy(config)
  config.workdir = str(workdir)
  store = ExpertStore(mio.path(workdir) / "experts")
  check(bool(store.topics()), f"{store.dir}: no trained experts to route to")
  eot_k = expert_of_topic(store, topics.num_topics)
  m = _marker_settings(workdir, "dataset")
  model = {k.split(".", 1)[1]: m.get(k, "") for k in ("model.source", "model.path", "model.preset")}
  tok = load_tokenizer(model["source"], model["path"], model["preset"])
  edir = topics_dir(workdir) / "embedder"
  base = None
  if mio.read_json(edir / SPEC_JSON).get("kind") == "base":
    from mixie.model.load import load_base
    for k, v in model.items():
      config.model[k] = v
    base = load_base(config.model, seed=int(config.seed))
  embedder = load_embedder(edir, base=base, batch=int(config.cluster.embed_batch))
  held = heldout_set(config, prefix + 1)
  routers = make_routers(config, store, (mode,))
  r = prefix_routes(routers, embedder, tok, held.tokens, prefix, eot_k[held.topic_n])
  return {"prefix": int(prefix), "mode": mode, "doc_ids": np.asarray(held.doc_ids),
          "topic_n": np.asarray(held.topic_n, np.int64), "own_n": eot_k[held.topic_n].astype(np.int64),
          "routed_n": np.asarray(r[mode].top1, np.int64), "source": "computed"}


def load_routes(workdir, *, prefix: int | None = None, mode: str = "centroid",
                compute_missing: bool = True, config=None) -> dict[str, Any] | None:
  """Per held-out document: its topic, its own topic's expert (`own_n`, the oracle) and the expert
  the `mode` router chose from its first `prefix` tokens (`routed_n`, top-1; -1 = the base).

  Read from `eval/per_doc.npz` (`prefix` default: the largest P evaluated). Without it, computed with
  `compute_routes` when `compute_missing` (`prefix` default: `route.route_tokens` of `config` or of
  the defaults), else None. Returns `{"prefix", "mode", "doc_ids", "topic_n", "own_n", "routed_n",
  "source"}`.
  """
  from mixie.route.router import RouteResult

  results_p, per_doc_p = _eval_paths(workdir)
  if per_doc_p.exists() and results_p.exists():
    r = mio.read_json(results_p)
    ps = [int(p) for p in r["prefix_tokens"]]
    P = ps[-1] if prefix is None else prefix
    check(P in ps, f"{results_p}: prefix {P} was not evaluated (evaluated: {ps})")
    d = mio.load_arrays(per_doc_p)
    key = f"p{P}.{mode}"
    check(f"{key}.experts" in d, f"{per_doc_p}: no routes of mode {mode!r} (routed rows: "
                                 f"{sorted({k.split('.')[1] for k in d if k.endswith('.experts')})})")
    top1 = RouteResult(d[f"{key}.experts"], d[f"{key}.weights"]).top1
    return {"prefix": P, "mode": mode, "doc_ids": d["doc_id"], "topic_n": d["topic"].astype(np.int64),
            "own_n": d["own_expert"].astype(np.int64), "routed_n": np.asarray(top1, np.int64),
            "source": str(per_doc_p)}
  if not compute_missing:
    return None
  if prefix is None:
    if config is None:
      from configs.common import base_config
      prefix = int(base_config().route.route_tokens)
    else:
      prefix = int(config.route.route_tokens)
  return compute_routes(workdir, prefix=prefix, mode=mode, config=config)


def routing_confusion(routes: Mapping[str, Any]) -> dict[str, Any]:
  """Counts of (own expert, routed expert) over the documents: `{"experts": ids (-1 = base),
  "counts_oo"` (int [n_experts, n_experts]: row = own, column = routed)`, "accuracy"}`."""
  own, routed = routes["own_n"], routes["routed_n"]
  experts = np.unique(np.concatenate([own, routed]))
  pos = {int(e): i for i, e in enumerate(experts)}
  counts = np.zeros((experts.size, experts.size), np.int64)
  np.add.at(counts, ([pos[int(e)] for e in own], [pos[int(e)] for e in routed]), 1)
  return {"experts": experts, "counts_oo": counts,
          "accuracy": float((own == routed).mean()) if own.size else float("nan")}


def plot_routing_confusion(routes: Mapping[str, Any] | None, *, normalize: bool = True, save_dir=None):
  """Routing confusion matrix: rows = each document's own topic's expert (the oracle), columns = the
  routed expert; rows normalised to fractions (`normalize`), counts written in small matrices."""
  fig = new_figure(6.8, 5.8)
  if routes is None:
    _message(fig, "no routes: run `python -m mixie.evaluate --config=...` first")
    return _done(fig, save_dir, "plot_routing_confusion")
  c = routing_confusion(routes)
  counts = c["counts_oo"]
  tot = np.maximum(counts.sum(axis=1, keepdims=True), 1)
  show = counts / tot if normalize else counts
  names = ["base" if e < 0 else str(e) for e in c["experts"]]
  ax = fig.add_subplot()
  im = ax.imshow(show, cmap="Blues", vmin=0, vmax=1 if normalize else None)
  n = len(names)
  if n <= MANY:
    ax.set_xticks(np.arange(n), names, fontsize=8)
    ax.set_yticks(np.arange(n), names, fontsize=8)
  if n <= 20:
    for i in range(n):
      for j in range(n):
        if counts[i, j]:
          ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                  color="white" if show[i, j] > 0.6 * show.max() else "black")
  ax.set_xlabel(f"routed expert ({routes['mode']})")
  ax.set_ylabel("own topic's expert (oracle)")
  fig.colorbar(im, ax=ax, label="fraction of the row" if normalize else "documents")
  ax.set_title(f"routing on the first {routes['prefix']} tokens: {c['accuracy']:.1%} of "
               f"{int(counts.sum())} held-out documents to their own expert", fontsize=10)
  return _done(fig, save_dir, "plot_routing_confusion")


def plot_prefix_effect(ppl: Mapping[str, Any] | None, *, save_dir=None):
  """The effect of the routing prefix length P: perplexity after P per row (left) and routing accuracy
  per routed mode (right), against P."""
  fig = new_figure(11, 4.2)
  if ppl is None or ppl["prefix_tokens"] == [0]:
    _message(fig, "no prefix-routed evaluation in the work directory: run `python -m mixie.evaluate "
                  "--config=...` (eval.prefix_tokens sets the P values)")
    return _done(fig, save_dir, "plot_prefix_effect")
  ps = ppl["prefix_tokens"]
  a1, a2 = fig.subplots(1, 2)
  colors = dict(zip(ppl["rows"], _colors(len(ppl["rows"]))))
  at = lambda p, r: ppl["by_prefix"][str(p)]["ppl"][r]  # noqa: E731
  relative = "base" in ppl["rows"]  # each P scores other tokens: compare rows at the same P
  for r in ppl["rows"]:
    if relative and r != "base":
      a1.plot(ps, [100.0 * (at(p, r) / at(p, "base") - 1.0) for p in ps], marker="o", label=r,
              color=colors[r])
    elif not relative:
      a1.plot(ps, [at(p, r) for p in ps], marker="o", label=r, color=colors[r])
    if r in ppl["routed"]:
      a2.plot(ps, [ppl["by_prefix"][str(p)]["routing_accuracy"][r] for p in ps], marker="o", label=r,
              color=colors[r])
  if relative:
    a1.axhline(0.0, color="grey", lw=0.8)
  a1.set_xlabel("routing prefix P (tokens)")
  a1.set_ylabel("perplexity vs the base (%)" if relative else "held-out perplexity after P")
  a1.set_title("perplexity after P" + (" relative to the base model's (lower is better)" if relative
                                       else " (lower is better)"), fontsize=10)
  a1.legend(fontsize=8)
  a2.set_xlabel("routing prefix P (tokens)")
  a2.set_ylabel("routed to the own topic's expert")
  a2.set_ylim(0, 1.02)
  a2.set_title("routing accuracy", fontsize=10)
  if ppl["routed"]:
    a2.legend(fontsize=8)
  for ax in (a1, a2):
    ax.set_xticks(ps)
  return _done(fig, save_dir, "plot_prefix_effect")

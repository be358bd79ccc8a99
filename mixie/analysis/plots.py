"""Figures of a run's topics and training (what `notebooks/` draw); the held-out evaluation's figures
are `mixie.evaluate.plots`. Each returns a `matplotlib.figure.Figure` and, given `save_dir`, also writes
`<save_dir>/<name>.png` (`mixie.figures`). A figure whose input is missing (no labels, nothing trained
yet) says so in its axes instead of failing, so a notebook runs through on a partial work directory.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from mixie.analysis.summaries import project_2d, unit
from mixie.errors import check
from mixie.figures import MANY, finish, message, new_figure, palette


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
  return finish(fig, save_dir, "plot_topic_sizes")


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
  pts = project_2d(np.concatenate([unit(x) if cos else x, unit(c) if cos else c]), method, seed=seed)
  p, pc = pts[:len(idx)], pts[len(idx):]
  t, h = topics["topic_n"][idx], topics["heldout_n"][idx]
  fig = new_figure(7.5, 6.2)
  ax = fig.add_subplot()
  colors = np.asarray(palette(K))
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
  return finish(fig, save_dir, "plot_topic_map")


def plot_top_terms(terms: Sequence[Mapping[str, Any]], *, max_topics: int = 12, save_dir=None):
  """One panel per topic (the `max_topics` largest): its top TF-IDF words as bars, example titles
  in the panel's title."""
  show = sorted(terms, key=lambda r: -r["size"])[:max_topics]
  show = sorted(show, key=lambda r: r["topic"])
  cols = min(4, max(1, len(show)))
  rows = math.ceil(len(show) / cols)
  fig = new_figure(4.2 * cols, 3.4 * rows)
  if not show:
    message(fig, "no topics")
    return finish(fig, save_dir, "plot_top_terms")
  axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
  colors = palette(max(r["topic"] for r in terms) + 1)
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
  return finish(fig, save_dir, "plot_top_terms")


def _short(s: str, n: int) -> str:
  return s if len(s) <= n else s[:n - 1] + "…"


def plot_label_agreement(agreement: Mapping[str, Any] | None, *, max_topics: int = MANY, save_dir=None):
  """Heatmap of the topic x label contingency table (each topic's row normalised to fractions, topics
  ordered by their dominant label), NMI and ARI in the title; the `max_topics` largest topics."""
  fig = new_figure(8.5, 5.5)
  if agreement is None:
    message(fig, "the corpus has no reference labels: no agreement to show")
    return finish(fig, save_dir, "plot_label_agreement")
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
  return finish(fig, save_dir, "plot_label_agreement")


def plot_training_curves(metrics: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]] | None, *,
                         x: str = "tokens", save_dir=None):
  """Training loss per expert against its own tokens (`x="tokens"`) or the run's step (`x="step"`);
  one panel per run (experts, lora_all, full), learning rate under it."""
  fig = new_figure(11, 6)
  if not metrics:
    message(fig, "no metrics.jsonl in the work directory: nothing was trained yet")
    return finish(fig, save_dir, "plot_training_curves")
  check(x in ("tokens", "step"), f"plot_training_curves: x must be 'tokens' or 'step', got {x!r}")
  modes = list(metrics)
  axes = fig.subplots(2, len(modes), squeeze=False, sharex="col", height_ratios=[3, 1])
  for j, mode in enumerate(modes):
    curves = metrics[mode]
    colors = palette(max(curves) + 1)
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
  return finish(fig, save_dir, "plot_training_curves")


"""Figures of the held-out evaluation (`mixie.evaluate.run`), drawn from its results (`results.json`,
or `mixie.analysis.loaders.load_perplexity`) and routes: what `python -m mixie.evaluate` writes into
`workdir/eval/` and what the notebooks show. Each returns a `matplotlib.figure.Figure` and, given
`save_dir`, also writes `<save_dir>/<name>.png` (`mixie.figures`); a missing input draws a message.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mixie.errors import check
from mixie.figures import MANY, finish, message, new_figure, palette


def _pick_prefix(results: Mapping[str, Any], prefix: int | None) -> int:
  ps = results["prefix_tokens"]
  if prefix is None:
    return ps[-1]
  check(prefix in ps, f"prefix {prefix} was not evaluated; evaluated: {ps}")
  return prefix


def routed_rows(results: Mapping[str, Any]) -> list[str]:
  """The rows of an evaluation that a router chose (its `route.modes`), in table order."""
  modes = results.get("route", {}).get("modes", [])
  return [r for r in results["rows"] if r in modes]


def plot_perplexity(results: Mapping[str, Any] | None, *, prefix: int | None = None,
                    rows: Sequence[str] | None = None, save_dir=None):
  """Held-out perplexity per topic and overall, one bar per row (default: every row of the table:
  base, baselines, routed modes, oracle) at routing prefix `prefix` (default: the largest P)."""
  fig = new_figure(11, 4.6)
  if results is None:
    message(fig, "no held-out evaluation in the work directory: run `python -m mixie.evaluate "
                 "--config=...` (or train with train.eval_after=True)")
    return finish(fig, save_dir, "plot_perplexity")
  P = _pick_prefix(results, prefix)
  tab = results["by_prefix"][str(P)]
  rows = list(rows or results["rows"])
  bad = [r for r in rows if r not in tab["ppl"]]
  check(not bad, f"plot_perplexity: rows {bad} are not in the table (rows: {results['rows']})")
  topics = [str(t) for t in results["topics"]]
  groups = ["all"] + topics
  vals = np.asarray([[tab["ppl"][r]] + [tab["ppl_per_topic"][r][t] for t in topics] for r in rows],
                    np.float64)
  ax = fig.add_subplot()
  width = 0.8 / len(rows)
  x = np.arange(len(groups))
  colors = palette(len(rows))
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
  ax.set_title(f"held-out perplexity after the first P = {P} tokens, routed on them; lower is better",
               fontsize=10)
  ax.legend(fontsize=8, ncols=min(len(rows), 6))
  return finish(fig, save_dir, "plot_perplexity")


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
    message(fig, "no routes: run `python -m mixie.evaluate --config=...` first")
    return finish(fig, save_dir, "plot_routing_confusion")
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
  return finish(fig, save_dir, "plot_routing_confusion")


def plot_prefix_effect(results: Mapping[str, Any] | None, *, save_dir=None):
  """The effect of the routing prefix length P: perplexity after P per row (left) and routing accuracy
  per routed mode (right), against P."""
  fig = new_figure(11, 4.2)
  if results is None:
    message(fig, "no held-out evaluation in the work directory: run `python -m mixie.evaluate "
                 "--config=...` (eval.prefix_tokens sets the P values)")
    return finish(fig, save_dir, "plot_prefix_effect")
  ps, routed = results["prefix_tokens"], routed_rows(results)
  a1, a2 = fig.subplots(1, 2)
  colors = dict(zip(results["rows"], palette(len(results["rows"]))))
  at = lambda p, r: results["by_prefix"][str(p)]["ppl"][r]  # noqa: E731
  relative = "base" in results["rows"]  # each P scores other tokens: compare rows at the same P
  for r in results["rows"]:
    if relative and r != "base":
      a1.plot(ps, [100.0 * (at(p, r) / at(p, "base") - 1.0) for p in ps], marker="o", label=r,
              color=colors[r])
    elif not relative:
      a1.plot(ps, [at(p, r) for p in ps], marker="o", label=r, color=colors[r])
    if r in routed:
      a2.plot(ps, [results["by_prefix"][str(p)]["routing_accuracy"][r] for p in ps], marker="o", label=r,
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
  if routed:
    a2.legend(fontsize=8)
  for ax in (a1, a2):
    ax.set_xticks(ps)
  return finish(fig, save_dir, "plot_prefix_effect")


"""Coverage vs perplexity of routing with a fallback model, written by evaluation next to its tables.

For every P and routed mode, the held-out documents are ranked by their routing confidence
(`route.confidence`, from the same P-token prefix as their route). At a threshold t a document is
covered when its confidence >= t (`mixie.route.fallback.below`): its routed expert(s) score it; the
others are scored by a fallback model (each of `base` and `lora_all` when trained). As t moves from
-inf to +inf the curve gives, from the per-document NLL of the evaluation's rows (no new forward):
- `coverage`, `token_coverage`: the covered share of documents and of scored tokens (non-increasing
  in t);
- `ppl_covered`: perplexity of the covered documents under their routes;
- `ppl_all[fallback]`: perplexity of all documents, covered ones routed, the rest on the fallback
  (t = -inf: the routed row of the table; t = +inf: the fallback's row);
- `ppl_uncovered_routed`, `ppl_uncovered_fallback[fallback]`: the documents left out, under their
  routes and under the fallback (what the fallback buys where it serves).

The threshold actually used (`at_threshold`) is chosen per (P, mode) on training documents
(`mixie.route.calibrate`; `calibrate_thresholds` reads no held-out document), or is
`route.min_confidence` when `route.calibrate` is "".

Outputs: `workdir/eval/coverage.json` (the curves, calibrations and the chosen points) and
`coverage.png` (perplexity vs coverage, one panel per P).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from mixie import figures
from mixie import io as mio
from mixie.evaluate.ppl import perplexity
from mixie.route.calibrate import calibrate, calibration_routes, calibration_set
from mixie.route.fallback import FallbackConfig, below

COVERAGE_JSON = "coverage.json"
COVERAGE_FIGURE = "coverage"  # written as <out_dir>/coverage.png
GRID = 41  # coverage levels of the curve's thresholds (quantiles of the confidences), plus +-inf


def thresholds_grid(confidence_n: np.ndarray, points: int = GRID) -> np.ndarray:
  """Increasing thresholds: -inf, the confidences' quantiles at `points` levels, +inf (unique)."""
  c = np.asarray(confidence_n, np.float64)
  c = c[~np.isnan(c)]
  q = np.quantile(c, np.linspace(0.0, 1.0, points)) if c.size else np.zeros((0,))
  return np.unique(np.concatenate([[-np.inf], q, [np.inf]]))


def coverage_curve(confidence_n: np.ndarray, thresholds: np.ndarray, nll_routed_n: np.ndarray,
                   tokens_n: np.ndarray, nll_fallback: dict[str, np.ndarray]) -> dict[str, Any]:
  """The curve's columns at each threshold (see the module docstring), from per-document summed NLL
  under the routes (`nll_routed_n`) and under each fallback, and the tokens scored per document."""
  out: dict[str, Any] = {k: [] for k in ("threshold", "coverage", "token_coverage", "ppl_covered",
                                         "ppl_uncovered_routed")}
  out["ppl_all"] = {f: [] for f in nll_fallback}
  out["ppl_uncovered_fallback"] = {f: [] for f in nll_fallback}
  for t in thresholds:
    cov = ~below(confidence_n, float(t))
    out["threshold"].append(float(t))
    out["coverage"].append(float(cov.mean()) if cov.size else float("nan"))
    out["token_coverage"].append(float(tokens_n[cov].sum() / max(tokens_n.sum(), 1)))
    out["ppl_covered"].append(perplexity(nll_routed_n[cov], tokens_n[cov]))
    out["ppl_uncovered_routed"].append(perplexity(nll_routed_n[~cov], tokens_n[~cov]))
    for f, nll_f in nll_fallback.items():
      out["ppl_all"][f].append(perplexity(np.where(cov, nll_routed_n, nll_f), tokens_n))
      out["ppl_uncovered_fallback"][f].append(perplexity(nll_f[~cov], tokens_n[~cov]))
  return out


def calibrate_thresholds(config, routers: dict, embedder, tokenizer, prefixes: Sequence[int]
                         ) -> dict[str, dict[str, dict]]:
  """The threshold of each P and routed mode, `{str(P): {mode: calibration}}`, from the training
  documents only (`mixie.route.calibrate`); `route.min_confidence` for every one when
  `route.calibrate` is ""."""
  fb = FallbackConfig.from_config(config)
  if not fb.calibrate:
    fixed = {"rule": "", "threshold": float(fb.min_confidence)}
    return {str(p): {m: dict(fixed) for m in routers} for p in prefixes}
  tokens, topic_n = calibration_set(config, max(prefixes) + 1)
  out = {}
  for p in prefixes:
    routes = calibration_routes(routers, embedder, tokenizer, tokens, p)
    out[str(p)] = {m: calibrate(r, routers[m].expert_of_topic[topic_n], fb)
                   if not np.isnan(r.confidence(fb.confidence)).all() else
                   {"rule": fb.calibrate, "threshold": float("nan"),
                    "skipped": f"no {fb.confidence} confidence in mode {m}"}
                   for m, r in routes.items()}
  return out


def coverage_report(config, out_dir, *, routers: dict, embedder, tokenizer, routes: dict,
                    per_doc: dict[str, np.ndarray], fallbacks: Sequence[str],
                    log: Callable[[str], Any] = print) -> dict[str, Any]:
  """Calibrates, computes the curves and writes `coverage.json` / `coverage.png` into `out_dir`.

  Args:
    routes: `{P: {mode: RouteResult}}` of the held-out documents (evaluation's `prefix_routes`).
    per_doc: evaluation's per-document arrays (`p{P}.{row}.nll`, `p{P}.{row}.tokens`).
    fallbacks: the evaluation rows that can serve as fallback ("base", "lora_all").
  Returns the chosen points `{P: {mode: at_threshold}}` (also in the JSON) for `results.json`.
  """
  fb = FallbackConfig.from_config(config)
  ps = sorted(int(p) for p in routes)
  calib = calibrate_thresholds(config, routers, embedder, tokenizer, ps)
  report: dict[str, Any] = {"confidence": fb.confidence, "settings": fb.to_json(),
                            "fallbacks": list(fallbacks), "by_prefix": {}}
  chosen: dict[str, Any] = {}
  for p in ps:
    report["by_prefix"][str(p)], chosen[str(p)] = {}, {}
    for m in routers:
      conf = routes[p][m].confidence(fb.confidence)
      if np.isnan(conf).all():
        report["by_prefix"][str(p)][m] = {"skipped": f"no {fb.confidence} confidence in mode {m}"}
        continue
      nll, tok = per_doc[f"p{p}.{m}.nll"], per_doc[f"p{p}.{m}.tokens"]
      nll_fb = {f: per_doc[f"p{p}.{f}.nll"] for f in fallbacks}
      t = float(calib[str(p)][m]["threshold"])
      at = coverage_curve(conf, np.asarray([t]), nll, tok, nll_fb)
      point = {"threshold": t, "coverage": at["coverage"][0], "token_coverage": at["token_coverage"][0],
               "ppl_covered": at["ppl_covered"][0], "ppl_no_fallback": perplexity(nll, tok),
               "ppl_with_fallback": {f: v[0] for f, v in at["ppl_all"].items()},
               "ppl_fallback_only": {f: perplexity(nll_fb[f], tok) for f in fallbacks}}
      report["by_prefix"][str(p)][m] = {
          "calibration": calib[str(p)][m], "at_threshold": point,
          "curve": coverage_curve(conf, thresholds_grid(conf), nll, tok, nll_fb)}
      chosen[str(p)][m] = point
  plot_coverage(report, save_dir=out_dir)
  mio.atomic_write_json(mio.path(out_dir) / COVERAGE_JSON, mio.json_safe(report))
  for p in ps:
    for m, pt in chosen[str(p)].items():
      fbs = ", ".join(f"{f} {v:.3f}" for f, v in pt["ppl_with_fallback"].items())
      log(f"mixie.evaluate: P={p} {m}: threshold {pt['threshold']:.4g} ({fb.confidence}) covers "
          f"{pt['coverage']:.3f} of held-out documents; ppl {pt['ppl_no_fallback']:.3f} without "
          f"fallback, with fallback: {fbs}")
  return mio.json_safe(chosen)


def plot_coverage(report: dict[str, Any], *, save_dir=None):
  """Perplexity vs coverage per P (covered documents solid, the whole set with each fallback dashed),
  the calibrated point of each curve marked; written as `<save_dir>/coverage.png` when given."""
  ps = list(report["by_prefix"])
  fig = figures.new_figure(5.5 * max(1, len(ps)), 4.5)
  axes = np.atleast_1d(fig.subplots(1, max(1, len(ps)), squeeze=False)[0])
  for ax, p in zip(axes, ps):
    for i, (m, r) in enumerate(report["by_prefix"][p].items()):
      if "curve" not in r:
        continue
      color = f"C{i}"
      c = r["curve"]
      ax.plot(c["coverage"], c["ppl_covered"], color=color, label=f"{m}: covered docs")
      for j, (f, v) in enumerate(c["ppl_all"].items()):
        ax.plot(c["coverage"], v, color=color, ls=("--", ":")[j % 2], label=f"{m}: all, fallback {f}")
      pt = r["at_threshold"]
      ax.plot([pt["coverage"]], [pt["ppl_covered"]], "o", color=color, ms=7)
    ax.set_xlabel("coverage (share of held-out documents routed)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"P = {p} (dot: calibrated threshold, {report['confidence']})")
    ax.legend(fontsize=7)
  if save_dir is not None:
    figures.save_figure(fig, save_dir, COVERAGE_FIGURE)
  return fig

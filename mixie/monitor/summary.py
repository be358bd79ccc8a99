"""The monitor's summary of a request log: traffic per expert, low-confidence share and drift per time
window, and flags (drift, dead experts) with the numbers behind each.

Definitions (records as written by `mixie.serve.request_log`, sorted by time; settings `monitor.*`):
- traffic: an expert serves a request when it is among the request's `experts` (fallback requests
  are counted per fallback model instead); `routed` counts the router's top choice before the
  fallback rule. Unused experts: known experts (the run's router) that served no request.
- low-confidence share of a window: requests whose `confidence` < `threshold` (the calibrated
  threshold is logged even with `route.fallback = "none"`), and the share a fallback served.
- drift: the reference is the log's first `reference_requests` requests. Every later request falls in a
  time window of `window_s` seconds (from the first request); a window with at least
  `min_window_requests` of them is tested: the two-sample Kolmogorov-Smirnov distance D between its
  queries' nearest-centroid distances and the reference's, and the test's p-value. Queries from a
  domain the topics do not cover sit farther from every training centroid, so their distances shift.
  The log holds no embedding (no text can be recovered from it); the distance to the training
  centroids is the embedding's place against them.
- flags: `drift` when D >= `drift_ks` (an effect size: with many requests any shift is significant)
  and p < `drift_p`; `dead_expert` when an expert served no request although its share of the
  training documents predicts >= `dead_min_expected` of the requests routed (an expert without
  training documents, e.g. imported, is expected an equal share). Unused experts below that
  expectation are listed, not flagged: silence is then not evidence.

The summary (version 1, `workdir/monitor/summary.json`; times in Unix seconds):

    v, log, records, bad_lines (unreadable lines skipped), errors (requests that failed)
    time         {first, last}
    settings     the monitor.* values used
    traffic      {per_expert: {id: {served, routed, expected, training_share}}, base_served,
                  fallback: {model: requests}, unused: [ids], requests_routed}
    reference    {requests, with_distance, until, distance_median, distance_p90}
    windows      [{start, end, requests, low_confidence_share, fallback_share, tested_requests,
                   distance_median (all its requests), ks, p (null: not tested), drift}]
    flags        [{flag: "drift", window_start, window_end, ks, p, requests (tested),
                   distance_median (tested), reference_distance_median, direction, rule},
                  {flag: "dead_expert", expert, served, routed, expected, training_share,
                   requests_routed, rule}]
    notes        [strings]
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Sequence

import numpy as np

from mixie import io as mio
from mixie.errors import ConfigError, check

VERSION = 1


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
  """Settings of section `monitor` (see `configs/common.py` and the module docstring)."""

  window_s: float = 3600.0
  reference_requests: int = 200
  min_window_requests: int = 30
  drift_ks: float = 0.25
  drift_p: float = 0.01
  dead_min_expected: float = 5.0

  def __post_init__(self):
    for f, lo in (("window_s", 0.0), ("drift_ks", 0.0), ("drift_p", 0.0), ("dead_min_expected", 0.0)):
      v = getattr(self, f)
      check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > lo,
            f"monitor.{f} must be a number > {lo}, got {v!r}", ConfigError)
    for f in ("reference_requests", "min_window_requests"):
      v = getattr(self, f)
      check(isinstance(v, int) and not isinstance(v, bool) and v >= 2,
            f"monitor.{f} must be an integer >= 2, got {v!r}", ConfigError)
    check(self.drift_ks <= 1.0 and self.drift_p <= 1.0, "monitor.drift_ks and monitor.drift_p must be "
          f"<= 1, got {self.drift_ks!r} and {self.drift_p!r}", ConfigError)

  @classmethod
  def from_config(cls, c) -> "MonitorConfig":
    """From a full mixie config (section `monitor`)."""
    m = c.monitor
    return cls(window_s=m.window_s, reference_requests=m.reference_requests,
               min_window_requests=m.min_window_requests, drift_ks=m.drift_ks, drift_p=m.drift_p,
               dead_min_expected=m.dead_min_expected)


def read_log(path) -> tuple[list[dict[str, Any]], int]:
  """The records of a request log, sorted by time, and the number of unreadable lines (skipped)."""
  p = mio.path(path)
  check(p.exists(), f"{p}: request log not found (serve.log_path; is logging on?)")
  records, bad = [], 0
  for line in p.read_text().splitlines():
    if not line.strip():
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      bad += 1
      continue
    if not isinstance(r, dict) or not isinstance(r.get("time"), (int, float)):
      bad += 1
      continue
    records.append(r)
  records.sort(key=lambda r: r["time"])
  return records, bad


def _num(x) -> float:
  """A logged number (None = unknown -> NaN)."""
  return float("nan") if x is None else float(x)


def traffic(records: Sequence[dict], experts: Sequence[int], expected_share: dict[int, float],
            cfg: MonitorConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Requests per expert (served, routed), per fallback model, the unused experts, and the dead-expert
  flags (see the module docstring)."""
  served, routed, fallback = collections.Counter(), collections.Counter(), collections.Counter()
  n_routed = 0
  for r in records:
    if r.get("mode", "none") != "none":
      n_routed += 1
    if r.get("routed"):
      routed[int(max(r["routed"], key=lambda ew: ew[1])[0])] += 1
    if r.get("fallback"):
      fallback[r["fallback"]] += 1
    for e in {int(e) for e, w in r.get("experts") or [] if w > 0}:
      served[e] += 1
  known = sorted(set(int(e) for e in experts) | {e for e in served if e >= 0})
  equal = 1.0 / max(1, len(known))
  per_expert, flags = {}, []
  for e in known:
    share = expected_share.get(e)
    expected = n_routed * (equal if share is None else share)
    per_expert[str(e)] = {"served": served[e], "routed": routed[e], "expected": expected,
                          "training_share": share}
    if served[e] == 0 and expected >= cfg.dead_min_expected:
      flags.append({"flag": "dead_expert", "expert": e, "served": 0, "routed": routed[e],
                    "expected": expected, "training_share": share, "requests_routed": n_routed,
                    "rule": f"served == 0 and expected >= monitor.dead_min_expected "
                            f"({cfg.dead_min_expected})"})
  out = {"per_expert": per_expert, "base_served": served[-1], "fallback": dict(fallback),
         "unused": [e for e in known if served[e] == 0], "requests_routed": n_routed}
  return out, flags


def windows(records: Sequence[dict], cfg: MonitorConfig) -> tuple[dict[str, Any], list[dict], list[dict]]:
  """The drift reference, the per-window rows (low-confidence share, fallback share, distances, KS
  test) and the drift flags (see the module docstring)."""
  from scipy import stats  # the monitor's only scipy use; a CLI-only cost

  t = np.asarray([r["time"] for r in records], np.float64)
  dist = np.asarray([_num(r.get("distance")) for r in records])
  conf = np.asarray([_num(r.get("confidence")) for r in records])
  thr = np.asarray([_num(r.get("threshold")) for r in records])
  with np.errstate(invalid="ignore"):
    low = conf < thr  # NaN on either side: not low
  fb = np.asarray([bool(r.get("fallback")) for r in records])
  n_ref = min(cfg.reference_requests, len(records))
  ref = dist[:n_ref][~np.isnan(dist[:n_ref])]
  reference = {"requests": int(n_ref), "with_distance": int(ref.size),
               "until": float(t[n_ref - 1]) if n_ref else None, "distance_median": _median(ref),
               "distance_p90": float(np.quantile(ref, 0.9)) if ref.size else None}
  rows, flags = [], []
  if not len(records):
    return reference, rows, flags
  w_of = np.floor((t - t[0]) / cfg.window_s).astype(np.int64)
  for w in range(int(w_of.max()) + 1):
    in_w = w_of == w
    test = in_w & (np.arange(len(records)) >= n_ref) & ~np.isnan(dist)
    row = {"start": float(t[0] + w * cfg.window_s), "end": float(t[0] + (w + 1) * cfg.window_s),
           "requests": int(in_w.sum()), "low_confidence_share": _share(low, in_w),
           "fallback_share": _share(fb, in_w), "tested_requests": int(test.sum()),
           "distance_median": _median(dist[in_w]), "ks": None, "p": None, "drift": False}
    if test.sum() >= cfg.min_window_requests and ref.size >= 2:
      ks = stats.ks_2samp(dist[test], ref)
      row["ks"], row["p"] = float(ks.statistic), float(ks.pvalue)
      row["drift"] = bool(ks.statistic >= cfg.drift_ks and ks.pvalue < cfg.drift_p)
      if row["drift"]:
        flags.append({"flag": "drift", "window_start": row["start"], "window_end": row["end"],
                      "ks": row["ks"], "p": row["p"], "requests": row["tested_requests"],
                      "distance_median": _median(dist[test]),
                      "reference_distance_median": reference["distance_median"],
                      "direction": "farther" if _median(dist[test]) > reference["distance_median"]
                      else "closer",
                      "rule": f"ks >= monitor.drift_ks ({cfg.drift_ks}) and p < monitor.drift_p "
                              f"({cfg.drift_p})"})
    rows.append(row)
  return reference, rows, flags


def _median(x: np.ndarray) -> float | None:
  x = x[~np.isnan(x)]
  return float(np.median(x)) if x.size else None


def _share(mask: np.ndarray, where: np.ndarray) -> float | None:
  return float(mask[where].mean()) if where.any() else None


def summarize(records: Sequence[dict], cfg: MonitorConfig, *, experts: Sequence[int] = (),
              expected_share: dict[int, float] | None = None, bad_lines: int = 0,
              log: str = "") -> dict[str, Any]:
  """The monitor's JSON summary of `records` (see the module docstring).

  Args:
    experts: the experts the router can choose (unused ones are found among them).
    expected_share: each expert's share of the training documents (missing: an equal share).
  """
  check(len(records) > 0, f"{log or 'request log'}: no request records to summarise")
  tr, dead = traffic(records, experts, expected_share or {}, cfg)
  reference, rows, drift = windows(records, cfg)
  notes = []
  if reference["requests"] >= len(records):
    notes.append(f"the drift reference (the first {cfg.reference_requests} requests) covers the whole "
                 "log: drift not tested")
  return {"v": VERSION, "log": str(log), "records": len(records), "bad_lines": int(bad_lines),
          "errors": sum(1 for r in records if r.get("error")),
          "time": {"first": records[0]["time"], "last": records[-1]["time"]},
          "settings": dataclasses.asdict(cfg), "traffic": tr, "reference": reference, "windows": rows,
          "flags": drift + dead, "notes": notes}


def training_shares(eot_k: np.ndarray, topic_counts_k: np.ndarray) -> dict[int, float]:
  """Each expert's share of the training documents from its topics' document counts (router rows
  without documents, e.g. imported experts, are left out: they get an equal share)."""
  eot_k = np.asarray(eot_k)
  counts = np.zeros(eot_k.shape, np.float64)
  counts[:len(topic_counts_k)] = np.asarray(topic_counts_k, np.float64)
  total = counts.sum()
  out: dict[int, float] = {}
  for e in np.unique(eot_k[eot_k >= 0]):
    c = counts[eot_k == e].sum()
    if c > 0:
      out[int(e)] = float(c / total)
  return out

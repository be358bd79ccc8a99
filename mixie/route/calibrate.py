"""The fallback threshold, chosen on a calibration split of TRAINING documents, never on held-out ones.

The calibration split is a fixed-seed subset (`config.seed`) of `route.calibrate_docs` documents of the
clustered dataset's `train` split (documents with more than the routing prefix). They stay in training:
carving them out would change every expert and every published number. That is sound for the rules
here because they read no expert's output, only routing geometry: each document is routed on its
first P tokens and a route is a hit when it reaches the expert of the document's own topic (its
k-means assignment, as evaluation's routing accuracy). The centroids were fit on the full documents'
embeddings, so a calibration document pulls its centroid by ~1 / (its topic's size), and its prefix
embedding is not the vector that was clustered; the experts' perplexity, which IS in-sample on
training documents, is never used.

Rules (`route.calibrate`), `route.calibrate_target` = t:
- "precision": the lowest threshold whose covered documents (confidence >= threshold) are routed to
  their own topic's expert at a rate >= t (the most coverage at routing precision t). No cut reaches
  t: +inf (everything falls back). Every document covered: -inf (nothing falls back).
- "coverage": the highest threshold that covers >= a fraction t of the documents.
Thresholds are cut between distinct confidence values (ties are covered together) and need at least
`MIN_COVERED` covered documents (a precision measured on fewer is noise).

Serving caches its threshold in `workdir/router/calibration.json`, keyed by everything it depends on.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import numpy as np

from mixie import io as mio
from mixie.cluster.topics import dataset_dir
from mixie.data.dataset import open_dataset
from mixie.errors import MixieError, check
from mixie.route.fallback import FallbackConfig, Policy
from mixie.route.router import RouteResult, Router, embed_queries
from mixie.route.run import router_dir

CALIBRATION_JSON = "calibration.json"
MIN_COVERED = 10


def choose_threshold(confidence_n: np.ndarray, hit_n: np.ndarray, rule: str, target: float) -> dict:
  """The threshold of `rule` ("precision" or "coverage") at `target` on calibration routes (see the
  module docstring), with the coverage and precision it gives on them. NaN confidences are left out."""
  conf = np.asarray(confidence_n, np.float64)
  keep = ~np.isnan(conf)
  check(bool(keep.any()), "calibration: every confidence is NaN (route.confidence='vote' outside "
                          "knn routing?)")
  conf, hit = conf[keep], np.asarray(hit_n, bool)[keep]
  n = conf.size
  order = np.argsort(-conf, kind="stable")
  c, h = conf[order], hit[order]
  k = np.arange(1, n + 1)
  ends = np.r_[c[:-1] > c[1:], True]  # a cut after position k-1 covers whole tie groups
  ok = ends & (k >= min(MIN_COVERED, n))
  if rule == "precision":
    ok &= np.cumsum(h) / k >= target
  elif rule == "coverage":
    ok &= k >= math.ceil(target * n - 1e-9)
  else:
    raise MixieError(f"calibration rule must be 'precision' or 'coverage', got {rule!r}")
  if not ok.any():
    threshold, covered = math.inf, 0
  else:
    covered = int(k[ok].max()) if rule == "precision" else int(k[ok].min())
    threshold = -math.inf if covered == n else float(c[covered - 1])
  return {"rule": rule, "target": float(target), "threshold": threshold, "docs": int(n),
          "coverage": covered / n, "precision": float(h[:covered].mean()) if covered else None,
          "precision_all": float(h.mean())}


def calibration_set(config, min_tokens: int) -> tuple[list[np.ndarray], np.ndarray]:
  """Token ids and topics of the calibration documents: a fixed-seed (`config.seed`) subset of
  `route.calibrate_docs` documents of the `train` split with at least `min_tokens` tokens."""
  src = open_dataset(dataset_dir(config.workdir), "train")
  idx = np.flatnonzero(src.lengths >= min_tokens)
  check(idx.size > 0, f"{dataset_dir(config.workdir)}: no training document has {min_tokens} tokens "
                      "or more to calibrate the fallback threshold on")
  k = int(config.route.calibrate_docs)
  if idx.size > k:
    idx = np.sort(np.random.default_rng(int(config.seed)).permutation(idx)[:k])
  recs = src.__getitems__(idx.tolist())
  return [r["tokens"] for r in recs], np.asarray([r["topic"] for r in recs], np.int64)


def calibration_routes(routers: dict[str, Router], embedder, tokenizer, tokens: Sequence[np.ndarray],
                       prefix: int) -> dict[str, RouteResult]:
  """Each router's routes of the documents from their first `prefix` tokens (embedded once)."""
  q_nd = embed_queries(embedder, tokenizer, prefix, token_ids=[[int(t) for t in d[:prefix]]
                                                               for d in tokens])
  return {m: r.route(q_nd) for m, r in routers.items()}


def calibrate(route: RouteResult, own_expert_n: np.ndarray, fb: FallbackConfig) -> dict:
  """`choose_threshold` for routes of calibration documents whose own topic's expert is
  `own_expert_n`, under `fb`'s confidence, rule and target."""
  return choose_threshold(route.confidence(fb.confidence), route.top1 == own_expert_n, fb.calibrate,
                          fb.calibrate_target)


def _key(config, router: Router, fb: FallbackConfig) -> dict[str, Any]:
  """Everything a serving threshold depends on."""
  h = hashlib.sha256(router.centroids.tobytes() + router.expert_of_topic.tobytes())
  if router.doc_topics is not None:
    h.update(router.doc_topics.tobytes())
  return {"router": router.cfg.to_json(), "confidence": fb.confidence, "calibrate": fb.calibrate,
          "target": fb.calibrate_target, "docs": fb.calibrate_docs, "seed": int(config.seed),
          "router_sha256": h.hexdigest()}


def serving_policy(config, router: Router | None, embedder, tokenizer, *, log=print) -> Policy:
  """The fallback `Policy` a server of the run applies (calibrated at `route.route_tokens` on the
  training documents when `route.calibrate` is set; the result is cached, see the module docstring).
  With `route.fallback = "none"` the threshold is still resolved: nothing falls back, but the request
  log records which queries were below it (the monitor's low-confidence share)."""
  fb = FallbackConfig.from_config(config)
  if router is None:
    return Policy(fallback="none", confidence=fb.confidence)
  if not fb.calibrate:
    return Policy(fb.fallback, fb.confidence, float(fb.min_confidence))
  path = router_dir(config.workdir) / CALIBRATION_JSON
  key = _key(config, router, fb)
  if path.exists():
    try:
      saved = mio.read_json(path)
    except MixieError:
      saved = {}
    if saved.get("key") == key:
      return Policy(fb.fallback, fb.confidence, float(saved["result"]["threshold"]))
  prefix = router.cfg.route_tokens
  try:
    tokens, topic_n = calibration_set(config, prefix + 1)
  except MixieError as e:
    if fb.fallback != "none":
      raise
    log(f"mixie: warning: no fallback threshold to log low-confidence queries against ({e})")
    return Policy(fallback="none", confidence=fb.confidence)
  route = calibration_routes({"serve": router}, embedder, tokenizer, tokens, prefix)["serve"]
  res = calibrate(route, router.expert_of_topic[topic_n], fb)
  mio.atomic_write_json(path, {"key": key, "result": mio.json_safe(res)})
  log(f"mixie: fallback threshold {res['threshold']:.4g} on route.confidence={fb.confidence!r} "
      f"(rule {fb.calibrate} {fb.calibrate_target} on {res['docs']} training documents: coverage "
      f"{res['coverage']:.3f})")
  return Policy(fb.fallback, fb.confidence, float(res["threshold"]))


"""Routing fallback: a query whose routing confidence is below a threshold is served by a fallback model.

Settings (config section `route`, see `configs/common.py`):
- `fallback`: "none" (the routed expert serves every query), "base" (the frozen base) or "lora_all"
  (the one-LoRA-on-all-data baseline of the run, `workdir/lora_all`);
- `confidence`: which `RouteResult` confidence is thresholded ("margin", "distance" as minus the
  distance, "vote" as the kNN vote share; `RouteResult.confidence`);
- `min_confidence`: the threshold when `calibrate` is ""; else the threshold is chosen on training
  documents by `mixie.route.calibrate` (rule "precision" or "coverage", target `calibrate_target`).

`Policy` is the resolved rule a server applies: a query is below when its confidence < threshold (a
NaN confidence is never below). `apply_fallback` replaces the routes of the rows below by the fallback.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mixie.errors import ConfigError, check
from mixie.route.router import CONFIDENCES, RouteResult

FALLBACKS = ("none", "base", "lora_all")
CALIBRATE = ("", "precision", "coverage")
LORA_ALL_KEY = 2**31 - 1  # the all-data LoRA's key among expert ids (above every store topic)


@dataclasses.dataclass(frozen=True)
class FallbackConfig:
  """The fallback settings of section `route` (see the module docstring)."""

  fallback: str = "none"
  confidence: str = "margin"
  min_confidence: float = 0.0
  calibrate: str = "precision"
  calibrate_target: float = 0.9
  calibrate_docs: int = 1000

  def __post_init__(self):
    check(self.fallback in FALLBACKS, f"route.fallback must be one of {FALLBACKS}, got "
          f"{self.fallback!r}", ConfigError)
    check(self.confidence in CONFIDENCES, f"route.confidence must be one of {CONFIDENCES}, got "
          f"{self.confidence!r}", ConfigError)
    check(self.calibrate in CALIBRATE, f"route.calibrate must be one of {CALIBRATE}, got "
          f"{self.calibrate!r}", ConfigError)
    check(isinstance(self.min_confidence, (int, float)) and not isinstance(self.min_confidence, bool)
          and not math.isnan(self.min_confidence),
          f"route.min_confidence must be a number, got {self.min_confidence!r}", ConfigError)
    check(isinstance(self.calibrate_target, (int, float)) and 0.0 < self.calibrate_target <= 1.0,
          f"route.calibrate_target must be in (0, 1], got {self.calibrate_target!r}", ConfigError)
    check(isinstance(self.calibrate_docs, int) and not isinstance(self.calibrate_docs, bool)
          and self.calibrate_docs >= 1,
          f"route.calibrate_docs must be an integer >= 1, got {self.calibrate_docs!r}", ConfigError)

  @classmethod
  def from_config(cls, c) -> "FallbackConfig":
    """From a full mixie config (section `route`); "vote" needs `route.mode = "knn"`."""
    r = c.route
    fb = cls(fallback=r.fallback, confidence=r.confidence, min_confidence=r.min_confidence,
             calibrate=r.calibrate, calibrate_target=r.calibrate_target, calibrate_docs=r.calibrate_docs)
    check(fb.confidence != "vote" or r.mode == "knn", "route.confidence='vote' needs route.mode='knn' "
          f"(the vote share exists in knn routing only), got route.mode={r.mode!r}", ConfigError)
    return fb

  def to_json(self) -> dict:
    """The settings as a JSON-able dict."""
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Policy:
  """A resolved fallback rule: rows whose `confidence` is below `threshold` go to `fallback`."""

  fallback: str = "none"
  confidence: str = "margin"
  threshold: float = -math.inf

  def below(self, result: RouteResult) -> np.ndarray:
    """Whether each row of `result` falls back `[n]` (always False with fallback "none")."""
    if self.fallback == "none":
      return np.zeros((len(result.expert_ids),), bool)
    return below(result.confidence(self.confidence), self.threshold)


def below(confidence_n: np.ndarray, threshold: float) -> np.ndarray:
  """`confidence < threshold` `[n]`; a NaN confidence is not below (its route stands)."""
  c = np.asarray(confidence_n, np.float64)
  with np.errstate(invalid="ignore"):
    return np.where(np.isnan(c), False, c < threshold)


def fallback_expert(fallback: str) -> int:
  """The expert id that stands for a fallback model among routes: -1 (base) or `LORA_ALL_KEY`."""
  check(fallback in ("base", "lora_all"), f"no fallback model for route.fallback={fallback!r}",
        ConfigError)
  return -1 if fallback == "base" else LORA_ALL_KEY


def apply_fallback(result: RouteResult, below_n: np.ndarray, expert: int) -> RouteResult:
  """`result` with the rows of `below_n` served by `expert` alone (every one of their k slots holds it,
  weights 1/k: the mixture of k copies is that expert's distribution); confidences kept."""
  ids = result.expert_ids.copy()
  w = result.weights.copy()
  b = np.asarray(below_n, bool)
  ids[b] = expert
  w[b] = 1.0 / ids.shape[1]
  return dataclasses.replace(result, expert_ids=ids, weights=w)

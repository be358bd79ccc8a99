"""The router: query embedding -> expert id(s) and weights.

Modes (`route.mode`):
- `centroid`: the expert of the nearest topic centroid (the MoIN paper).
- `knn`: a vote of the `knn_k` nearest training documents' topics ("majority": one vote each, ties to the
  topic of the nearest voter; "weighted": votes weighted by exp(-d^2 / T)).
- `topk`: the `topk` nearest centroids, weighted by softmax(-d^2 / T) (c-BTM style mixing).
- `oracle`: the query's own topic, given by the caller (evaluation only).

Search runs through `mixie.route.search.Index` (ScaNN brute/tree, or exact numpy). A router saves its
arrays (npz, no pickle) and settings (JSON) and rebuilds its ScaNN index on load.

Queries are embedded by the topics' embedder from their first `route_tokens` tokens only
(`prefix_texts` makes the cut explicit): nothing after the prefix can change a route.

Every `RouteResult` carries confidences, whatever the mode (`mixie.route.fallback` thresholds them):
- `distance`: Euclidean distance from the query to its nearest centroid (in the search's space: unit
  vectors under the cosine metric, where distance^2 = 2 - 2 cos);
- `margin`: distance to the nearest centroid served by another expert (or by the base) minus
  `distance`; +inf when every centroid has the same expert. Centroids of topics merged into one
  expert are not competitors, so the search looks one centroid past the largest such group;
- `vote_share`: in `knn` mode, the winning topic's share of the votes (one vote each, or the
  exp(-d^2/T) weights); NaN in the other modes (a kNN search over all training documents costs far
  more than the centroid search those modes make, so it is not run for a confidence).
`distance` and `margin` describe the query's place among the centroids, also in `knn` and `oracle`
modes (one more search over the centroids, cheap next to the document search).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from mixie import io as mio
from mixie.errors import ConfigError, MixieError, check
from mixie.route.search import Index, SearchConfig

MODES = ("centroid", "knn", "topk", "oracle")
KNN_VOTES = ("majority", "weighted")
ROUTER_JSON = "router.json"
ROUTER_NPZ = "router.npz"


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """Routing settings (config section `route`, metric from `cluster.metric`)."""

  mode: str = "centroid"
  route_tokens: int = 32
  knn_k: int = 16
  knn_vote: str = "majority"
  topk: int = 2
  temperature: float = 0.1
  search: SearchConfig = SearchConfig()

  def __post_init__(self):
    check(self.mode in MODES, f"route.mode must be one of {MODES}, got {self.mode!r}", ConfigError)
    check(self.knn_vote in KNN_VOTES, f"route.knn_vote must be one of {KNN_VOTES}, got {self.knn_vote!r}",
          ConfigError)
    for name in ("route_tokens", "knn_k", "topk"):
      v = getattr(self, name)
      check(isinstance(v, int) and v >= 1, f"route.{name} must be a positive integer, got {v!r}",
            ConfigError)
    check(self.temperature > 0, f"route.temperature must be > 0, got {self.temperature!r}", ConfigError)

  @classmethod
  def from_config(cls, c) -> "RouterConfig":
    """From a full mixie config (sections `route` and `cluster`)."""
    r = c.route
    search = SearchConfig(backend=r.search, metric=c.cluster.metric,
                          tree_threshold=int(r.tree_threshold),
                          tree_search_fraction=float(r.tree_search_fraction))
    return cls(mode=r.mode, route_tokens=int(r.route_tokens), knn_k=int(r.knn_k),
               knn_vote=r.knn_vote, topk=int(r.topk),
               temperature=float(r.temperature), search=search)

  def to_json(self) -> dict[str, Any]:
    """The settings as a JSON-able dict (inverse of `from_json`)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "RouterConfig":
    """Settings from a dict written by `to_json`."""
    d = dict(d)
    d["search"] = SearchConfig(**d.get("search", {}))
    return cls(**d)


CONFIDENCES = ("margin", "distance", "vote")


@dataclasses.dataclass
class RouteResult:
  """Routes of n queries: `expert_ids [n, k]` (int32; -1 = no expert, the base) and `weights [n, k]`
  (float32, rows sum to 1). k = 1 except in `topk` mode. Confidences `[n]` (float32, see the module
  docstring): `distance`, `margin`, `vote_share`; NaN where not known (left out: all NaN)."""

  expert_ids: np.ndarray
  weights: np.ndarray
  distance: np.ndarray | None = None
  margin: np.ndarray | None = None
  vote_share: np.ndarray | None = None

  def __post_init__(self):
    n = len(self.expert_ids)
    for f in ("distance", "margin", "vote_share"):
      v = getattr(self, f)
      setattr(self, f, np.full((n,), np.nan, np.float32) if v is None else
              np.asarray(v, np.float32).reshape(n))

  def confidence(self, kind: str) -> np.ndarray:
    """The confidence `[n]` thresholded by `route.confidence`, higher = surer: "margin" the margin,
    "distance" minus the distance, "vote" the vote share."""
    check(kind in CONFIDENCES, f"route.confidence must be one of {CONFIDENCES}, got {kind!r}",
          ConfigError)
    return {"margin": self.margin, "distance": -self.distance, "vote": self.vote_share}[kind]

  @property
  def top1(self) -> np.ndarray:
    """The highest-weighted expert of each query `[n]`."""
    return self.expert_ids[np.arange(len(self.expert_ids)), np.argmax(self.weights, axis=1)]


def _softmax_neg(d2_nk: np.ndarray, temperature: float) -> np.ndarray:
  z = -d2_nk.astype(np.float64) / temperature
  z -= z.max(axis=1, keepdims=True)
  w = np.exp(z)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def vote(topics_nk: np.ndarray, d2_nk: np.ndarray, n_topics: int, how: str = "majority",
         temperature: float = 0.1) -> np.ndarray:
  """The winning topic of each row of neighbour topics `[n, k]` (nearest first).

  "majority": one vote per neighbour; "weighted": exp(-d^2/T) per neighbour. Ties go to the topic
  whose first voter is nearest.
  """
  return vote_with_share(topics_nk, d2_nk, n_topics, how, temperature)[0]


def vote_with_share(topics_nk: np.ndarray, d2_nk: np.ndarray, n_topics: int, how: str = "majority",
                    temperature: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """`vote`'s winning topic `[n]` and its share of the votes `[n]` (float32, in (0, 1])."""
  n, k = topics_nk.shape
  if n == 0:
    return np.zeros((0,), np.int64), np.zeros((0,), np.float32)
  rows = np.repeat(np.arange(n), k)
  flat = topics_nk.reshape(-1)
  w = np.ones(n * k) if how == "majority" else np.exp(-(d2_nk.reshape(-1) - d2_nk.min(axis=1).repeat(k))
                                                       / temperature)
  score = np.zeros((n, n_topics))
  np.add.at(score, (rows, flat), w)
  first = np.full((n, n_topics), k, np.int64)
  np.minimum.at(first, (rows, flat), np.tile(np.arange(k), n))
  best = score.max(axis=1, keepdims=True)
  tied = np.isclose(score, best, rtol=1e-9, atol=0.0) & (score > 0)
  win = np.argmin(np.where(tied, first, k + 1), axis=1)
  return win, (score[np.arange(n), win] / score.sum(axis=1)).astype(np.float32)


def nearest_other(ids_nm: np.ndarray, d2_nm: np.ndarray, expert_of_topic_k: np.ndarray):
  """Confidences from the m nearest centroids of each query (nearest first): the distance to the
  nearest `[n]` and the margin `[n]` to the nearest one of another expert (+inf when none is among
  the m)."""
  d_nm = np.sqrt(np.maximum(d2_nm, 0.0))
  e_nm = expert_of_topic_k[ids_nm]
  other_nm = e_nm != e_nm[:, :1]
  j = np.argmax(other_nm, axis=1)
  margin = np.where(other_nm.any(axis=1), d_nm[np.arange(len(j)), j] - d_nm[:, 0], np.inf)
  return d_nm[:, 0].astype(np.float32), margin.astype(np.float32)


class Router:
  """Routes query embeddings `[n, d]` to experts (see the module docstring)."""

  def __init__(self, centroids_kd: np.ndarray, cfg: RouterConfig = RouterConfig(), *,
               doc_emb_nd: np.ndarray | None = None, doc_topics_n: np.ndarray | None = None,
               expert_of_topic_k: np.ndarray | None = None):
    """Args:
      centroids_kd: topic centroids (in the embedder's space, any norm).
      cfg: routing settings.
      doc_emb_nd, doc_topics_n: training document embeddings and their topics (needed by `knn`).
      expert_of_topic_k: expert id of each topic (default: topic i -> expert i; -1 = the base).
    """
    self.cfg = cfg
    self.centroids = np.asarray(centroids_kd, np.float32)
    check(self.centroids.ndim == 2 and self.centroids.shape[0] >= 1,
          f"router centroids have shape {self.centroids.shape}; expected [k>=1, d]")
    k = self.centroids.shape[0]
    if expert_of_topic_k is None:
      expert_of_topic_k = np.arange(k)
    self.expert_of_topic = np.asarray(expert_of_topic_k, np.int32)
    check(self.expert_of_topic.shape == (k,),
          f"expert_of_topic has shape {self.expert_of_topic.shape}; expected ({k},)")
    self.doc_emb = None if doc_emb_nd is None else np.asarray(doc_emb_nd, np.float32)
    self.doc_topics = None if doc_topics_n is None else np.asarray(doc_topics_n, np.int32)
    if cfg.mode == "knn":
      check(self.doc_emb is not None and self.doc_topics is not None,
            "route.mode=knn needs the training document embeddings and their topics")
    if self.doc_emb is not None:
      check(self.doc_topics is not None and self.doc_topics.shape == (self.doc_emb.shape[0],),
            "router: doc_topics must have one topic per document embedding")
      check(self.doc_emb.shape[1] == self.dim, f"router: document embeddings have dim "
            f"{self.doc_emb.shape[1]}, centroids {self.dim}")
      check(self.doc_topics.size == 0 or (self.doc_topics.min() >= 0 and self.doc_topics.max() < k),
            f"router: document topics must lie in [0, {k})")
    # enough neighbours for the margin: one past the largest group of centroids sharing an expert
    self.n_confidence = int(min(k, np.unique(self.expert_of_topic, return_counts=True)[1].max() + 1))
    n_nb = cfg.topk if cfg.mode == "topk" else 1
    self.centroid_index = Index(self.centroids, max(n_nb, self.n_confidence), cfg.search)
    self.doc_index = None
    if cfg.mode == "knn":
      self.doc_index = Index(self.doc_emb, cfg.knn_k, cfg.search)

  @property
  def dim(self) -> int:
    """Embedding width of the centroids."""
    return self.centroids.shape[1]

  @property
  def n_topics(self) -> int:
    """Number of topics (centroids) the router chooses among."""
    return self.centroids.shape[0]

  def with_config(self, **changes) -> "Router":
    """The same arrays under changed settings: `mode=...`, or `search=...` (a backend name)."""
    return Router(self.centroids, _replace(self.cfg, **changes), doc_emb_nd=self.doc_emb,
                  doc_topics_n=self.doc_topics, expert_of_topic_k=self.expert_of_topic)

  def exact(self) -> "Router":
    """This router with the exact numpy search (the reference for ScaNN)."""
    return self.with_config(search="numpy")

  def route_topics(self, query_nd: np.ndarray, topics_n: Sequence[int] | None = None):
    """Topic ids `[n, k]` and weights `[n, k]` (before mapping topics to experts)."""
    t, w, _ = self._route(query_nd, topics_n)
    return t, w

  def _route(self, query_nd, topics_n):
    """Topic ids `[n, k]`, weights `[n, k]` and the confidences `(distance, margin, vote_share)`."""
    mode = self.cfg.mode
    q = np.asarray(query_nd, np.float32)
    ids, d2 = self.centroid_index.search(q, max(self.n_confidence, self.cfg.topk if mode == "topk"
                                                else 1))
    distance, margin = nearest_other(ids, d2, self.expert_of_topic)
    share = None
    if mode == "oracle":
      check(topics_n is not None, "route.mode=oracle needs each query's topic (evaluation only)")
      t = np.asarray(topics_n, np.int64).reshape(-1, 1)
      check(t.size == 0 or (t.min() >= 0 and t.max() < self.n_topics),
            f"oracle topics must lie in [0, {self.n_topics})")
      w = np.ones(t.shape, np.float32)
    elif mode == "centroid":
      t, w = ids[:, :1], np.ones((ids.shape[0], 1), np.float32)
    elif mode == "topk":
      t, w = ids[:, :self.cfg.topk], _softmax_neg(d2[:, :self.cfg.topk], self.cfg.temperature)
    else:
      nb, nb_d2 = self.doc_index.search(q, self.cfg.knn_k)
      win, share = vote_with_share(self.doc_topics[nb], nb_d2, self.n_topics, self.cfg.knn_vote,
                                   self.cfg.temperature)
      t, w = win[:, None], np.ones((win.shape[0], 1), np.float32)
    return t, w, (distance, margin, share)

  def route(self, query_nd: np.ndarray, topics_n: Sequence[int] | None = None) -> RouteResult:
    """Routes query embeddings `[n, d]` (`topics_n`: each query's own topic, for `oracle` only), with
    their confidences."""
    t, w, (distance, margin, share) = self._route(query_nd, topics_n)
    return RouteResult(expert_ids=self.expert_of_topic[t].astype(np.int32), weights=w,
                       distance=distance, margin=margin, vote_share=share)

  def route_queries(self, embedder, tokenizer, *, texts: Sequence[str] | None = None,
                    token_ids: Sequence[Sequence[int]] | None = None,
                    topics_n: Sequence[int] | None = None) -> RouteResult:
    """Routes raw queries: embeds the first `route_tokens` tokens of each (see `embed_queries`)."""
    q = embed_queries(embedder, tokenizer, self.cfg.route_tokens, texts=texts, token_ids=token_ids)
    return self.route(q, topics_n)

  # --- persistence ---------------------------------------------------------------------------------

  def save(self, directory) -> None:
    """Writes `router.npz` (arrays) and `router.json` (settings) into `directory`, atomically."""
    d = mio.path(directory)
    arrays = {"centroids": self.centroids, "expert_of_topic": self.expert_of_topic}
    if self.doc_emb is not None:
      arrays["doc_emb"] = self.doc_emb
      arrays["doc_topics"] = self.doc_topics
    mio.save_arrays(d / ROUTER_NPZ, arrays)
    mio.atomic_write_json(d / ROUTER_JSON, {"config": self.cfg.to_json(), "n_topics": self.n_topics,
                                            "dim": self.dim})

  @classmethod
  def load(cls, directory, **overrides) -> "Router":
    """Loads a saved router (rebuilding its index); `overrides` as in `with_config`."""
    d = mio.path(directory)
    meta = mio.read_json(d / ROUTER_JSON)
    arrays = mio.load_arrays(d / ROUTER_NPZ)
    try:
      cfg = RouterConfig.from_json(meta["config"])
      centroids = arrays["centroids"]
      expert_of_topic = arrays["expert_of_topic"]
    except (KeyError, TypeError) as e:
      raise MixieError(f"{d}: corrupt router files (missing {e})") from None
    check(centroids.shape == (meta.get("n_topics"), meta.get("dim")),
          f"{d / ROUTER_NPZ}: centroids have shape {centroids.shape}, {ROUTER_JSON} says "
          f"({meta.get('n_topics')}, {meta.get('dim')})")
    return cls(centroids, _replace(cfg, **overrides), doc_emb_nd=arrays.get("doc_emb"),
               doc_topics_n=arrays.get("doc_topics"), expert_of_topic_k=expert_of_topic)


def _replace(cfg: RouterConfig, **changes) -> RouterConfig:
  """`cfg` with fields changed; `search` may be a backend name."""
  if isinstance(changes.get("search"), str):
    changes["search"] = dataclasses.replace(cfg.search, backend=changes["search"])
  return dataclasses.replace(cfg, **changes)


def prefix_token_ids(tokenizer, route_tokens: int, *, texts: Sequence[str] | None = None,
                     token_ids: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
  """The first `route_tokens` token ids of each query (texts are tokenized by `tokenizer.encode`)."""
  check((texts is None) != (token_ids is None), "route: give exactly one of texts or token_ids")
  if texts is not None:
    token_ids = [tokenizer.encode(t) for t in texts]
  return [list(map(int, ids[:route_tokens])) for ids in token_ids]


def prefix_texts(tokenizer, route_tokens: int, *, texts: Sequence[str] | None = None,
                 token_ids: Sequence[Sequence[int]] | None = None) -> list[str]:
  """The text the router embeds for each query: the decoded first `route_tokens` tokens."""
  return [tokenizer.decode(ids) for ids in
          prefix_token_ids(tokenizer, route_tokens, texts=texts, token_ids=token_ids)]


def embed_queries(embedder, tokenizer, route_tokens: int, *, texts: Sequence[str] | None = None,
                  token_ids: Sequence[Sequence[int]] | None = None) -> np.ndarray:
  """Query embeddings `[n, d]` from the first `route_tokens` tokens of each query only."""
  prefixes = prefix_texts(tokenizer, route_tokens, texts=texts, token_ids=token_ids)
  if not prefixes:
    return np.zeros((0, getattr(embedder, "dim", 0)), np.float32)
  return np.asarray(embedder.embed(prefixes), np.float32)

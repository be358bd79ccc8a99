"""Training a few experts of a run again (new topics of `add`, `retrain`), through the main job's
`train_run` with a scheduler over just those topics.

The data is the run's clustered training split plus the documents added to the store's generation (and
the batch being added), as one random-access source (`CombinedSource`): a record keeps its clustered
topic (mapped to the expert that trains it by the run's small-topic map), an added document has the
topic it joined or formed. Budgets follow `train.budget` over all topics' tokens, added ones included;
each expert trains from a fresh initialisation, or, in a run of `train.init = "seed"`, branches from
the run's seed adapter with its branch budget (`mixie.train.branch`). E = the fewest slots that hold
the topics (at most `train.slots`, a multiple of the mesh's expert axis). Experts are staged in the
store under the operation's session and committed by the caller with the operation's other changes;
the run checkpoints into `workdir/checkpoints/lifecycle/<session>` (removed after the commit), so a
killed operation resumes where it stopped when rerun.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from mixie import io as mio
from mixie.distributed import is_main_process
from mixie.errors import MixieError, check
from mixie.lifecycle.batches import batch_records, store_batches
from mixie.model.checkpoint import fingerprint
from mixie.model.load import load_base
from mixie.model.lora import LoraConfig
from mixie.sharding import mesh_from_config
from mixie.store import ExpertStore, Staging
from mixie.train import branch
from mixie.train.main import TrainData, _stopper, open_train_data, train_run
from mixie.train.metrics import MetricsWriter
from mixie.train.scheduler import token_budgets


@dataclasses.dataclass
class LoadedRun:
  """The base of a run, loaded once for an operation."""

  cfg: Any  # LlamaConfig
  base: Any  # parameters on the mesh
  tokenizer: Any
  fp: str  # the base's fingerprint
  mesh: Any
  rules: tuple


def load_run(config, loaded=None) -> LoadedRun:
  """Loads the base of `config` on its mesh (`loaded`: an already loaded `(cfg, params, tokenizer)`)."""
  mesh = mesh_from_config(config.mesh)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  if loaded is None:
    loaded = load_base(config.model, mesh=mesh, rules=rules, seed=int(config.seed))
  cfg, base, tok = loaded
  check(tok is not None, "model: the base has no tokenizer (a random preset without one?)")
  return LoadedRun(cfg=cfg, base=base, tokenizer=tok, fp=fingerprint(cfg, base), mesh=mesh, rules=rules)


class CombinedSource:
  """The training split and added documents as one source for `PackedLoader` (`topics`, `lengths`,
  `num_topics`, `__getitems__`); records `0..n-1` are the split's, the rest the added documents'."""

  def __init__(self, split, added_tokens: Sequence[np.ndarray], added_topics: np.ndarray, num_topics: int):
    self._split, self._added = split, list(added_tokens)
    self.split = "train+added"
    self.num_topics = int(num_topics)
    self.topics = np.concatenate([split.topics, np.asarray(added_topics, np.int32)]).astype(np.int32)
    self.lengths = np.concatenate([split.lengths, np.asarray([len(t) for t in self._added], np.int32)])

  def __len__(self) -> int:
    return int(self.topics.size)

  def __getitems__(self, idx: Sequence[int]) -> list[dict]:
    n = len(self._split)
    old = [int(i) for i in idx if int(i) < n]
    got = dict(zip(old, self._split.__getitems__(old))) if old else {}
    return [got[int(i)] if int(i) < n else
            {"tokens": np.asarray(self._added[int(i) - n], np.int32), "topic": int(self.topics[int(i)]),
             "doc_id": f"added:{int(i) - n}"} for i in idx]

  def __getitem__(self, i: int) -> dict:
    return self.__getitems__([i])[0]


def lifecycle_data(config, store: ExpertStore, tokens_per_batch: int, *, pending: Sequence[str] = (),
                   centroids: dict[int, Sequence[float]] | None = None) -> TrainData:
  """The run's training data with the added documents of the store's generation and of the batches
  `pending` (an `add` in progress), for every topic (`budgets` over all trained topics).

  Experts beyond the clustered topics take their centroid from their metadata, or from `centroids`."""
  data = open_train_data(config, tokens_per_batch)
  k = data.topic_map.size
  toks, tops = [], []
  for b in list(store_batches(store)) + [b for b in pending if b not in store_batches(store)]:
    t_list, t_n = batch_records(config.workdir, b)
    toks += t_list
    tops.append(t_n)
  added_n = np.concatenate(tops).astype(np.int32) if tops else np.zeros(0, np.int32)
  cents = {t: m.centroid for t, m in store.metas().items() if t >= k and m.centroid is not None}
  cents.update(centroids or {})
  n = max([k] + [int(t) + 1 for t in added_n.tolist()] + [t + 1 for t in cents])
  topic_map = np.full((n,), -1, np.int32)
  topic_map[:k] = data.topic_map
  for t in np.unique(added_n[added_n >= k]).tolist():
    topic_map[t] = t
  source = CombinedSource(data.source, toks, added_n, n)
  counts = np.zeros((n,), np.int64)
  np.add.at(counts, topic_map[source.topics][topic_map[source.topics] >= 0],
            source.lengths[topic_map[source.topics] >= 0].astype(np.int64))
  cent_nd = np.zeros((n, data.centroids.shape[1]), np.float64)
  cent_nd[:k] = data.centroids
  for t, c in cents.items():
    if t < n:
      cent_nd[t] = np.asarray(c, np.float64)
  trained = {int(t): int(counts[t]) for t in np.unique(topic_map[topic_map >= 0])}
  budgets = token_budgets(trained, config.train.budget, int(config.train.tokens_per_expert),
                          min_tokens=tokens_per_batch)
  return TrainData(source=source, topic_map=topic_map, counts=counts, centroids=cent_nd, budgets=budgets,
                   small_report=data.small_report)


def slots_for(config, mesh, n_topics: int) -> int:
  """E for training `n_topics` experts: the fewest slots that hold them, at most `train.slots`, a
  multiple of the mesh's expert axis."""
  n_exp = int(mesh.shape["expert"])
  e = min(int(config.train.slots), max(1, n_topics))
  return -(-e // n_exp) * n_exp


def session_dir(workdir, session: str):
  """Checkpoints of a lifecycle training run."""
  return mio.path(workdir) / "checkpoints" / "lifecycle" / session


def train_topics(config, run: LoadedRun, store: ExpertStore, topics: Sequence[int], session: str, *,
                 pending: Sequence[str] = (), centroids: dict[int, Sequence[float]] | None = None,
                 log=print) -> tuple[Any, Staging]:
  """Trains the experts of `topics` (fresh, or branched from the run's seed) into the store's staging
  session `session`; returns the `LoopResult` and the `Staging` for the caller to commit (see the
  module docstring)."""
  T = int(config.dataset.seq_len)
  data = lifecycle_data(config, store, int(config.train.batch_per_slot) * T, pending=pending,
                        centroids=centroids)
  missing = [t for t in topics if t not in data.budgets]
  if missing:
    raise MixieError(f"{config.workdir}: no training documents for topic(s) {missing} (an imported "
                     "expert, or a topic merged into another: retrain the topic it was merged into)")
  data = dataclasses.replace(data, budgets={int(t): data.budgets[int(t)] for t in topics})
  plan, init = None, None
  if config.train.init == "seed":  # a branched run: the experts branch from its seed adapter again
    plan = branch.plan(config, data.budgets, int(config.train.batch_per_slot) * T)
    init = branch.load(plan.dir, run.fp, LoraConfig.from_config(config.lora))
  c = config.copy_and_resolve_references()
  c.train.slots = slots_for(config, run.mesh, len(topics))
  staging = store.staging(session)
  wd = mio.path(config.workdir)
  metrics = MetricsWriter(wd / "lifecycle" / session / "metrics.jsonl")
  try:
    res = train_run(c, "experts", run.cfg, run.base, run.fp, data, run.tokenizer, run.mesh, run.rules,
                    stop=_stopper(), metrics=metrics, log=log, store=staging,
                    ckpt_dir=session_dir(wd, session), seed_plan=plan, init=init)
  finally:
    metrics.close()
  return res, staging


def finish(config, session: str) -> None:
  """Removes a committed operation's checkpoints (its experts are in the store now)."""
  d = session_dir(config.workdir, session)
  if is_main_process() and d.exists():
    d.rmtree()

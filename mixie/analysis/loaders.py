"""Loaders of a work directory's artefacts into plain numpy arrays and dicts (what the notebooks read).

- `load_topics_data(workdir)`: topics, document embeddings and reference labels (`workdir/topics`);
- `load_texts(workdir)`: text and title of every document (the corpus is re-read with the `data.*`
  settings the cluster stage recorded in `topics/done/embed.json`);
- `load_metrics(workdir)`: loss / lr / grad-norm curves per run and expert (`metrics.jsonl`);
- `load_perplexity(workdir)`: the held-out perplexity tables of `python -m mixie.evaluate`
  (`eval/results.json`), as `mixie.evaluate.plots` draws them;
- `load_routes(workdir, prefix, mode)`: each held-out document's own topic's expert and its routed
  expert, from `eval/per_doc.npz`, else computed with the run's embedder and router (`compute_routes`).
"""

from __future__ import annotations

import copy
import json
from typing import Any, Sequence

import ml_collections
import numpy as np

from configs.common import base_config
from mixie import io as mio
from mixie.cluster.embed import SPEC_JSON, load_embedder
from mixie.cluster.topics import load_embeddings, load_topics, topics_dir
from mixie.data.corpus import load_corpus
from mixie.errors import check
from mixie.evaluate.run import PER_DOC_NPZ, RESULTS_JSON, eval_dir, heldout_set, prefix_routes
from mixie.model.load import load_base, load_tokenizer
from mixie.route.router import RouteResult
from mixie.route.run import build_routers, expert_of_topic
from mixie.store import run_store
from mixie.train.metrics import read_curves

METRICS_JSONL = "metrics.jsonl"


def load_topics_data(workdir) -> dict[str, Any]:
  """The topics of `workdir` with the document embeddings and reference labels.

  Keys: `workdir`, `num_topics` K, `metric`, `doc_ids` [N] (corpus order), `topic_n` int [N],
  `heldout_n` bool [N], `sizes_k` (training documents per topic), `emb_nd` float32 [N, d],
  `centroids_kd`, `label_n` int [N] (-1: none), `label_names` (list), `quality` (quality.json).
  """
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
  return mio.read_json(topics_dir(workdir) / "done" / f"{step}.json")["settings"]


def load_texts(workdir, doc_ids: Sequence[str] | None = None) -> dict[str, list[str]]:
  """`{"texts": [...], "titles": [...]}` of the documents `doc_ids` (default: all of the topics, in
  corpus order), re-read from the corpus with the `data.*` settings the cluster stage recorded."""
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


def load_metrics(workdir) -> dict[str, dict[int, dict[str, np.ndarray]]] | None:
  """Curves from `workdir/metrics.jsonl` (`mixie.train.metrics.read_curves`): `{mode: {topic: {"step",
  "tokens", "loss", "lr", "grad_norm"}}}`; None when the file does not exist."""
  return read_curves(mio.path(workdir) / METRICS_JSONL)


def load_perplexity(workdir) -> dict[str, Any] | None:
  """The held-out evaluation of `workdir` (`eval/results.json` of `python -m mixie.evaluate`, the input
  of `mixie.evaluate.plots`) with its path under `"source"`; None when the run was not evaluated."""
  p = eval_dir(workdir) / RESULTS_JSON
  return {**mio.read_json(p), "source": str(p)} if p.exists() else None


def compute_routes(workdir, *, prefix: int, mode: str = "centroid", config=None) -> dict[str, Any]:
  """Routes of the held-out documents of `workdir` from their first `prefix` tokens, computed with the
  run's embedder and a `mode` router over its topics and experts (as `mixie.evaluate` does).

  `config`: a full mixie config for the router settings (`route.*`) and `eval.max_docs`; default: the
  defaults of `configs.common` with this work directory's clustering metric. The base tokenizer is
  the one the dataset was tokenized with (recorded in `topics/done/dataset.json`).
  """
  topics = load_topics(workdir)
  if config is None:
    config = base_config()
    config.cluster.metric = topics.metric
  else:
    config = copy.deepcopy(config)
  config.workdir = str(workdir)
  store = run_store(workdir)
  check(bool(store.topics()), f"{store.dir}: no trained experts to route to")
  eot_k = expert_of_topic(store, topics.num_topics)
  m = _marker_settings(workdir, "dataset")
  model = {k.split(".", 1)[1]: m.get(k, "") for k in ("model.source", "model.path", "model.preset")}
  tok = load_tokenizer(model["source"], model["path"], model["preset"])
  edir = topics_dir(workdir) / "embedder"
  base = None
  if mio.read_json(edir / SPEC_JSON).get("kind") == "base":
    for k, v in model.items():
      config.model[k] = v
    base = load_base(config.model, seed=int(config.seed))
  embedder = load_embedder(edir, base=base, batch=int(config.cluster.embed_batch))
  held = heldout_set(config, prefix + 1)
  routers = build_routers(config, store, (mode,))
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
  results_p, per_doc_p = eval_dir(workdir) / RESULTS_JSON, eval_dir(workdir) / PER_DOC_NPZ
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
    prefix = int((base_config() if config is None else config).route.route_tokens)
  return compute_routes(workdir, prefix=prefix, mode=mode, config=config)


"""Prefix-routed held-out perplexity: `evaluate(config) -> dict`, written to `workdir/eval/`.

For every P in `eval.prefix_tokens`, each held-out document is routed on its first P tokens only and
scored on the tokens after them only, so nothing the router saw is scored and nothing scored can
change a route. `prefix_routes` cuts the P-token prefix before anything else sees the document: the
embedder gets the decoded prefix (`mixie.route.router.embed_queries`), nothing more.

Rows of the table (each scored on the same documents and tokens):
- `base`: the frozen base; `lora_all`: the one-LoRA-on-all-data baseline (when trained);
  `lora_all_wide`: the same at rank E·r (when trained); `full`: the continued pre-training baseline
  (when trained);
- `centroid`, `knn`, `topk` (`eval.route_modes`): the routed experts; `topk` mixes its k experts'
  next-token distributions with the router's weights, in probability space;
- `oracle`: each document's own topic's expert (the clustering's assignment: the routing loss is the
  gap between a routed row and this one).
A document whose expert does not exist (a skipped small topic) is scored by the base. Columns:
token-weighted perplexity over all documents and per topic (the document's topic in the clustered
dataset), and routing accuracy: the fraction of documents whose (top-1) routed expert is their own
topic's expert. Every row also states its training tokens and FLOPs (`mixie.compute`; `results["compute"]`).

Scoring runs once per distinct (document, expert) pair over all rows and all P: the per-token
log-likelihoods of `mixie.evaluate.ppl.pair_logprobs` (a jitted, vmapped mixed-expert forward, one
compiled shape), then every row and every P is host arithmetic on them (`mixture_scores`). The rows,
their scoring and the tables, as dicts and as text (`format_table`), are `mixie.evaluate.tables`; this
module finds the documents, routes and models and writes the outputs.

Outputs, each written atomically:

    workdir/eval/results.json   the tables (one per P) and the settings they were made with
    workdir/eval/per_doc.npz    per document: id, topic, own expert, and for every P and row the summed
                                NLL, the tokens scored and (routed rows) the experts and weights
    workdir/eval/perplexity.png, prefix_effect.png
                                per topic at the largest P, and against P relative to the base, with
                                routing accuracy (`mixie.evaluate.plots`, which the notebooks draw too)
    workdir/eval/coverage.json, coverage.png
                                coverage vs perplexity with a fallback model, the threshold calibrated
                                on training documents (`mixie.evaluate.coverage`)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mixie import io as mio
from mixie.cluster.embed import load_embedder
from mixie.cluster.topics import dataset_dir, load_topics, topics_dir
from mixie.compute import row_compute
from mixie.data.dataset import open_dataset
from mixie.distributed import is_main_process
from mixie.errors import ConfigError, MixieError, check
from mixie.evaluate import plots
from mixie.evaluate.coverage import coverage_report
from mixie.evaluate.ppl import bucket
from mixie.evaluate.tables import prefix_table, score_pairs, table_rows
from mixie.model.checkpoint import fingerprint
from mixie.model.load import load_base
from mixie.route.fallback import FallbackConfig
from mixie.route.router import MODES, RouteResult, RouterConfig, embed_queries
from mixie.route.run import build_routers, expert_of_topic
from mixie.serve.cache import ExpertCache
from mixie.sharding import mesh_from_config
from mixie.store import load_tree, run_store
from mixie.train import divergence

ROUTED_MODES = tuple(m for m in MODES if m != "oracle")  # what a router chooses alone (oracle is a row)
RESULTS_JSON = "results.json"
PER_DOC_NPZ = "per_doc.npz"


def eval_dir(workdir):
  """Where `evaluate` writes."""
  return mio.path(workdir) / "eval"


# ---------------------------------------------------------------------------------------------------
# Config.


def prefix_lengths(config) -> tuple[int, ...]:
  """`eval.prefix_tokens` as a sorted tuple of distinct ints (validated)."""
  raw = config.eval.prefix_tokens
  raw = (raw,) if isinstance(raw, int) else tuple(raw)
  if not raw or any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in raw):
    raise ConfigError(f"eval.prefix_tokens must be a non-empty tuple of integers >= 1, got {raw!r}")
  return tuple(sorted(set(raw)))


def validate_eval_config(config) -> None:
  """Checks the settings `evaluate` uses; raises `ConfigError` naming the field. No compute."""
  if not config.get("workdir"):
    raise ConfigError("workdir must be set (--config.workdir=...)")
  ps = prefix_lengths(config)
  e = config.eval
  for f, lo in (("max_docs", 0), ("batch", 1)):
    v = e[f]
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
      raise ConfigError(f"eval.{f} must be an integer >= {lo}, got {v!r}")
  modes = tuple(e.route_modes)
  bad = [m for m in modes if m not in ROUTED_MODES]
  if bad:
    raise ConfigError(f"eval.route_modes: unknown mode(s) {bad}; choose from {list(ROUTED_MODES)}")
  T = config.dataset.seq_len
  if not isinstance(T, int) or ps[-1] + 2 > T:
    raise ConfigError(f"eval.prefix_tokens: the largest P ({ps[-1]}) leaves no token to score in "
                      f"rows of dataset.seq_len={T} tokens (need P + 2 <= seq_len)")
  RouterConfig.from_config(config)  # route.* (knn_k, topk, temperature, search)
  FallbackConfig.from_config(config)  # route.fallback, confidence, calibrate* (the coverage curve)


# ---------------------------------------------------------------------------------------------------
# Held-out documents and their routes.


@dataclasses.dataclass
class HeldOut:
  """The evaluated held-out documents."""

  tokens: list[np.ndarray]  # token ids of each document (no BOS / EOS)
  topic_n: np.ndarray  # int64 [n]: the document's topic in the clustered dataset
  doc_ids: list[str]
  total: int  # documents in the held-out split (before `eval.max_docs`)
  too_short: int  # documents left out: no more than max(P) tokens


def heldout_set(config, min_tokens: int) -> HeldOut:
  """The held-out split (a fixed-seed subset of `eval.max_docs` when > 0), keeping documents with at
  least `min_tokens` tokens."""
  src = open_dataset(dataset_dir(config.workdir), "heldout")
  idx = np.arange(len(src))
  k = int(config.eval.max_docs)
  if k and idx.size > k:
    idx = np.sort(np.random.default_rng(int(config.seed)).permutation(idx)[:k])
  keep = idx[src.lengths[idx] >= min_tokens]
  check(keep.size > 0, f"{dataset_dir(config.workdir)}: no held-out document has {min_tokens} tokens "
                       f"or more ({len(src)} in the split; raise data.heldout_fraction or lower "
                       "eval.prefix_tokens)")
  recs = src.__getitems__(keep.tolist())
  return HeldOut(tokens=[r["tokens"] for r in recs], topic_n=np.asarray([r["topic"] for r in recs], np.int64),
                 doc_ids=[r["doc_id"] for r in recs], total=len(src), too_short=int(idx.size - keep.size))


def prefix_routes(routers: dict, embedder, tokenizer, tokens: Sequence[Sequence[int]], prefix: int,
                  oracle_expert_n: np.ndarray) -> dict[str, RouteResult]:
  """Routes of each document from its first `prefix` tokens only, per mode, plus `oracle`.

  The documents are cut to their prefixes first; the embedder sees only the decoded prefixes.
  """
  prefixes = [[int(t) for t in doc[:prefix]] for doc in tokens]
  del tokens  # nothing below can see past the prefix
  q_nd = embed_queries(embedder, tokenizer, prefix, token_ids=prefixes)
  out = {m: r.route(q_nd) for m, r in routers.items()}
  n = len(prefixes)
  out["oracle"] = RouteResult(expert_ids=np.asarray(oracle_expert_n, np.int32).reshape(n, 1),
                              weights=np.ones((n, 1), np.float32))
  return out


# ---------------------------------------------------------------------------------------------------
# Models: the experts, the baselines.


class _Experts:
  """Loads experts by key for the `ExpertCache`: topic id -> that topic's expert; `lora_all_key` -> the
  all-data LoRA. Every expert must share the rank, alpha and targets of `lora`."""

  def __init__(self, store, lora_all_store, lora_all_key: int, lora, fp: str):
    self.store, self.lora_all, self.key_all = store, lora_all_store, lora_all_key
    self.lora, self.fp = lora, fp

  def __call__(self, key: int):
    st, topic = (self.lora_all, 0) if key == self.key_all else (self.store, key)
    return st.load(topic, self.fp, self.lora)[0]


def _replicated_like(params):
  """A replicated sharding on the mesh the base lives on (None for a single-device base)."""
  from jax.sharding import NamedSharding, PartitionSpec

  s = jax.tree.leaves(params)[0].sharding if isinstance(jax.tree.leaves(params)[0], jax.Array) else None
  return NamedSharding(s.mesh, PartitionSpec()) if isinstance(s, NamedSharding) else None


def load_full(workdir, params, fp: str):
  """The continued-pre-training base of the run (placed like `params`), or None when not trained."""
  d = mio.path(workdir) / "full"
  if not (d / "meta.json").exists():
    return None
  meta = mio.read_json(d / "meta.json")
  if meta.get("base_fingerprint") != fp:
    raise MixieError(f"{d}: continued pre-training started from base {meta.get('base_fingerprint')}, "
                     f"the loaded base is {fp}")
  full = load_tree(d / "params.safetensors")
  shapes = jax.tree.map(np.shape, params)
  check(jax.tree.map(np.shape, full) == shapes, f"{d / 'params.safetensors'}: parameter shapes differ "
                                                "from the base's")
  return jax.tree.map(lambda x, p: jax.device_put(np.asarray(x, p.dtype), p.sharding), full, params)


def _committed(params):
  """`params` as arrays committed to where they are (no copy), as `load_full` places its copy: both
  models then hit one compiled scoring function."""
  return jax.tree.map(lambda x: jax.device_put(x, x.sharding) if isinstance(x, jax.Array)
                      else jax.device_put(x, jax.local_devices()[0]), params)


# ---------------------------------------------------------------------------------------------------
# The evaluation.


def evaluate(config, *, loaded=None, fp: str | None = None, log: Callable[[str], Any] = print,
             progress: bool | None = None) -> dict[str, Any]:
  """Evaluates the run in `config.workdir` (see the module docstring); returns the results dict.

  Args:
    loaded: `(LlamaConfig, params, Tokenizer)` of the base when already loaded (the main job passes
      its own); else loaded from `config.model`.
    fp: the base's fingerprint when known.
  """
  t_start = time.time()
  validate_eval_config(config)
  ps = prefix_lengths(config)
  modes = tuple(config.eval.route_modes)
  wd = mio.path(config.workdir)
  store = run_store(wd)
  check(bool(store.topics()), f"{store.dir}: no trained experts; run `python -m mixie.train "
                              "--config=...` first")
  K = load_topics(wd).num_topics
  eot_k = expert_of_topic(store, K)
  all_key = max([K] + [t + 1 for t in store.topics()])  # lora_all's key: above every expert id (imports)
  lora = store.lora()
  if loaded is None:  # on the config's mesh: a batch's rows are split over every device (of every process)
    loaded = load_base(config.model, mesh=mesh_from_config(config.mesh), seed=int(config.seed),
                       rules=tuple(tuple(r) for r in config.mesh.rules))
  cfg, params, tokenizer = loaded
  check(tokenizer is not None, "model: the base has no tokenizer; evaluation needs one")
  fp = fp or fingerprint(cfg, params)
  params = _committed(params)
  docs = _model_docs(config, ps, cfg, tokenizer)
  n, oracle_n = len(docs.held.tokens), eot_k[docs.held.topic_n]

  # routes for every P (the embedder and the router see the first P tokens only)
  routers = build_routers(config, store, modes)
  embedder = load_embedder(topics_dir(wd) / "embedder", base=(cfg, params, tokenizer),
                           batch=int(config.cluster.embed_batch))
  routes = {p: prefix_routes(routers, embedder, tokenizer, docs.held.tokens, p, oracle_n) for p in ps}

  models, has_lora_all = _models(config, wd, store, lora, all_key, cfg, params, fp)
  rows = table_rows(models, has_lora_all, modes, routes, n, all_key)
  scored = score_pairs(models, rows, ps, docs.seqs, docs.length, cfg=cfg, all_key=all_key,
                       batch=int(config.eval.batch), progress=progress)
  per_doc: dict[str, np.ndarray] = {"doc_id": np.asarray(docs.held.doc_ids), "topic": docs.held.topic_n,
                                    "own_expert": oracle_n.astype(np.int64), "length": docs.len_n}
  by_prefix = {str(p): prefix_table(p, rows, scored, len_n=docs.len_n, topic_n=docs.held.topic_n,
                                    start=p + docs.n_bos, oracle_n=oracle_n, per_doc=per_doc) for p in ps}

  coverage = coverage_report(config, eval_dir(wd), routers=routers, embedder=embedder, tokenizer=tokenizer,
                             routes=routes, per_doc=per_doc, fallbacks=[r for r in ("base", "lora_all")
                                                                        if r in rows.fixed], log=log)
  held = docs.held
  results = {
      "coverage": coverage, "prefix_tokens": list(ps), "rows": rows.names,
      "topics": sorted(set(held.topic_n.tolist())), "docs": n,
      "heldout_docs": held.total, "docs_too_short": held.too_short, "max_len": docs.max_len,
      "expert_of_topic": {str(t): int(e) for t, e in enumerate(eot_k)},
      "by_prefix": by_prefix,
      "route": {**RouterConfig.from_config(config).to_json(), "modes": list(modes)},
      "lora": {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)},
      "compute": row_compute(wd, rows.names, cfg, int(config.dataset.seq_len)),
      "base_fingerprint": fp, "pairs_scored": scored.pairs, "scoring_seconds": round(scored.seconds, 1),
      "seconds": round(time.time() - t_start, 1),
      "diverged": divergence.load(wd),  # experts that diverged in training (marked in the table)
  }
  out = eval_dir(wd)
  if is_main_process():  # every process computed the same tables; one writes them
    _write_outputs(out, per_doc, results)
  log(f"mixie.evaluate: {n} held-out documents ({held.too_short} with <= {ps[-1]} tokens left out"
      f"{f', a subset of {held.total}' if held.total > n + held.too_short else ''}), {scored.pairs} "
      f"(document, expert) pairs scored in {scored.seconds:.0f}s; results in {out}")
  return results


@dataclasses.dataclass
class _Docs:
  """The held-out documents as the model sees them: [BOS] tokens EOS, cut to the training row length."""

  held: HeldOut
  seqs: list[list[int]]
  len_n: np.ndarray  # int64 [n]: tokens of each sequence
  length: int  # the one padded row length every sequence is scored at (one compile)
  max_len: int  # the row length they were cut to
  n_bos: int  # 1 when a BOS leads each sequence, else 0


def _model_docs(config, ps: tuple[int, ...], cfg, tokenizer) -> _Docs:
  """The held-out documents with more than max(P) tokens, as token sequences of the base."""
  held = heldout_set(config, ps[-1] + 1)
  bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
  max_len = min(int(config.dataset.seq_len), cfg.max_seq_len)
  seqs = [(bos + doc.tolist() + [tokenizer.eos_ids[0]])[:max_len] for doc in held.tokens]
  len_n = np.asarray([len(s) for s in seqs], np.int64)
  return _Docs(held=held, seqs=seqs, len_n=len_n, length=min(bucket(int(len_n.max())), cfg.max_seq_len),
               max_len=max_len, n_bos=len(bos))


def _models(config, wd, store, lora, all_key: int, cfg, params, fp: str) -> tuple[dict[str, tuple], bool]:
  """The scored models by name, each `(params, ExpertCache)`: `base` (with the experts and lora_all),
  and, when trained, `full` (continued pre-training) and `wide` (lora_all_wide, its own rank: its own
  cache); and whether lora_all was trained."""
  batch, sharding = int(config.eval.batch), _replicated_like(params)
  lora_all_store = run_store(wd, "lora_all")
  cache = ExpertCache(cfg, lora, _Experts(store, lora_all_store, all_key, lora, fp), batch, sharding=sharding)
  models = {"base": (params, cache)}
  full = load_full(wd, params, fp)
  if full is not None:
    models["full"] = (full, cache)
  wide_store = run_store(wd, "lora_all_wide")
  if 0 in wide_store:
    wide = wide_store.lora()
    models["wide"] = (params, ExpertCache(cfg, wide, lambda key: wide_store.load(0, fp, wide)[0], batch,
                                          sharding=sharding))
  return models, 0 in lora_all_store


def _write_outputs(out, per_doc: dict[str, np.ndarray], results: dict[str, Any]) -> None:
  """per_doc.npz, the two plots, then results.json."""
  mio.save_arrays(out / PER_DOC_NPZ, per_doc)
  plots.plot_perplexity(results, save_dir=out)
  plots.plot_prefix_effect(results, save_dir=out)
  mio.atomic_write_json(out / RESULTS_JSON, results)

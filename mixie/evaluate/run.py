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
compiled shape), then every row and every P is host arithmetic on them (`mixture_scores`).

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
from mixie.compute import format_flops, row_compute
from mixie.data.dataset import open_dataset
from mixie.errors import ConfigError, MixieError, check
from mixie.evaluate import plots
from mixie.evaluate.coverage import coverage_report
from mixie.evaluate.ppl import (bucket, by_group, mixture_scores, pair_logprobs, perplexity,
                                row_sharding_of)
from mixie.model.checkpoint import fingerprint
from mixie.model.load import load_base
from mixie.route.fallback import FallbackConfig
from mixie.route.router import MODES, RouteResult, RouterConfig, embed_queries
from mixie.route.run import build_routers, expert_of_topic
from mixie.serve.cache import ExpertCache
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
                      else jax.device_put(x, jax.devices()[0]), params)


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
  topics = load_topics(wd)
  K = topics.num_topics
  eot_k = expert_of_topic(store, K)
  all_key = max([K] + [t + 1 for t in store.topics()])  # lora_all's key: above every expert id (imports)
  lora = store.lora()
  if loaded is None:
    loaded = load_base(config.model, seed=int(config.seed))
  cfg, params, tokenizer = loaded
  check(tokenizer is not None, "model: the base has no tokenizer; evaluation needs one")
  fp = fp or fingerprint(cfg, params)
  params = _committed(params)

  # documents as the model sees them: [BOS] tokens EOS, cut to the training row length
  held = heldout_set(config, ps[-1] + 1)
  n = len(held.tokens)
  bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
  max_len = min(int(config.dataset.seq_len), cfg.max_seq_len)
  seqs = [(bos + doc.tolist() + [tokenizer.eos_ids[0]])[:max_len] for doc in held.tokens]
  len_n = np.asarray([len(s) for s in seqs], np.int64)
  length = min(bucket(int(len_n.max())), cfg.max_seq_len)  # one padded row length: one compile
  oracle_n = eot_k[held.topic_n]

  # routes for every P (the embedder and the router see the first P tokens only)
  routers = build_routers(config, store, modes)
  embedder = load_embedder(topics_dir(wd) / "embedder", base=(cfg, params, tokenizer),
                           batch=int(config.cluster.embed_batch))
  routes = {p: prefix_routes(routers, embedder, tokenizer, held.tokens, p, oracle_n) for p in ps}

  # every row as (model, expert keys [n, g], weights [n, g]); key -1: the base, all_key: lora_all
  lora_all_store = run_store(wd, "lora_all")
  full = load_full(wd, params, fp)
  ones = np.ones((n, 1), np.float32)
  fixed = {"base": ("base", np.full((n, 1), -1, np.int64), ones)}
  if 0 in lora_all_store:
    fixed["lora_all"] = ("base", np.full((n, 1), all_key, np.int64), ones)
  wide_store = run_store(wd, "lora_all_wide")  # its own rank: scored through its own cache
  if 0 in wide_store:
    fixed["lora_all_wide"] = ("wide", np.zeros((n, 1), np.int64), ones)
  if full is not None:
    fixed["full"] = ("full", np.full((n, 1), -1, np.int64), ones)
  rows = list(fixed) + list(modes) + ["oracle"]

  def row_spec(row, p):
    if row in fixed:
      return fixed[row]
    r = routes[p][row]
    return "base", r.expert_ids.astype(np.int64), r.weights

  # distinct (document, expert) pairs per model, scored once
  cache = ExpertCache(cfg, lora, _Experts(store, lora_all_store, all_key, lora, fp), int(config.eval.batch),
                      sharding=_replicated_like(params))
  caches = {"base": cache, "full": cache}
  if "lora_all_wide" in fixed:
    wide = wide_store.lora()
    caches["wide"] = ExpertCache(cfg, wide, lambda key: wide_store.load(0, fp, wide)[0],
                                 int(config.eval.batch), sharding=_replicated_like(params))
  doc_ng = lambda g: np.repeat(np.arange(n)[:, None], g, axis=1)
  lp, index = {}, {}
  t0 = time.time()
  n_pairs = 0
  for model, mparams in (("base", params), ("full", full), ("wide", params if "wide" in caches else None)):
    if mparams is None:
      continue
    specs = [s for s in (row_spec(r, p) for r in rows for p in ps) if s[0] == model]
    codes = np.unique(np.concatenate([(doc_ng(k.shape[1]) * (all_key + 2) + k + 1).ravel()
                                      for _, k, _ in specs]))
    lp[model] = pair_logprobs(mparams, caches[model], seqs, codes // (all_key + 2), codes % (all_key + 2) - 1,
                              cfg=cfg, lora_scale=caches[model].lora.scale, batch=int(config.eval.batch), length=length,
                              row_sharding=row_sharding_of(mparams, int(config.eval.batch)),
                              progress=progress)
    index[model] = codes
    n_pairs += codes.size
  score_s = time.time() - t0

  # the tables
  topic_ids = sorted(set(held.topic_n.tolist()))
  per_doc: dict[str, np.ndarray] = {"doc_id": np.asarray(held.doc_ids), "topic": held.topic_n,
                                    "own_expert": oracle_n.astype(np.int64), "length": len_n}
  by_prefix = {}
  for p in ps:
    start_n = np.full((n,), p + len(bos), np.int64)
    tab: dict[str, Any] = {"ppl": {}, "ppl_per_topic": {}, "routing_accuracy": {},
                           "routing_accuracy_per_topic": {}}
    for row in rows:
      model, key_ng, w_ng = row_spec(row, p)
      codes = doc_ng(key_ng.shape[1]) * (all_key + 2) + key_ng + 1
      pair_ng = np.searchsorted(index[model], codes)
      nll, cnt = mixture_scores(lp[model], len_n, pair_ng, w_ng, start_n)
      tab["ppl"][row] = perplexity(nll, cnt)
      tab["ppl_per_topic"][row] = {str(t): v for t, v in by_group(nll, cnt, held.topic_n).items()}
      per_doc[f"p{p}.{row}.nll"], per_doc[f"p{p}.{row}.tokens"] = nll, cnt
      if row in fixed:
        tab["routing_accuracy"][row] = None
        continue
      top1 = routes[p][row].top1.astype(np.int64)
      hit = top1 == oracle_n
      tab["routing_accuracy"][row] = float(hit.mean())
      tab["routing_accuracy_per_topic"][row] = {str(t): float(hit[held.topic_n == t].mean())
                                                for t in topic_ids}
      if row != "oracle":
        per_doc[f"p{p}.{row}.experts"] = key_ng
        per_doc[f"p{p}.{row}.weights"] = w_ng.astype(np.float32)
    tab["tokens"] = int(cnt.sum())
    tab["tokens_per_topic"] = {str(t): int(cnt[held.topic_n == t].sum()) for t in topic_ids}
    tab["docs_per_topic"] = {str(t): int((held.topic_n == t).sum()) for t in topic_ids}
    by_prefix[str(p)] = tab

  coverage = coverage_report(config, eval_dir(wd), routers=routers, embedder=embedder, tokenizer=tokenizer,
                             routes=routes, per_doc=per_doc, fallbacks=[r for r in ("base", "lora_all")
                                                                        if r in fixed], log=log)
  results = {
      "coverage": coverage, "prefix_tokens": list(ps), "rows": rows, "topics": topic_ids, "docs": n,
      "heldout_docs": held.total, "docs_too_short": held.too_short, "max_len": max_len,
      "expert_of_topic": {str(t): int(e) for t, e in enumerate(eot_k)},
      "by_prefix": by_prefix,
      "route": {**RouterConfig.from_config(config).to_json(), "modes": list(modes)},
      "lora": {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)},
      "compute": row_compute(wd, rows, cfg, int(config.dataset.seq_len)),
      "base_fingerprint": fp, "pairs_scored": int(n_pairs), "scoring_seconds": round(score_s, 1),
      "seconds": round(time.time() - t_start, 1),
      "diverged": divergence.load(wd),  # experts that diverged in training (marked in the table)
  }
  out = eval_dir(wd)
  mio.save_arrays(out / PER_DOC_NPZ, per_doc)
  plots.plot_perplexity(results, save_dir=out)
  plots.plot_prefix_effect(results, save_dir=out)
  mio.atomic_write_json(out / RESULTS_JSON, results)
  log(f"mixie.evaluate: {n} held-out documents ({held.too_short} with <= {ps[-1]} tokens left out"
      f"{f', a subset of {held.total}' if held.total > n + held.too_short else ''}), {n_pairs} "
      f"(document, expert) pairs scored in {score_s:.0f}s; results in {out}")
  return results


# ---------------------------------------------------------------------------------------------------
# Text.


def format_table(results: dict[str, Any]) -> str:
  """The tables (one per P) as aligned text."""
  topics = [str(t) for t in results["topics"]]
  bad_rows, bad_topics, footnote = divergence.table_marks(results)  # diverged in training: marked
  mark = lambda name, bad: name + (divergence.MARK if bad else "")  # noqa: E731

  def line(label, overall, per_topic, acc=""):
    return f"{label:<14}{overall:>10}" + "".join(f"{v:>10}" for v in per_topic) + f"{acc:>7}"

  lines = ["held-out perplexity on the tokens after the first P (the router sees only those P; "
           "oracle = each document's own topic's expert; acc = routed to that expert)"]
  for p in results["prefix_tokens"]:
    tab = results["by_prefix"][str(p)]
    head = line(f"P={p}", "overall", [mark(f"topic {t}", t in bad_topics) for t in topics], "acc")
    lines += ["", head, "-" * len(head),
              line("docs", results["docs"], [tab["docs_per_topic"][t] for t in topics]),
              line("tokens", tab["tokens"], [tab["tokens_per_topic"][t] for t in topics])]
    for row in results["rows"]:
      acc = tab["routing_accuracy"][row]
      ppl = [f"{tab['ppl_per_topic'][row][t]:.3f}" for t in topics]
      lines.append(line(mark(row, row in bad_rows), f"{tab['ppl'][row]:.3f}", ppl,
                        "-" if acc is None else f"{acc:.3f}"))
  if results.get("compute"):
    lines += ["", "training compute (mixie.compute: tokens trained on, model FLOPs)",
              f"{'row':<14}{'tokens':>14}{'FLOPs':>12}"]
    for row in results["rows"]:
      c = results["compute"].get(row, {})
      tok = "-" if c.get("tokens") is None else str(c["tokens"])
      lines.append(f"{row:<14}{tok:>14}{format_flops(c.get('flops')):>12}")
  return "\n".join(lines + ([footnote] if footnote else []))

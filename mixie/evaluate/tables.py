"""The evaluation's tables: what each row is scored with, the scoring, the tables as dicts and as text.

A row is `(model, expert keys [n, g], weights [n, g])` at each prefix length P (`Rows`): the baselines
route nothing (the same at every P), the routed modes and oracle take their experts from the routes.
`score_pairs` scores every distinct (document, expert) pair of all rows and all P once per model
(`mixie.evaluate.ppl.pair_logprobs`); `prefix_table` turns those scores into one P's perplexities and
routing accuracies on the host; `format_table` prints the tables. `mixie.evaluate.run.evaluate` drives
them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np

from mixie.compute import format_flops
from mixie.evaluate.plots import shown_topics
from mixie.evaluate.ppl import by_group, mixture_scores, pair_logprobs, perplexity, row_sharding_of
from mixie.route.router import RouteResult
from mixie.train import divergence


@dataclasses.dataclass
class Rows:
  """The rows of the table, each `(model, expert keys [n, g], weights [n, g])` at every P; key -1: the
  base alone, `all_key`: lora_all."""

  fixed: dict[str, tuple]  # the rows that route nothing: the same at every P
  routes: dict[int, dict[str, RouteResult]]  # P -> the routed rows' routes (and oracle's)
  names: list[str]  # every row, in table order

  def spec(self, row: str, p: int) -> tuple[str, np.ndarray, np.ndarray]:
    """`(model, keys [n, g], weights [n, g])` of `row` at prefix length `p`."""
    if row in self.fixed:
      return self.fixed[row]
    r = self.routes[p][row]
    return "base", r.expert_ids.astype(np.int64), r.weights


def table_rows(models: dict, has_lora_all: bool, modes: Sequence[str], routes: dict, n: int,
               all_key: int) -> Rows:
  """The baselines that were trained (`models` holds `full` and `wide` when they were), then the routed
  `modes`, then oracle, for `n` documents."""
  ones = np.ones((n, 1), np.float32)
  fixed = {"base": ("base", np.full((n, 1), -1, np.int64), ones)}
  if has_lora_all:
    fixed["lora_all"] = ("base", np.full((n, 1), all_key, np.int64), ones)
  if "wide" in models:
    fixed["lora_all_wide"] = ("wide", np.zeros((n, 1), np.int64), ones)
  if "full" in models:
    fixed["full"] = ("full", np.full((n, 1), -1, np.int64), ones)
  return Rows(fixed=fixed, routes=routes, names=list(fixed) + list(modes) + ["oracle"])


def _pair_codes(key_ng: np.ndarray, all_key: int) -> np.ndarray:
  """One int per (document, expert key) pair of `[n, g]` keys (key -1, the base alone, included)."""
  n, g = key_ng.shape
  return np.repeat(np.arange(n)[:, None], g, axis=1) * (all_key + 2) + key_ng + 1


@dataclasses.dataclass
class Scored:
  """Per-token log-likelihoods of every distinct (document, expert) pair, per model."""

  lp: dict[str, Any]  # model -> `pair_logprobs` of its pairs
  index: dict[str, np.ndarray]  # model -> its pairs' sorted `_pair_codes`
  all_key: int
  seconds: float  # wall time of the scoring

  @property
  def pairs(self) -> int:
    """(document, expert) pairs scored over all models."""
    return int(sum(c.size for c in self.index.values()))

  def mixture(self, model: str, key_ng, w_ng, len_n, start_n):
    """`mixture_scores` (summed NLL, tokens scored per document) of a row on its model's pairs."""
    pair_ng = np.searchsorted(self.index[model], _pair_codes(key_ng, self.all_key))
    return mixture_scores(self.lp[model], len_n, pair_ng, w_ng, start_n)


def score_pairs(models: dict, rows: Rows, ps: Sequence[int], seqs: Sequence[Sequence[int]], length: int, *,
                cfg, all_key: int, batch: int, progress: bool | None) -> Scored:
  """Scores the distinct (document, expert) pairs of every row and every P once per model (`models`:
  name -> `(params, ExpertCache)`), every sequence padded to `length`."""
  t0 = time.time()
  lp, index = {}, {}
  for model, (mparams, cache) in models.items():
    specs = [s for s in (rows.spec(r, p) for r in rows.names for p in ps) if s[0] == model]
    codes = np.unique(np.concatenate([_pair_codes(k, all_key).ravel() for _, k, _ in specs]))
    lp[model] = pair_logprobs(mparams, cache, seqs, codes // (all_key + 2), codes % (all_key + 2) - 1,
                              cfg=cfg, lora_scale=cache.lora.scale, batch=batch, length=length,
                              row_sharding=row_sharding_of(mparams, batch), progress=progress)
    index[model] = codes
  return Scored(lp=lp, index=index, all_key=all_key, seconds=time.time() - t0)


def prefix_table(p: int, rows: Rows, scored: Scored, *, len_n: np.ndarray, topic_n: np.ndarray, start: int,
                 oracle_n: np.ndarray, per_doc: dict[str, np.ndarray]) -> dict[str, Any]:
  """The table at prefix length `p` (each document scored from token `start` on): perplexity and routing
  accuracy per row, overall and per topic; adds each row's per-document NLL and tokens (and routed
  experts and weights) to `per_doc`."""
  topic_ids = sorted(set(topic_n.tolist()))
  start_n = np.full((len(topic_n),), start, np.int64)
  tab: dict[str, Any] = {"ppl": {}, "ppl_per_topic": {}, "routing_accuracy": {},
                         "routing_accuracy_per_topic": {}}
  for row in rows.names:
    model, key_ng, w_ng = rows.spec(row, p)
    nll, cnt = scored.mixture(model, key_ng, w_ng, len_n, start_n)
    tab["ppl"][row] = perplexity(nll, cnt)
    tab["ppl_per_topic"][row] = {str(t): v for t, v in by_group(nll, cnt, topic_n).items()}
    per_doc[f"p{p}.{row}.nll"], per_doc[f"p{p}.{row}.tokens"] = nll, cnt
    if row in rows.fixed:
      tab["routing_accuracy"][row] = None
      continue
    hit = rows.routes[p][row].top1.astype(np.int64) == oracle_n
    tab["routing_accuracy"][row] = float(hit.mean())
    tab["routing_accuracy_per_topic"][row] = {str(t): float(hit[topic_n == t].mean()) for t in topic_ids}
    if row != "oracle":
      per_doc[f"p{p}.{row}.experts"] = key_ng
      per_doc[f"p{p}.{row}.weights"] = w_ng.astype(np.float32)
  tab["tokens"] = int(cnt.sum())
  tab["tokens_per_topic"] = {str(t): int(cnt[topic_n == t].sum()) for t in topic_ids}
  tab["docs_per_topic"] = {str(t): int((topic_n == t).sum()) for t in topic_ids}
  return tab


def format_table(results: dict[str, Any]) -> str:
  """The tables (one per P) as aligned text (per-topic columns: `shown_topics`)."""
  topics = shown_topics(results)
  bad_rows, bad_topics, footnote = divergence.table_marks(results)  # diverged in training: marked
  mark = lambda name, bad: name + (divergence.MARK if bad else "")  # noqa: E731

  def line(label, overall, per_topic, acc=""):
    return f"{label:<14}{overall:>10}" + "".join(f"{v:>10}" for v in per_topic) + f"{acc:>7}"

  lines = ["held-out perplexity on the tokens after the first P (the router sees only those P; "
           "oracle = each document's own topic's expert; acc = routed to that expert)"]
  if len(topics) < len(results["topics"]):
    lines.append(f"(the {len(topics)} of {len(results['topics'])} topics with the most documents; every "
                 "topic is in eval/results.json)")
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

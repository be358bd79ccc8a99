"""Per-document log-likelihood of the base, of one expert, or of a different expert per document.

`score_docs` returns, for every document, the summed negative log-likelihood of its tokens from
position `score_from` on and the number of tokens scored; perplexities are `exp(sum nll / sum n)` over
any grouping (overall token-weighted, per topic). Every batch of a call is right-padded to one length
(the longest document, rounded up to 32), so a call compiles once and calls with the same documents
reuse it; with causal attention padding never changes a real position's logits.

Per-document experts (`expert_ids`) gather each row's expert from a stack and vmap the one-expert
forward over the rows, the base broadcast: the same code path as training and serving.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixie.errors import check
from mixie.model.llama import LlamaConfig, forward, token_logprobs


def _bucket(n: int, quantum: int = 32) -> int:
  return max(quantum, -(-n // quantum) * quantum)


@functools.partial(jax.jit, static_argnames=("cfg", "lora_scale", "mode"))
def _nll_rows(params, experts, ids_b, tokens_bt, mask_bt, *, cfg, lora_scale, mode):
  """Summed NLL and token count per row; `mask_bt[:, t]` scores the prediction of token t+1."""
  if mode == "per_row":
    def one(ids, toks):
      e = jax.tree.map(lambda x: x[ids], experts)
      return forward(params, e, toks[None], cfg, lora_scale=lora_scale)[0][0]
    logits = jax.vmap(one)(ids_b, tokens_bt)
  else:
    logits = forward(params, experts if mode == "shared" else None, tokens_bt, cfg, lora_scale=lora_scale)[0]
  lp = token_logprobs(logits[:, :-1], tokens_bt[:, 1:])
  m = mask_bt[:, 1:]
  return -(lp * m).sum(-1), m.sum(-1)


def score_docs(params, expert, docs: Sequence[Sequence[int]], cfg: LlamaConfig, *,
               lora_scale: float = 1.0, expert_ids: Sequence[int] | None = None, batch: int = 16,
               max_len: int = 512, score_from: int | Sequence[int] = 1) -> tuple[np.ndarray, np.ndarray]:
  """`(nll_sum [n], n_tokens [n])` of each document.

  Args:
    params: the base.
    expert: None (the base alone), one expert (every document), or a stack of experts `[K, ...]`
      indexed per document by `expert_ids`.
    docs: token id lists (what the model sees, e.g. BOS + tokens + EOS); cut to `max_len`.
    cfg, lora_scale: the architecture and the experts' alpha / rank.
    expert_ids: with a stacked `expert`, the index of each document's expert.
    batch: documents per forward.
    score_from: first position whose token is scored (>= 1: position 0 has no context), one for all
      documents or one per document (e.g. after a routing prefix of P tokens: P).
  """
  n = len(docs)
  starts = np.broadcast_to(np.asarray(score_from, np.int64), (n,))
  check(bool(np.all(starts >= 1)), "score_docs: score_from must be >= 1")
  mode = "base" if expert is None else ("per_row" if expert_ids is not None else "shared")
  ids_all = np.zeros(n, np.int32) if expert_ids is None else np.asarray(expert_ids, np.int32)
  check(ids_all.shape == (n,), f"score_docs: expert_ids has shape {ids_all.shape}, expected ({n},)")
  nll, cnt = np.zeros(n, np.float64), np.zeros(n, np.int64)
  expert = None if expert is None else jax.tree.map(jnp.asarray, expert)  # on device once, not per batch
  lengths = np.asarray([min(len(d), max_len) for d in docs])
  T = _bucket(int(lengths.max()) if n else 1)
  for i in range(0, n, batch):
    idx = np.arange(i, min(i + batch, n))
    tok = np.zeros((batch, T), np.int32)
    mask = np.zeros((batch, T), np.float32)
    ids = np.zeros(batch, np.int32)
    for j, d in enumerate(idx):
      L = int(lengths[d])
      tok[j, :L] = np.asarray(docs[d][:L], np.int32)
      mask[j, int(starts[d]):L] = 1.0
      ids[j] = ids_all[d]
    s, c = _nll_rows(params, expert, ids, tok, mask, cfg=cfg, lora_scale=float(lora_scale), mode=mode)
    s, c = np.asarray(s), np.asarray(c)
    nll[idx], cnt[idx] = s[:len(idx)], c[:len(idx)].astype(np.int64)
  return nll, cnt


def perplexity(nll: np.ndarray, n_tokens: np.ndarray) -> float:
  """Token-weighted perplexity of a set of documents."""
  total = float(np.sum(n_tokens))
  return float(np.exp(np.sum(nll) / total)) if total > 0 else float("nan")


def by_group(nll: np.ndarray, n_tokens: np.ndarray, groups: np.ndarray) -> dict[int, float]:
  """Perplexity per group id (e.g. per topic)."""
  groups = np.asarray(groups)
  return {int(g): perplexity(nll[groups == g], n_tokens[groups == g]) for g in np.unique(groups)}



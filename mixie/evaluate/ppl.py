"""Held-out scoring: per-token log-likelihoods of (document, expert) pairs, mixtures, perplexities.

`pair_logprobs` scores m (document, expert) pairs: for each pair the log-probability of every token of
the document given its prefix, under the base plus that pair's expert. It is the serving engine's
mixed-expert forward (`mixie.serve.batched`): the rows of a batch gather their experts from an
on-device `ExpertCache` (`[c, ...]` -> `[b, ...]`; expert -1 is the zero expert, exactly the base) and
the model is `nnx.vmap`ped over the rows with the base broadcast. Pairs are sorted by expert, so a batch
touches few experts and each expert is loaded about once; every batch has the same `[batch, length]`
shape, so a call compiles once.

Everything an evaluation table needs follows on the host from those per-token values:
`mixture_scores` sums the log-likelihood of each document's tokens from a start position on, under one
expert or a weighted mixture of several (topk routing mixes the experts' next-token distributions in
probability space: p(x_t) = sum_g w_g p_g(x_t), which for the observed token is exactly the mixture of
the full distributions), and `perplexity` / `by_group` turn sums into token-weighted perplexities.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from mixie.errors import MixieError, check
from mixie.model.llama import LlamaConfig, token_logprobs
from mixie.serve.batched import gather_experts, rows_forward


def bucket(n: int, quantum: int = 32) -> int:
  """`n` rounded up to a multiple of `quantum` (one compiled length for similar documents)."""
  return max(quantum, -(-n // quantum) * quantum)


@functools.partial(jax.jit, static_argnames=("cfg", "lora_scale"))
def rows_token_logprobs(params, slots_c, slot_b, tokens_bt, *, cfg: LlamaConfig, lora_scale: float):
  """log p(tokens[:, t+1] | tokens[:, :t+1]) `[b, t-1]`, row i with the expert in slot `slot_b[i]`
  of `slots_c` (-1: the base)."""
  experts_b = gather_experts(slots_c, slot_b)
  logits_btv = rows_forward(params, experts_b, tokens_bt, cfg, lora_scale=lora_scale)
  return token_logprobs(logits_btv[:, :-1], tokens_bt[:, 1:])


def row_sharding_of(params, batch: int):
  """A sharding of a batch's rows over the base's mesh (every axis but `model`), or None (a base on one
  device, or a batch those axes do not divide)."""
  from jax.sharding import NamedSharding, PartitionSpec

  leaf = jax.tree.leaves(params)[0]
  s = getattr(leaf, "sharding", None)
  if not isinstance(s, NamedSharding):
    return None
  axes = tuple(a for a in s.mesh.axis_names if a != "model" and s.mesh.shape[a] > 1)
  n = int(np.prod([s.mesh.shape[a] for a in axes])) if axes else 1
  if n == 1 or batch % n:
    return None
  return NamedSharding(s.mesh, PartitionSpec(axes))


def _place(x: np.ndarray, sharding) -> jax.Array:
  """A host array (the same on every process) as a global array with leading-axis `sharding`."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def pair_logprobs(params, cache, seqs: Sequence[Sequence[int]], doc_m: Sequence[int],
                  key_m: Sequence[int], *, cfg: LlamaConfig, lora_scale: float, batch: int,
                  length: int, row_sharding=None, progress: bool | None = None) -> np.ndarray:
  """Per-token log-likelihoods `[m, length-1]` (float32) of m (document, expert) pairs.

  Args:
    params: the base (or any parameters of its shapes, e.g. a continued-pre-training base).
    cache: a `mixie.serve.cache.ExpertCache` with at least `batch` slots; `key_m[i]` is the id its
      `load_fn` loads (-1: no expert, the base).
    seqs: token ids of each document as the model sees it (BOS + tokens + EOS), at most `length` long.
    doc_m, key_m: the pairs: document index into `seqs` and expert id.
    batch: rows per forward; length: the padded row length (one compiled shape).
    row_sharding: a sharding of the rows `[batch]` over the base's devices (`row_sharding_of`), so
      each device scores its share of a batch; None: rows not split.

  Row i, column j holds log p(seqs[doc_m[i]][j+1] | ...[:j+1]); columns past a document's end are 0.
  Raises `MixieError` when an expert cannot be loaded.
  """
  doc_m, key_m = np.asarray(doc_m, np.int64), np.asarray(key_m, np.int64)
  m = doc_m.size
  check(key_m.shape == (m,), f"pair_logprobs: {m} documents but {key_m.size} expert ids")
  check(cache.capacity >= batch, f"pair_logprobs: the expert cache has {cache.capacity} slots, fewer "
                                 f"than the batch ({batch} rows)")
  lens = np.asarray([len(seqs[d]) for d in doc_m], np.int64)
  check(m == 0 or int(lens.max()) <= length, f"pair_logprobs: a document has {lens.max()} tokens, "
                                             f"more than the row length {length}")
  order = np.lexsort((doc_m, key_m))  # by expert: few experts per batch
  chunks = [order[i:i + batch] for i in range(0, m, batch)]
  bar = None
  if progress or (progress is None and len(chunks) > 8):
    from tqdm.auto import tqdm
    bar = tqdm(total=m, desc="eval", unit="row", leave=False)
  lp_mt = np.zeros((m, length - 1), np.float32)
  pending = None  # batch i is read back after batch i+1 is dispatched: the host never idles the device

  def read(p):
    idx, lp = p
    if not lp.is_fully_addressable:  # rows on other hosts' devices
      from jax.experimental import multihost_utils
      lp = multihost_utils.process_allgather(lp, tiled=True)
    lp_mt[idx] = np.asarray(jax.device_get(lp))[:len(idx)]
    if bar is not None:
      bar.update(len(idx))

  for idx in chunks:
    tokens = np.zeros((batch, length), np.int32)
    keys = np.full((batch,), -1, np.int64)
    for r, i in enumerate(idx):
      s = seqs[doc_m[i]]
      tokens[r, :len(s)] = s
      keys[r] = key_m[i]
    slot_b, errors = cache.slots_for(keys)
    if errors:
      raise MixieError(next(iter(errors.values())))
    if row_sharding is not None:
      slot_b, tokens = _place(slot_b, row_sharding), _place(tokens, row_sharding)
    lp = rows_token_logprobs(params, cache.slots_c, slot_b, tokens, cfg=cfg, lora_scale=float(lora_scale))
    if pending is not None:
      read(pending)
    pending = (idx, lp)
  if pending is not None:
    read(pending)
  if bar is not None:
    bar.close()
  lp_mt[np.arange(length - 1)[None, :] >= (lens - 1)[:, None]] = 0.0  # past each document's end
  return lp_mt


def mixture_scores(lp_mt: np.ndarray, len_n: np.ndarray, pair_ng: np.ndarray, weight_ng: np.ndarray,
                   start_n: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """`(nll_sum [n], n_tokens [n])` of n documents scored from position `start_n` on.

  Document d is scored under the mixture of its g experts `pair_ng[d]` (rows of `lp_mt`) with weights
  `weight_ng[d]` (summing to 1): per token, log sum_g w_g p_g(token). g = 1 is one expert (weight 1).
  Tokens at positions `start_n[d] <= t < len_n[d]` are scored (position 0 has no context: start >= 1).
  """
  len_n, start_n = np.asarray(len_n, np.int64), np.asarray(start_n, np.int64)
  pair_ng, weight_ng = np.asarray(pair_ng, np.int64), np.asarray(weight_ng, np.float64)
  n, g = pair_ng.shape
  check(weight_ng.shape == (n, g) and len_n.shape == (n,) and start_n.shape == (n,),
        "mixture_scores: pair_ng, weight_ng, len_n and start_n disagree in shape")
  check(bool(np.all(start_n >= 1)), "mixture_scores: start positions must be >= 1")
  nll, cnt = np.zeros(n, np.float64), np.maximum(len_n - start_n, 0)
  cols = np.arange(lp_mt.shape[1])[None, :]
  logw_ng = np.log(np.maximum(weight_ng, 1e-300))
  for i in range(0, n, chunk):
    sl = slice(i, i + chunk)
    lp_ngt = lp_mt[pair_ng[sl]].astype(np.float64)
    if g == 1:
      mix_nt = lp_ngt[:, 0]
    else:
      z = lp_ngt + logw_ng[sl, :, None]
      zmax = z.max(axis=1, keepdims=True)
      mix_nt = (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))[:, 0]
    scored = (cols >= (start_n[sl] - 1)[:, None]) & (cols < (len_n[sl] - 1)[:, None])
    nll[sl] = -np.where(scored, mix_nt, 0.0).sum(axis=1)
  return nll, cnt


def perplexity(nll: np.ndarray, n_tokens: np.ndarray) -> float:
  """Token-weighted perplexity of a set of documents."""
  total = float(np.sum(n_tokens))
  return float(np.exp(np.sum(nll) / total)) if total > 0 else float("nan")


def by_group(nll: np.ndarray, n_tokens: np.ndarray, groups: np.ndarray) -> dict[int, float]:
  """Perplexity per group id (e.g. per topic)."""
  groups = np.asarray(groups)
  return {int(g): perplexity(nll[groups == g], n_tokens[groups == g]) for g in np.unique(groups)}

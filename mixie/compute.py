"""Training compute of every row of an evaluation table: tokens and FLOPs, from one set of formulas.

Conventions (the "model FLOPs" of scaling-law papers, exact for this model's train step):

- A multiply-add is 2 FLOPs; only matrix multiplications are counted (norms, RoPE, softmax, the
  optimizer update and the embedding lookup are O(d) per token and left out).
- A matmul `y = x @ W` with `x: [n, i]`, `W: [i, o]` costs `2·i·o` per token forward. Its backward is
  up to two matmuls of the same size: the activation gradient `dx = dy @ W^T` (which the trainable
  parameters of earlier layers need) and the weight gradient `dW = x^T @ dy` (only when W trains).
  Hence the familiar totals: `6N` per token for full training (forward + activation + weight
  gradients) and `4N` for a frozen base (forward + activation gradients, which the LoRA updates of
  earlier layers need), where `N` (`matmul_params`) counts the weights of the per-token matmuls: the
  seven projections of every layer and the LM head (tied or not; the embedding lookup is a gather).
- LoRA on a projection `(x @ A) @ B · alpha/r` with `A: [i, r]`, `B: [r, o]`: forward `2r(i + o)`;
  backward `dB = h^T dy` (`2ro`), `dh = dy B^T` (`2ro`), `dA = x^T dh` (`2ir`) and `dx = dh A^T`
  (`2ir`): `6r(i + o)` per target, per layer, per token.
- Attention of a training row of T positions, per layer and per token, with q-width `n·h`: the scores
  `q k^T` (`2·T·n·h`) and the weighted values `p v` (`2·T·n·h`) forward, the full `T x T` matrix as
  the XLA implementation computes it (a causal kernel that skips the masked half would do about half);
  backward `dp = do v^T`, `dv = p^T do`, `dq = ds k`, `dk = ds^T q`, each `2·T·n·h`.
- Every layer's activation gradients are counted, layer 0's included: the layers are one scanned body,
  whose transpose computes the gradient of the carried activations in every iteration (with a frozen
  base, the one below layer 0 is then dropped). So the formulas match the compiled step's matmuls
  exactly; a test counts them in XLA's optimised HLO.
- Recomputation is not counted (`model.remat`, and the LM head + loss recomputed chunk by chunk when
  a slot's rows exceed `train.ce_chunk`): these are model FLOPs, not hardware FLOPs.

Training FLOPs of a row = FLOPs per token x its training tokens (the loss-scored targets the trainer
counted; document-end positions, about 1% of a packed row, and empty slots are not counted). Rows:
`base` 0; `lora_all` / `lora_all_wide` their own tokens at their own rank; `full` at 6N; every routed
row and `oracle` the sum over the experts (each at its rank), plus the seed adapter's tokens when the
experts were branched from one (`train.init = "seed"`). Clustering and routing compute are not counted.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mixie import io as mio
from mixie.errors import ConfigError, MixieError
from mixie.model.llama import LlamaConfig
from mixie.model.lora import LoraConfig
from mixie.store import ExpertStore, run_store


def _dims(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
  """(in, out) of each projection of one layer."""
  d, f = cfg.d_model, cfg.d_ff
  qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  return {"q": (d, qd), "k": (d, kvd), "v": (d, kvd), "o": (qd, d), "gate": (d, f), "up": (d, f),
          "down": (f, d)}


def matmul_params(cfg: LlamaConfig) -> int:
  """N: weights of the per-token matmuls (every layer's seven projections and the LM head)."""
  per_layer = sum(i * o for i, o in _dims(cfg).values())
  return cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: LlamaConfig, seq_len: int, lora: LoraConfig | None) -> int:
  """Training FLOPs per token: `lora=None` is full training (every base weight), else the frozen base
  plus one LoRA of `lora`'s rank and targets. See the module docstring for what is counted."""
  full = lora is None
  qd = cfg.n_heads * cfg.head_dim
  per_layer = 0
  for name, (i, o) in _dims(cfg).items():
    per_layer += 2 * i * o * (3 if full else 2)  # forward, activation gradient (+ weight gradient)
    if not full and name in lora.targets:
      per_layer += 6 * int(lora.rank) * (i + o)  # forward, dB, dh, dA, dx
  per_layer += 12 * int(seq_len) * qd  # scores and values, forward and backward
  head = 2 * cfg.d_model * cfg.vocab_size * (3 if full else 2)
  return cfg.n_layers * per_layer + head


# ---------------------------------------------------------------------------------------------------
# Rows of a work directory.


def _part(what: str, tokens: int | None, fpt: int | None) -> dict[str, Any]:
  flops = None if tokens is None or fpt is None else float(tokens) * float(fpt)
  return {"what": what, "tokens": tokens, "flops_per_token": fpt, "flops": flops}


def _total(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  tok = [p["tokens"] for p in parts]
  fl = [p["flops"] for p in parts]
  return {"tokens": None if None in tok else int(sum(tok)), "flops": None if None in fl else float(sum(fl)),
          "parts": list(parts)}


def _seed_part(seed: Any, T: int, cfg: LlamaConfig, where: str) -> dict[str, Any]:
  """The compute part of the seed adapter a branched expert records in its metadata's `seed`
  (`mixie.train.branch.load`); MixieError naming `where` when that record is malformed."""
  try:
    lora = LoraConfig(rank=int(seed["rank"]), alpha=float(seed["alpha"]), targets=tuple(seed["targets"]))
    tokens = seed.get("tokens_seen")
    return _part("seed adapter", None if tokens is None else int(tokens),
                 train_flops_per_token(cfg, int(seed.get("seq_len") or T), lora))
  except (KeyError, TypeError, ValueError, ConfigError) as e:
    raise MixieError(f"{where}: field 'seed' is not a seed adapter's record ({e})") from None


def store_parts(store: ExpertStore, cfg: LlamaConfig, seq_len: int, what: str) -> list[dict[str, Any]]:
  """Compute parts of every expert of an `ExpertStore` (plus, once, the seed they branched from)."""
  parts, seeds = [], {}
  for t, meta in store.metas().items():
    T = meta.seq_len or seq_len
    parts.append(_part(f"{what} {t}", meta.tokens_seen, train_flops_per_token(cfg, T, meta.lora)))
    seed = meta.extra.get("seed")
    if isinstance(seed, Mapping):
      seeds[seed.get("dir", "")] = _seed_part(seed, T, cfg, str(store.meta_file(t)))
  return parts + list(seeds.values())


def row_compute(workdir, rows: Sequence[str], cfg: LlamaConfig, seq_len: int) -> dict[str, dict[str, Any]]:
  """`{row: {"tokens", "flops", "parts"}}` for the rows of `mixie.evaluate` in `workdir` (None where a
  part's tokens are unknown, e.g. imported experts)."""
  wd = mio.path(workdir)
  out: dict[str, dict[str, Any]] = {}
  experts = None
  for row in rows:
    if row == "base":
      out[row] = _total([])
    elif row in ("lora_all", "lora_all_wide"):
      out[row] = _total(store_parts(run_store(wd, row), cfg, seq_len, row))
    elif row == "full":
      meta = mio.read_json(wd / "full" / "meta.json")
      tokens = meta.get("tokens_seen", meta.get("tokens"))
      fpt = train_flops_per_token(cfg, int(meta.get("seq_len", seq_len)), None)
      out[row] = _total([_part("full", None if tokens is None else int(tokens), fpt)])
    else:  # a routed row or oracle: every expert of the store
      experts = experts if experts is not None else _total(
          store_parts(run_store(wd), cfg, seq_len, "expert"))
      out[row] = experts
  return out


def format_flops(x: float | None) -> str:
  """`1.23e15`-style text ("-" for unknown)."""
  return "-" if x is None else f"{x:.3g}"

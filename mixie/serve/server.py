"""The serving engine: route prompts, then decode them in one batch where each row uses its own expert.

`Server.generate(prompts)`:
1. tokenizes the prompts and routes each on its first `route_tokens` tokens (`Router.route_queries`);
2. fetches the rows' experts into the on-device LRU cache (`ExpertCache`), loading misses from the
   expert store; a prompt whose expert is missing or corrupt gets an error `Result`, the rest go on;
3. decodes the batch with `generate_rows`' two halves (`prefill_rows`, then the decode loop
   `decode_rows`, timed apart; KV cache, greedy or sampled, stop tokens, right-padded prompts of
   mixed lengths). In `topk` mode each prompt occupies
   k rows whose next-token distributions are mixed with the router's weights.

Batches are padded to power-of-two rows and prompt lengths to a multiple of `length_bucket`, so a
server compiles a few shapes, not one per request.

Generations (`mixie.store`): the server reads one committed generation of its store (`view`). Before
each batch (`generate`, `generate_tokens`) it reads the store's CURRENT pointer (one small file); when
another generation was committed (`python -m mixie.experts add / retrain / retire / restore / rollback`)
it switches to it without a restart: the router is rebuilt for it (`router_builder`, which
`mixie.serve.run.make_server` sets; without one the router is kept), and the cached experts whose weight
file's hash changed, or which the new generation lacks, are dropped from the expert cache. It never reads
a generation before its commit, so it never serves a half-written expert.

Fallback and log (both optional, set from a run's config by `mixie.serve.run.configure_server`): a prompt
whose routing confidence is below the `policy`'s threshold is served by the fallback model (the base,
or the all-data LoRA under the key `LORA_ALL_KEY`; `mixie.route.fallback`), and every prompt of a
`generate` call is appended to the `request_log` (`mixie.serve.request_log`) once its tokens are back.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixie.errors import ConfigError, check
from mixie.model.checkpoint import fingerprint
from mixie.model.llama import LlamaConfig
from mixie.model.lora import LoraConfig
from mixie.route.fallback import LORA_ALL_KEY, Policy, apply_fallback, fallback_expert
from mixie.route.router import RouteResult, prefix_token_ids
from mixie.serve.batched import decode_rows, gather_experts, prefill_rows
from mixie.serve.cache import ExpertCache
from mixie.serve.request_log import RequestLog, request_records
from mixie.store import ExpertStore


@dataclasses.dataclass
class Result:
  """One prompt's answer: generated `text` and `tokens` (stop token excluded), its top-1 `expert`
  (-1 = the base), all its `experts` with their weights, or the `error` that failed it; `fallback`:
  "" or the fallback model that served it ("base", "lora_all"; then `expert` is -1 and `experts`
  empty); the route's `confidence` (distance, margin, vote_share) and `latency_ms` of its batch."""

  text: str = ""
  tokens: list[int] = dataclasses.field(default_factory=list)
  expert: int = -1
  error: str | None = None
  experts: tuple[tuple[int, float], ...] = ()
  fallback: str = ""
  confidence: dict[str, float] = dataclasses.field(default_factory=dict)
  latency_ms: dict[str, float] = dataclasses.field(default_factory=dict)


def _bucket_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


class Server:
  """Routes and serves prompts with a frozen base and per-prompt LoRA experts."""

  def __init__(self, base_cfg: LlamaConfig, params, tokenizer, store: ExpertStore, router, embedder,
               cache_slots: int = 16, *, lora: LoraConfig | None = None,
               base_fingerprint: str | None = None, length_bucket: int = 32,
               policy: Policy | None = None, lora_all_store: ExpertStore | None = None,
               request_log: RequestLog | None = None, log_source: str = "server",
               router_builder: Callable[[ExpertStore], object] | None = None):
    """Args:
      base_cfg, params: the frozen base model.
      tokenizer: `encode(text) -> ids`, `decode(ids) -> text`, `eos_ids` (`mixie.model.tokenizer`).
      store: the `ExpertStore` of the run; experts are keyed by topic id.
      router: a `mixie.route.router.Router`, or None (every prompt gets the base).
      embedder: the topics' embedder (`embed(texts) -> [n, d]`); unused without a router.
      cache_slots: experts held on device at once.
      lora: the experts' rank/alpha/targets; default: read from the store's first expert.
      base_fingerprint: the base's `mixie.model.checkpoint.fingerprint` (computed when None); experts
        trained on another base are refused.
      policy: the fallback rule (`mixie.route.fallback.Policy`; default: no fallback).
      lora_all_store: the store of the all-data LoRA (topic 0), for the "lora_all" fallback.
      request_log, log_source: where `generate` logs its prompts (None: nowhere), and as what.
      router_builder: the router of a generation of the store (a pinned `ExpertStore` view), called when
        the server switches generations (None: the router is kept).
    """
    self.cfg = base_cfg
    self.params = params
    self.tokenizer = tokenizer
    self.store = store
    self.view = store if store.pinned is not None else store.at()  # the generation served
    self.router = router
    self.router_builder = router_builder
    self.embedder = embedder
    self.lora = lora if lora is not None else self.view.lora()
    self.base_fingerprint = (base_fingerprint if base_fingerprint is not None
                             else fingerprint(base_cfg, params))
    if router is not None:
      check(router.cfg.mode != "oracle", "route.mode=oracle is for evaluation only; serving needs "
            "centroid, knn or topk", ConfigError)
      check(router.cfg.mode != "topk" or router.cfg.topk <= cache_slots,
            f"route.topk={router.cfg.topk} experts per prompt need at least that many cache slots "
            f"(generate.cache_experts={cache_slots})", ConfigError)
    self.set_fallback(policy if policy is not None else Policy(), lora_all_store)
    self.request_log, self.log_source = request_log, log_source
    self.cache = ExpertCache(base_cfg, self.lora, self._load_expert, cache_slots)
    self.length_bucket = int(length_bucket)

  def set_fallback(self, policy: Policy, lora_all_store: ExpertStore | None = None) -> None:
    """Sets the fallback rule (and the all-data LoRA's store, needed by a "lora_all" fallback)."""
    check(policy.fallback != "lora_all" or lora_all_store is not None,
          "route.fallback='lora_all' needs the all-data LoRA's store (workdir/lora_all)", ConfigError)
    self.policy, self.lora_all_store = policy, lora_all_store

  def _load_expert(self, topic: int):
    """One expert from the store (the all-data LoRA for `LORA_ALL_KEY`), refused unless it matches
    this base and the serving LoRA config."""
    if topic == LORA_ALL_KEY:
      return self.lora_all_store.load(0, self.base_fingerprint, self.lora)[0]
    return self.view.load(topic, self.base_fingerprint, self.lora)[0]

  def sync_generation(self) -> bool:
    """Switches to the store's current generation when another one was committed (see the module
    docstring); returns whether it switched. Called before every batch."""
    if self.store.pinned is not None:
      return False
    n = self.store.current_generation()
    if n == self.view.generation:
      return False
    old, new = self.view, self.store.at(n)
    router = self.router_builder(new) if self.router_builder is not None else self.router
    stale = [e for e in self.cache.resident if e != LORA_ALL_KEY and
             (e not in new or e not in old or old.sha256(e) != new.sha256(e))]
    self.cache.drop(stale)
    self.view, self.router = new, router
    return True

  # --- routing -------------------------------------------------------------------------------------

  def route(self, token_ids: Sequence[Sequence[int]]):
    """Expert ids `[n, g]` and weights `[n, g]` of tokenized prompts (g = 1 without topk), after the
    fallback rule."""
    _, served, _ = self.route_with_fallback(token_ids)
    return served.expert_ids, served.weights

  def route_with_fallback(self, token_ids: Sequence[Sequence[int]]):
    """`(routed, served, below_n)`: the router's `RouteResult`, the one served (rows below the
    policy's threshold given to its fallback model) and which rows fell back `[n]`."""
    n = len(token_ids)
    if self.router is None:
      r = RouteResult(np.full((n, 1), -1, np.int32), np.ones((n, 1), np.float32))
      return r, r, np.zeros((n,), bool)
    r = self.router.route_queries(self.embedder, self.tokenizer, token_ids=token_ids)
    below_n = self.policy.below(r)
    if not below_n.any():
      return r, r, below_n
    return r, apply_fallback(r, below_n, fallback_expert(self.policy.fallback)), below_n

  # --- generation ----------------------------------------------------------------------------------

  def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, stop: Sequence[int | str] | None = None,
               seed: int = 0) -> list[Result]:
    """Generates a continuation of each prompt with its routed expert(s).

    `stop`: token ids and/or strings that end a continuation (default: the tokenizer's EOS ids);
    strings are cut from the text after decoding. Returns one `Result` per prompt, in order.
    """
    check(len(prompts) > 0, "generate: no prompts given")
    self.sync_generation()
    start_s = time.time()
    token_ids = [list(self.tokenizer.encode(p)) for p in prompts]
    routed_ids = [ids if ids else [0] for ids in token_ids]
    t0 = time.perf_counter()
    routed, served, below_n = self.route_with_fallback(routed_ids)
    route_ms = 1e3 * (time.perf_counter() - t0)
    results = self._generate_tokens(token_ids, served.expert_ids, served.weights,
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, stop=stop, seed=seed)
    for i, r in enumerate(results):
      r.confidence = {"distance": float(routed.distance[i]), "margin": float(routed.margin[i]),
                      "vote_share": float(routed.vote_share[i])}
      r.latency_ms = {"route": route_ms, **r.latency_ms}
      if below_n[i]:
        r.fallback, r.expert, r.experts = self.policy.fallback, -1, ()
    if self.request_log is not None:
      route_tokens = self.router.cfg.route_tokens if self.router is not None else 0
      self.request_log.append(request_records(
          time_s=start_s, source=self.log_source,
          mode=self.router.cfg.mode if self.router is not None else "none",
          prefixes=prefix_token_ids(self.tokenizer, route_tokens, token_ids=routed_ids), routed=routed,
          served=served, below_n=below_n, policy=self.policy, results=results,
          token_counts=[len(t) for t in token_ids], route_ms=route_ms))
    return results

  def generate_tokens(self, token_ids: Sequence[Sequence[int]], expert_ids, weights=None, *,
                      max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                      top_k: int = 0, stop: Sequence[int | str] | None = None,
                      seed: int = 0) -> list[Result]:
    """Generates from tokenized prompts with given experts: `expert_ids [n]` or `[n, g]` (-1 = base),
    `weights [n, g]` (default uniform), from the store's current generation."""
    self.sync_generation()
    return self._generate_tokens(token_ids, expert_ids, weights, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed)

  def _generate_tokens(self, token_ids, expert_ids, weights=None, *, max_new_tokens=64, temperature=0.0,
                       top_p=1.0, top_k=0, stop=None, seed=0) -> list[Result]:
    """`generate_tokens` within the generation already served (no switch)."""
    check(max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}", ConfigError)
    check(temperature >= 0.0, f"temperature must be >= 0, got {temperature}", ConfigError)
    check(0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}", ConfigError)
    check(top_k >= 0, f"top_k must be >= 0, got {top_k}", ConfigError)
    expert_ids = np.asarray(expert_ids, np.int64)
    if expert_ids.ndim == 1:
      expert_ids = expert_ids[:, None]
    n, g = expert_ids.shape
    check(n == len(token_ids), f"{len(token_ids)} prompts but {n} routes")
    weights = (np.full((n, g), 1.0 / g, np.float32) if weights is None
               else np.asarray(weights, np.float32).reshape(n, g))
    stop = tuple(self.tokenizer.eos_ids) if stop is None else tuple(stop)
    stop_ids = np.array(sorted({int(s) for s in stop if not isinstance(s, str)}), np.int32)
    stop_strs = [s for s in stop if isinstance(s, str) and s]

    results = [Result(expert=int(expert_ids[i, np.argmax(weights[i])]),
                      experts=tuple((int(e), float(w)) for e, w in zip(expert_ids[i], weights[i])))
               for i in range(n)]
    todo = []
    for i, ids in enumerate(token_ids):
      if not ids:
        results[i].error = "empty prompt (no tokens)"
      elif len(ids) + max_new_tokens > self.cfg.max_seq_len:
        results[i].error = (f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds "
                            f"the model's max_seq_len={self.cfg.max_seq_len}")
      else:
        todo.append(i)

    key = jax.random.key(seed)
    for chunk_no, chunk in enumerate(self._chunks(todo, expert_ids)):
      t0 = time.perf_counter()
      slot_n, errors = self.cache.slots_for(expert_ids[chunk].reshape(-1))
      load_ms = 1e3 * (time.perf_counter() - t0)
      slot_pg = slot_n.reshape(len(chunk), g)
      ok = []
      for j, i in enumerate(chunk):
        bad = [errors[int(e)] for e in expert_ids[i] if int(e) in errors]
        if bad:
          results[i].error = bad[0]
        else:
          ok.append(j)
      if not ok:
        continue
      rows = [chunk[j] for j in ok]
      out_pn, n_p, prefill_ms, decode_ms = self._decode(
          [token_ids[i] for i in rows], slot_pg[ok], weights[rows], stop_ids,
          jax.random.fold_in(key, chunk_no), max_new_tokens, temperature, top_p, top_k)
      for j, i in enumerate(rows):
        results[i].latency_ms = {"load": load_ms, "prefill": prefill_ms, "decode": decode_ms}
        toks = [int(t) for t in out_pn[j, :n_p[j]]]
        if toks and toks[-1] in set(stop_ids.tolist()):
          toks = toks[:-1]
        text = self.tokenizer.decode(toks)
        for s in stop_strs:
          cut = text.find(s)
          if cut >= 0:
            text = text[:cut]
        results[i].tokens, results[i].text = toks, text
    return results

  def _chunks(self, todo: list[int], expert_ids: np.ndarray) -> list[list[int]]:
    """Splits prompts into batches that need at most `cache.capacity` distinct experts each."""
    chunks, cur, seen = [], [], set()
    for i in todo:
      new = {int(e) for e in expert_ids[i] if e >= 0} - seen
      if cur and len(seen) + len(new) > self.cache.capacity:
        chunks.append(cur)
        cur, seen = [], set()
        new = {int(e) for e in expert_ids[i] if e >= 0}
      cur.append(i)
      seen |= new
    if cur:
      chunks.append(cur)
    return chunks

  def _decode(self, token_ids, slot_pg, weights_pg, stop_ids, key, max_new_tokens, temperature,
              top_p, top_k):
    """Pads one batch to bucketed shapes and runs `generate_rows` as its two calls (`prefill_rows`, then
    `decode_rows`), timed apart: `(tokens_pn, n_p, prefill_ms, decode_ms)`. The one extra sync, after the
    prefill, costs one dispatch gap per batch."""
    p, g = slot_pg.shape
    p_pad = _bucket_pow2(p)
    t_max = max(len(ids) for ids in token_ids)
    t_pad = -(-t_max // self.length_bucket) * self.length_bucket
    t_pad = min(t_pad, self.cfg.max_seq_len - max_new_tokens)
    tokens = np.zeros((p_pad, t_pad), np.int32)
    lengths = np.ones((p_pad,), np.int32)
    for j, ids in enumerate(token_ids):
      tokens[j, :len(ids)] = ids
      lengths[j] = len(ids)
    slots = np.full((p_pad, g), -1, np.int32)
    slots[:p] = slot_pg
    w = np.full((p_pad, g), 1.0 / g, np.float32)
    w[:p] = weights_pg
    experts_b = gather_experts(self.cache.slots_c, jnp.asarray(slots.reshape(-1)))
    w, stop = jnp.asarray(w), jnp.asarray(stop_ids)
    kw = dict(cfg=self.cfg, lora_scale=self.lora.scale, max_new_tokens=int(max_new_tokens),
              temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
    t0 = time.perf_counter()
    carry = prefill_rows(self.params, experts_b, w, jnp.asarray(np.repeat(tokens, g, axis=0)),
                         jnp.asarray(np.repeat(lengths, g)), stop, key, **kw)
    jax.block_until_ready(carry)
    t1 = time.perf_counter()
    out_pn, n_p = decode_rows(self.params, experts_b, w, stop, carry, unstack=jax.default_backend() == "cpu",
                              **kw)
    out_pn, n_p = jax.device_get((out_pn, n_p))
    t2 = time.perf_counter()
    return np.asarray(out_pn)[:p], np.asarray(n_p)[:p], 1e3 * (t1 - t0), 1e3 * (t2 - t1)

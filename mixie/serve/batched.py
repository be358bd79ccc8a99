"""Mixed-expert batches: every row of a batch runs the base with its own LoRA expert.

This is the serving core (jax + mixie.model only). The model is written for one expert; a batch whose
rows use different experts vmaps that same `forward` over the rows, the base broadcast
(`in_axes=(None, 0, 0)`): the base matmuls stay one large matmul over all rows and only the low-rank
parts differ per row (the BGMV idea of Punica / S-LoRA, with no custom kernel).

- `gather_experts`: the rows' experts `[b, ...]` from a stack of cached experts `[c, ...]`; a row with
  slot -1 gets the zero expert (exactly the base).
- `rows_forward`, `rows_prefill`, `rows_decode_step`: `forward` and `mixie.model.generate`'s prefill and
  decode step vmapped over rows (KV cache in `init_cache`'s layout, each row a batch of one).
- `mix_logprobs`: next-token log-distributions of groups of g rows mixed with weights (topk routing).
- `mixture_token_logprobs`: log p(target) under such a mixture, for scoring.
- `generate_rows`: jitted prefill + decode loop (greedy or sampled, stop tokens, right-padded prompts of
  mixed lengths), all on device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixie.model.generate import decode_step, prefill, sample_logits
from mixie.model.llama import LlamaConfig, forward, init_cache, unstack_layers


@jax.jit
def gather_experts(slots_c, slot_b: jax.Array):
  """The experts of b rows from cached experts `[c, ...]`; `slot_b == -1` gives the zero expert.

  Only the `b` factors are zeroed for such rows, so their low-rank update is exactly zero.
  """
  use_b = slot_b >= 0
  safe_b = jnp.where(use_b, slot_b, 0)

  def take(path, s):
    x = jnp.take(s, safe_b, axis=0)
    if getattr(path[-1], "key", None) == "b":
      x = x * use_b.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(take, slots_c)


def _rows_cache(cache, b):
  """`init_cache` layout -> rows of batch-of-one caches: k/v `[l, b, 1, s, k, h]`, length `[b, 1]`.

  Pure reshapes (no copy). The row axis of k/v stays at 1, where `lax.scan` over layers (inside
  `forward`) wants a vmapped input: no transpose of the cache per step.
  """
  l, _, s, k, h = cache["k"].shape
  return {"k": cache["k"].reshape(l, b, 1, s, k, h), "v": cache["v"].reshape(l, b, 1, s, k, h),
          "length": cache["length"].reshape(b, 1)}


def _cache_back(c, b):
  l, _, _, s, k, h = c["k"].shape
  return {"k": c["k"].reshape(l, b, s, k, h), "v": c["v"].reshape(l, b, s, k, h),
          "length": c["length"].reshape(b)}


_ROW_CACHE_AXES = {"k": 1, "v": 1, "length": 0}


def layer_major(experts_b):
  """Experts `[b, l, ...]` -> `[l, b, ...]`: the layout the vmapped layer scan reads without a transpose.

  Do it once per batch (not per decode step) and pass `expert_axis=1` to `rows_prefill` /
  `rows_decode_step`.
  """
  return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), experts_b)


def rows_forward(params, experts_b, tokens_bt: jax.Array, cfg: LlamaConfig, *, lora_scale: float):
  """Logits `[b, t, v]` with one expert per row: `jax.vmap(forward, in_axes=(None, 0, 0))`.

  `experts_b`: one expert per row, leading axis b (`None`: the base for every row). No cache (scoring).
  """
  one = lambda e, tokens_t: forward(params, e, tokens_t[None], cfg, lora_scale=lora_scale)[0][0]
  return jax.vmap(one)(experts_b, tokens_bt)


def rows_prefill(params, experts_b, prompt_bt, lengths_b, cache, cfg: LlamaConfig, *,
                 lora_scale: float, expert_axis: int = 0):
  """`mixie.model.generate.prefill` with one expert per row (vmapped over rows, base broadcast).

  `cache` is an `init_cache(cfg, b, s)` cache (k/v `[l, b, s, k, h]`, length `[b]`); each row runs as a
  batch of one. `expert_axis`: the row axis of the experts' leaves (1 after `layer_major`).
  Returns the logits after each row's last prompt token `[b, v]` and the cache.
  """
  b, t = prompt_bt.shape

  def one(e, prompt_1t, n_1, c):
    return prefill(params, e, prompt_1t, n_1, c, cfg, lora_scale=lora_scale)

  logits_b1v, c = jax.vmap(one, in_axes=(expert_axis, 0, 0, _ROW_CACHE_AXES),
                           out_axes=(0, _ROW_CACHE_AXES))(
      experts_b, prompt_bt.reshape(b, 1, t), lengths_b.reshape(b, 1), _rows_cache(cache, b))
  return logits_b1v.reshape(b, -1), _cache_back(c, b)


def rows_decode_step(params, experts_b, tokens_b, cache, cfg: LlamaConfig, *, lora_scale: float,
                     expert_axis: int = 0):
  """`mixie.model.generate.decode_step` with one expert per row; returns logits `[b, v]` and the cache."""
  b = tokens_b.shape[0]

  def one(e, tok_1, c):
    return decode_step(params, e, tok_1, c, cfg, lora_scale=lora_scale)

  logits_b1v, c = jax.vmap(one, in_axes=(expert_axis, 0, _ROW_CACHE_AXES),
                           out_axes=(0, _ROW_CACHE_AXES))(
      experts_b, tokens_b.reshape(b, 1), _rows_cache(cache, b))
  return logits_b1v.reshape(b, -1), _cache_back(c, b)


def mix_logprobs(logits_bv: jax.Array, weights_pg: jax.Array) -> jax.Array:
  """Mixes the next-token distributions of consecutive groups of g rows: `log sum_g w_g p_g`, `[p, v]`.

  With g = 1 the rows' logits are returned unchanged (same argmax and same sampling distribution).
  """
  p, g = weights_pg.shape
  if g == 1:
    return logits_bv.astype(jnp.float32)
  logp_pgv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1).reshape(p, g, -1)
  logw_pg = jnp.log(jnp.maximum(weights_pg.astype(jnp.float32), 1e-30))
  return jax.nn.logsumexp(logp_pgv + logw_pg[:, :, None], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "lora_scale"))
def mixture_token_logprobs(params, experts_pg, weights_pg, tokens_pt, cfg: LlamaConfig,
                           lora_scale: float):
  """log p(tokens[:, 1:]) `[p, t-1]` under the mixture of each sequence's g experts.

  Args:
    experts_pg: expert trees with leading axes `[p, g, ...]`; weights_pg: mixture weights (rows sum
      to 1). g = 1 is plain per-row scoring with one expert each.
  """
  p, g = weights_pg.shape
  flat = jax.tree.map(lambda x: x.reshape((p * g,) + x.shape[2:]), experts_pg)
  tokens_bt = jnp.repeat(tokens_pt, g, axis=0)
  logits_btv = rows_forward(params, flat, tokens_bt[:, :-1], cfg, lora_scale=lora_scale)
  logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
  lp_bt = jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
  logw_pg = jnp.log(jnp.maximum(weights_pg.astype(jnp.float32), 1e-30))
  return jax.nn.logsumexp(lp_bt.reshape(p, g, -1) + logw_pg[:, :, None], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "lora_scale", "max_new_tokens", "temperature",
                                             "top_p", "top_k", "unstack"))
def generate_rows(params, experts_b, weights_pg, tokens_bt, lengths_b, stop_ids_s, key, *,
                  cfg: LlamaConfig, lora_scale: float, max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, unstack: bool = False):
  """Prefill + decode of b = p*g rows with their own experts, all on device.

  Rows are right-padded prompts (`lengths_b` real tokens each); each consecutive group of g rows is
  one prompt whose g experts' next-token distributions are mixed with `weights_pg` (g = 1: one expert
  per prompt). Decoding stops at `max_new_tokens` or when every prompt has produced a stop token.
  `unstack`: decode over unstacked layers (`mixie.model.llama.unstack_layers`; faster on CPU), as
  `mixie.model.generate.generate` does.

  Returns:
    `(tokens_pn, n_p)`: generated ids `[p, max_new_tokens]` (the stop token included; -1 after it) and
    the number generated per prompt (up to and including the first stop token).
  """
  b, t = tokens_bt.shape
  p, g = weights_pg.shape
  cache = init_cache(cfg, b, t + max_new_tokens)
  experts_lb = layer_major(experts_b)  # once, outside the decode loop
  logits_bv, cache = rows_prefill(params, experts_lb, tokens_bt, lengths_b.astype(jnp.int32), cache,
                                  cfg, lora_scale=lora_scale, expert_axis=1)
  step_params = unstack_layers(params) if unstack else params  # copied once, before the loop

  def pick(logits_bv, key):
    mixed_pv = mix_logprobs(logits_bv, weights_pg)
    tok_p = sample_logits(mixed_pv, key, temperature=temperature, top_p=top_p, top_k=top_k)
    return tok_p.astype(jnp.int32)

  key, sub = jax.random.split(key)
  tok_p = pick(logits_bv, sub)
  out_pn = jnp.full((p, max_new_tokens), -1, jnp.int32).at[:, 0].set(tok_p)
  done_p = jnp.isin(tok_p, stop_ids_s)

  def cond(state):
    i, _, _, _, done_p, _ = state
    return (i < max_new_tokens) & ~jnp.all(done_p)

  def body(state):
    i, cache, tok_p, out_pn, done_p, key = state
    logits_bv, cache = rows_decode_step(step_params, experts_lb, jnp.repeat(tok_p, g), cache, cfg,
                                        lora_scale=lora_scale, expert_axis=1)
    key, sub = jax.random.split(key)
    new_p = pick(logits_bv, sub)
    new_p = jnp.where(done_p, -1, new_p)
    out_pn = jax.lax.dynamic_update_slice(out_pn, new_p[:, None], (0, i))
    done_p = done_p | jnp.isin(new_p, stop_ids_s)
    return i + 1, cache, jnp.maximum(new_p, 0), out_pn, done_p, key

  state = (jnp.int32(1), cache, tok_p, out_pn, done_p, key)
  _, _, _, out_pn, _, _ = jax.lax.while_loop(cond, body, state)
  is_stop = jnp.isin(out_pn, stop_ids_s)
  first_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, max_new_tokens)
  n_p = jnp.minimum(first_stop, jnp.sum(out_pn >= 0, axis=1))
  return out_pn, n_p

"""Mixed-expert batches: every row of a batch runs the base with its own LoRA expert.

This is the serving core (jax + mixie.model only). The model is written for one expert; a batch whose
rows use different experts is the same `Llama` with the rows' experts as its `LoRAParam`s, `nnx.vmap`ped
over the rows with the base broadcast (`mixie.model.llama.vmap_adapters`): the base matmuls stay one
large matmul over all rows and only the low-rank parts differ per row (the BGMV idea of Punica /
S-LoRA, with no custom kernel). Decoding is `mixie.model.generate`'s one decode path.

- `gather_experts`: the rows' experts `[b, ...]` from a stack of cached experts `[c, ...]`; a row with
  slot -1 gets the zero expert (exactly the base).
- `rows_forward`, `rows_prefill`, `rows_decode_step`: the model, its prefill and its decode step with
  one expert per row (KV cache in `init_cache`'s layout).
- `mixture_token_logprobs`: log p(target) under the mixture of each prompt's g experts (scoring).
- `generate_rows`: jitted prefill + decode loop (greedy or sampled, stop tokens, right-padded prompts of
  mixed lengths, g experts mixed per prompt), all on device; `prefill_rows` + `decode_rows`: the same
  as two jitted calls (the server times prefill and decode apart).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixie.model.generate import (  # noqa: F401 (mix_logprobs re-exported)
    Decoder, cached_decode, decode_first, decode_loop, decode_rest, mix_logprobs)
from mixie.model.llama import LlamaConfig, bind, token_logprobs, vmap_adapters


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


def layer_major(experts_b):
  """Experts `[b, l, ...]` -> `[l, b, ...]`: the layout the vmapped layer scan reads without a transpose.

  Do it once per batch (not per decode step) and pass `expert_axis=1` to `rows_prefill` /
  `rows_decode_step`.
  """
  return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), experts_b)


def _row_logits(model, tokens_t):
  h_1td, _ = model(tokens_t[None])
  return model.logits(h_1td)[0]


def rows_forward(params, experts_b, tokens_bt: jax.Array, cfg: LlamaConfig, *, lora_scale: float):
  """Logits `[b, t, v]` with one expert per row (leading axis b). No cache (scoring)."""
  model = bind(cfg, params, experts_b, lora_scale=lora_scale)
  return vmap_adapters(_row_logits, axis=0, in_axes=(0,))(model, tokens_bt)


def rows_prefill(params, experts_b, prompt_bt, lengths_b, cache, cfg: LlamaConfig, *,
                 lora_scale: float, expert_axis: int = 0):
  """`Decoder.prefill` with one expert per row; `expert_axis`: the row axis of the experts' leaves (1
  after `layer_major`). Returns the logits after each row's last prompt token `[b, v]` and the cache."""
  model = bind(cfg, params, experts_b, lora_scale=lora_scale)
  return Decoder.of(model, expert_axis).prefill(prompt_bt, lengths_b, cache)


def rows_decode_step(params, experts_b, tokens_b, cache, cfg: LlamaConfig, *, lora_scale: float,
                     expert_axis: int = 0):
  """`Decoder.step` with one expert per row; returns logits `[b, v]` and the cache."""
  model = bind(cfg, params, experts_b, lora_scale=lora_scale)
  return Decoder.of(model, expert_axis).step(tokens_b, cache)


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
  return mix_logprobs(token_logprobs(logits_btv, tokens_bt[:, 1:]), weights_pg)


@functools.partial(jax.jit, static_argnames=("cfg", "lora_scale", "max_new_tokens", "temperature",
                                             "top_p", "top_k", "unstack"))
def generate_rows(params, experts_b, weights_pg, tokens_bt, lengths_b, stop_ids_s, key, *,
                  cfg: LlamaConfig, lora_scale: float, max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, unstack: bool = False):
  """Prefill + decode of b = p*g rows with their own experts, all on device.

  Rows are right-padded prompts (`lengths_b` real tokens each); each consecutive group of g rows is
  one prompt whose g experts' next-token distributions are mixed with `weights_pg` (g = 1: one expert
  per prompt). Decoding stops at `max_new_tokens` or when every prompt has produced a stop token.
  `unstack`: decode over unstacked layers (`Llama.unstacked`; faster on CPU).

  Returns:
    `(tokens_pn, n_p)`: generated ids `[p, max_new_tokens]` (the stop token included; -1 after it) and
    the number generated per prompt (up to and including the first stop token).
  """
  fns = cached_decode(_prefill_decoder(params, experts_b, cfg, lora_scale), tokens_bt.shape[1] + max_new_tokens,
                      _step_decoder(params, experts_b, cfg, lora_scale, unstack))
  return decode_loop(*fns, tokens_bt, lengths_b, weights_pg, stop_ids_s, key, max_new=max_new_tokens,
                     pad_id=-1, temperature=temperature, top_k=top_k, top_p=top_p)


# prefill: one scan over the layers, which reads layer-major experts without a transpose per layer;
# unstacked decoding slices each layer's experts out of the rows' own `[b, l, ...]` stacks instead
# (a per-layer slice of a layer-major copy made XLA transpose all layers once for every layer)
def _prefill_decoder(params, experts_b, cfg, lora_scale):
  return Decoder.of(bind(cfg, params, layer_major(experts_b), lora_scale=lora_scale), row_axis=1)


def _step_decoder(params, experts_b, cfg, lora_scale, unstack):
  if not unstack:
    return _prefill_decoder(params, experts_b, cfg, lora_scale)
  return Decoder.of(bind(cfg, params, experts_b, lora_scale=lora_scale), row_axis=0).unstacked()


@functools.partial(jax.jit, static_argnames=("cfg", "lora_scale", "max_new_tokens", "temperature",
                                             "top_p", "top_k"))
def prefill_rows(params, experts_b, weights_pg, tokens_bt, lengths_b, stop_ids_s, key, *,
                 cfg: LlamaConfig, lora_scale: float, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0):
  """`generate_rows`' prefill as its own jitted call (the server times prefill and decode apart): the
  KV cache and the first new token, as the decode loop's carry for `decode_rows`."""
  prefill_fn, _ = cached_decode(_prefill_decoder(params, experts_b, cfg, lora_scale),
                                tokens_bt.shape[1] + max_new_tokens)
  return decode_first(prefill_fn, tokens_bt, lengths_b, weights_pg, stop_ids_s, key, max_new=max_new_tokens,
                      pad_id=-1, temperature=temperature, top_k=top_k, top_p=top_p)


@functools.partial(jax.jit, static_argnames=("cfg", "lora_scale", "max_new_tokens", "temperature",
                                             "top_p", "top_k", "unstack"))
def decode_rows(params, experts_b, weights_pg, stop_ids_s, carry, *, cfg: LlamaConfig, lora_scale: float,
                max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                unstack: bool = False):
  """`generate_rows`' decode loop from `prefill_rows`' carry: `(tokens_pn, n_p)`, the same as
  `generate_rows` returns for the same arguments. (The carry is not donated: no output has the KV
  cache's shape, so XLA could not reuse its buffers.)"""
  step = _step_decoder(params, experts_b, cfg, lora_scale, unstack)
  _, step_fn = cached_decode(step, 0, step)  # the cache length is the prefill's
  return decode_rest(step_fn, carry, weights_pg, stop_ids_s, max_new=max_new_tokens, pad_id=-1,
                     temperature=temperature, top_k=top_k, top_p=top_p)

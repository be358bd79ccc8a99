"""The one decode path: prefill, a decode step, sampling, mixing, and the on-device decode loop.

Every generation in mixie (`generate` here: one expert or the base for all rows; serving's
`mixie.serve.batched.generate_rows`: each row its own expert) runs the same pieces:

- `Decoder`: how a batch runs through the model. `Decoder.of(model)` runs the batch as one (the model's
  adapter, if any, shared by every row); `Decoder.of(model, row_axis=a)` runs each row with its own
  expert: the model's `LoRAParam`s carry a row axis at `a` and the rows are `nnx.vmap`ped with the
  base broadcast (`mixie.model.llama.vmap_adapters`; the KV cache viewed as rows of batches of one).
- `prefill` / `decode_step` (the jitted `prefill_jit` / `decode_step_jit` donate the cache): right-
  padded prompts into a KV cache, then one token per row at each row's own length.
- `sample_logits`: greedy or temperature / top-k / top-p sampling; `mix_logprobs`: the one helper that
  mixes the next-token distributions of g rows per prompt (topk routing), g = 1 unchanged.
- `decode_loop`: prefill, then a `lax.while_loop` until `max_new` tokens or every prompt has stopped;
  its two halves `decode_first` / `decode_rest` for callers that time prefill and decode apart.

Padding convention: prompts are right-padded with `lengths_b` real tokens (>= 1); output rows hold the
new tokens, `pad_id` after a row's stop token, and the count produced (stop token included).

On CPU the decode loop runs over unstacked layers (`mixie.model.llama.Llama.unstacked`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixie.errors import MixieError
from mixie.model.llama import Llama, LlamaConfig, Params, bind, init_cache, vmap_adapters

_ROW_CACHE_AXES = {"k": 1, "v": 1, "length": 0}


def _last_hidden(h_btd, index_b):
  return jnp.take_along_axis(h_btd, index_b[:, None, None], axis=1)[:, 0]


def _prefill_one(model: Llama, prompt_bt, lengths_b, cache):
  h_btd, cache_out = model(prompt_bt, cache=cache)
  logits_bv = model.logits(_last_hidden(h_btd, lengths_b - 1))
  return logits_bv, dict(cache_out, length=lengths_b.astype(jnp.int32))


def _step_one(model: Llama, tokens_b, cache):
  h_btd, cache = model(tokens_b[:, None], cache=cache)
  return model.logits(h_btd[:, 0]), cache


def _rows_cache(cache, b):
  """`init_cache` layout -> rows of batch-of-one caches: k/v `[l, b, 1, s, k, h]`, length `[b, 1]`.

  Pure reshapes (no copy). The row axis of k/v stays at 1, where the layer scan wants a vmapped input:
  no transpose of the cache per step.
  """
  l, _, s, k, h = cache["k"].shape
  return {"k": cache["k"].reshape(l, b, 1, s, k, h), "v": cache["v"].reshape(l, b, 1, s, k, h),
          "length": cache["length"].reshape(b, 1)}


def _cache_back(c, b):
  l, _, _, s, k, h = c["k"].shape
  return {"k": c["k"].reshape(l, b, s, k, h), "v": c["v"].reshape(l, b, s, k, h),
          "length": c["length"].reshape(b)}


@dataclasses.dataclass(frozen=True)
class Decoder:
  """Runs batches through a model: as one batch (`row_axis` None), or each row with its own expert
  (`row_axis`: where the rows sit in the model's `LoRAParam`s; 1 for layer-major stacked layers).

  Holds the model as pure state (its `GraphDef` and arrays) and binds it afresh in each call, so the
  same decoder serves inside a `lax.while_loop` body (a traced loop cannot reach modules built outside).
  """

  graphdef: nnx.GraphDef
  state: dict
  row_axis: int | None = None

  @classmethod
  def of(cls, model: Llama, row_axis: int | None = None) -> "Decoder":
    """The decoder of `model` (split once)."""
    graphdef, state = nnx.split(model)
    return cls(graphdef, nnx.to_pure_dict(state), row_axis)

  @property
  def model(self) -> Llama:
    """The model, bound at the current trace level."""
    return nnx.merge(self.graphdef, self.state)

  def prefill(self, prompt_bt, lengths_b, cache):
    """Feeds right-padded prompts into an empty `cache`: the logits `[b, v]` after each row's last
    real token, and the cache with `length` set to the true lengths (the padded tail is overwritten
    by the tokens decoded next)."""
    if self.row_axis is None:
      return _prefill_one(self.model, prompt_bt, lengths_b, cache)
    b, t = prompt_bt.shape
    run = vmap_adapters(_prefill_one, axis=self.row_axis, in_axes=(0, 0, _ROW_CACHE_AXES),
                        out_axes=(0, _ROW_CACHE_AXES))
    logits_b1v, c = run(self.model, prompt_bt.reshape(b, 1, t), lengths_b.reshape(b, 1),
                        _rows_cache(cache, b))
    return logits_b1v.reshape(b, -1), _cache_back(c, b)

  def step(self, tokens_b, cache):
    """Appends `tokens_b` at each row's cache length: the next logits `[b, v]` and the cache."""
    if self.row_axis is None:
      return _step_one(self.model, tokens_b, cache)
    b = tokens_b.shape[0]
    run = vmap_adapters(_step_one, axis=self.row_axis, in_axes=(0, _ROW_CACHE_AXES),
                        out_axes=(0, _ROW_CACHE_AXES))
    logits_b1v, c = run(self.model, tokens_b.reshape(b, 1), _rows_cache(cache, b))
    return logits_b1v.reshape(b, -1), _cache_back(c, b)

  def unstacked(self) -> "Decoder":
    """The same decoder over `Llama.unstacked()` (the layers sliced once, here). Rows at axis 0 of the
    experts (`[b, l, ...]`) are sliced per layer directly; layer-major ones (`row_axis` 1) at axis 0."""
    model = self.model.unstacked(adapter_layer_axis=1 if self.row_axis == 0 else 0)
    return Decoder.of(model, None if self.row_axis is None else 0)


def prefill(params: Params, expert, prompt_bt, lengths_b, cache: dict, cfg: LlamaConfig, *,
            lora_scale: float = 1.0):
  """`Decoder.prefill` of the base plus one expert (None: the base) over pure state."""
  return Decoder.of(bind(cfg, params, expert, lora_scale=lora_scale)).prefill(prompt_bt, lengths_b, cache)


def decode_step(params: Params, expert, tokens_b, cache: dict, cfg: LlamaConfig, *,
                lora_scale: float = 1.0):
  """`Decoder.step` of the base plus one expert (None: the base) over pure state."""
  return Decoder.of(bind(cfg, params, expert, lora_scale=lora_scale)).step(tokens_b, cache)


prefill_jit = jax.jit(prefill, static_argnames=("cfg", "lora_scale"), donate_argnames=("cache",))
decode_step_jit = jax.jit(decode_step, static_argnames=("cfg", "lora_scale"), donate_argnames=("cache",))


def sample_logits(logits_bv: jax.Array, key: jax.Array | None, *, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Next tokens `[b]`: argmax when `temperature` is 0, else a draw from the tempered distribution
  restricted to the `top_k` most likely tokens (0 = all) and to the smallest set whose probability
  reaches `top_p` (1 = all)."""
  if temperature <= 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  x_bv = logits_bv.astype(jnp.float32) / temperature
  if top_k > 0 or top_p < 1.0:
    k = top_k if top_k > 0 else x_bv.shape[-1]
    vals_bk = jax.lax.top_k(x_bv, k)[0]  # sorted, largest first
    cut_b = vals_bk[:, -1]
    if top_p < 1.0:
      p_bk = jax.nn.softmax(vals_bk, axis=-1)
      before_bk = jnp.cumsum(p_bk, axis=-1) - p_bk  # mass of strictly better tokens
      keep_bk = before_bk < top_p  # always keeps the first
      cut_b = jnp.min(jnp.where(keep_bk, vals_bk, jnp.inf), axis=-1)
    x_bv = jnp.where(x_bv < cut_b[:, None], -jnp.inf, x_bv)
  return jax.random.categorical(key, x_bv, axis=-1).astype(jnp.int32)


def mix_logprobs(logp_b: jax.Array, weights_pg: jax.Array) -> jax.Array:
  """`log sum_g w_g p_g` of consecutive groups of g rows: `[p*g, ...]` log-probabilities -> `[p, ...]`.

  The one mixing rule of topk routing (next-token distributions in decoding, target log-likelihoods
  in scoring). With g = 1 the rows are returned unchanged (logits keep their argmax and sampling
  distribution).
  """
  p, g = weights_pg.shape
  if g == 1:
    return logp_b.astype(jnp.float32)
  lp = logp_b.astype(jnp.float32).reshape((p, g) + logp_b.shape[1:])
  logw_pg = jnp.log(jnp.maximum(weights_pg.astype(jnp.float32), 1e-30))
  return jax.nn.logsumexp(lp + logw_pg.reshape((p, g) + (1,) * (lp.ndim - 2)), axis=1)


def _mixed_next(logits_bv, weights_pg):
  g = weights_pg.shape[1]
  return mix_logprobs(logits_bv if g == 1 else jax.nn.log_softmax(logits_bv.astype(jnp.float32), -1),
                      weights_pg)


def _draw(logits_bv, key, weights_pg, temperature, top_k, top_p):
  """The next token of each prompt from its g rows' logits (the key is split even when greedy)."""
  key, sub = jax.random.split(key)
  tok = sample_logits(_mixed_next(logits_bv, weights_pg), sub, temperature=temperature, top_k=top_k,
                      top_p=top_p)
  return tok.astype(jnp.int32), key


def decode_first(prefill_fn, prompt_bt, lengths_b, weights_pg, stop_s, key, *, max_new: int, pad_id: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """The prefill half of `decode_loop`: the prompts through `prefill_fn` and the first new token.
  Returns the loop's carry, which `decode_rest` continues (a separate jitted call can time the two)."""
  p, _ = weights_pg.shape
  logits_bv, state = prefill_fn(prompt_bt, lengths_b.astype(jnp.int32))
  tok_p, key = _draw(logits_bv, key, weights_pg, temperature, top_k, top_p)
  out_pn = jnp.full((p, max_new), pad_id, jnp.int32).at[:, 0].set(tok_p)
  return jnp.int32(1), tok_p, state, out_pn, jnp.isin(tok_p, stop_s), jnp.ones((p,), jnp.int32), key


def decode_rest(step_fn, carry, weights_pg, stop_s, *, max_new: int, pad_id: int, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0):
  """The decode half of `decode_loop`: a `lax.while_loop` from `decode_first`'s carry until `max_new`
  tokens or every prompt has stopped. Returns `(tokens_pn, n_p)`."""
  g = weights_pg.shape[1]

  def cond(carry):
    i, _, _, _, done_p, _, _ = carry
    return (i < max_new) & ~jnp.all(done_p)

  def body(carry):
    i, tok_p, state, out_pn, done_p, n_p, key = carry
    feed_b = jnp.repeat(jnp.maximum(tok_p, 0), g)  # a finished row feeds 0, never a negative pad
    logits_bv, state = step_fn(state, feed_b, i - 1)
    new_p, key = _draw(logits_bv, key, weights_pg, temperature, top_k, top_p)
    new_p = jnp.where(done_p, pad_id, new_p)
    out_pn = jax.lax.dynamic_update_slice(out_pn, new_p[:, None], (0, i))
    n_p = n_p + (~done_p).astype(jnp.int32)
    done_p = done_p | jnp.isin(new_p, stop_s)
    return i + 1, new_p, state, out_pn, done_p, n_p, key

  _, _, _, out_pn, _, n_p, _ = jax.lax.while_loop(cond, body, carry)
  return out_pn, n_p


def decode_loop(prefill_fn, step_fn, prompt_bt, lengths_b, weights_pg, stop_s, key, *, max_new: int,
                pad_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """Prefill + an on-device decode loop of b = p*g rows, each group of g rows mixed into one prompt
  (`decode_first`, then `decode_rest`).

  `prefill_fn(prompt_bt, lengths_b) -> (logits_bv, state)` and `step_fn(state, tokens_b, step) ->
  (logits_bv, state)` run the model (step = index of the token fed, 0-based). Rows stop at a token
  in `stop_s`; tokens after it are `pad_id`. Returns `(tokens_pn, n_p)`: `[p, max_new]` new tokens
  and how many each prompt produced (stop token included).
  """
  kw = dict(max_new=max_new, pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p)
  carry = decode_first(prefill_fn, prompt_bt, lengths_b, weights_pg, stop_s, key, **kw)
  return decode_rest(step_fn, carry, weights_pg, stop_s, **kw)


def cached_decode(decoder: Decoder, cache_len: int, stepper: Decoder | None = None):
  """`(prefill_fn, step_fn)` of `decode_loop` over a KV cache of `cache_len` positions: `decoder`
  prefills, `stepper` (default `decoder`; e.g. its `unstacked()` form) decodes."""
  stepper = stepper or decoder
  cfg = decoder.model.cfg

  def prefill_fn(prompt_bt, lengths_b):
    return decoder.prefill(prompt_bt, lengths_b, init_cache(cfg, prompt_bt.shape[0], cache_len))

  def step_fn(cache, tokens_b, step):
    del step
    return stepper.step(tokens_b, cache)

  return prefill_fn, step_fn


def _recompute_decode(decoder: Decoder, max_new: int, pad_id: int):
  """`(prefill_fn, step_fn)` without a cache: every step a full forward over a fixed `[b, prompt +
  max_new]` buffer (slow; an independent check of the cached path)."""

  def logits_at(buf_bs, pos_b):
    model = decoder.model
    h_bsd, _ = model(buf_bs)
    return model.logits(_last_hidden(h_bsd, pos_b))

  def prefill_fn(prompt_bt, lengths_b):
    b = prompt_bt.shape[0]
    buf_bs = jnp.concatenate([prompt_bt, jnp.full((b, max_new), pad_id, jnp.int32)], 1)
    return logits_at(buf_bs, lengths_b - 1), (buf_bs, lengths_b)

  def step_fn(state, tokens_b, step):  # the step-th new token sits at lengths + step
    buf_bs, lengths_b = state
    buf_bs = buf_bs.at[jnp.arange(buf_bs.shape[0]), lengths_b + step].set(tokens_b)
    return logits_at(buf_bs, lengths_b + step), (buf_bs, lengths_b)

  return prefill_fn, step_fn


@functools.partial(jax.jit, static_argnames=("cfg", "lora_scale", "max_new", "temperature", "top_k",
                                             "top_p", "stop_tokens", "pad_id", "use_cache", "unstack"))
def _generate(params, expert, prompt_bt, lengths_b, key, *, cfg, lora_scale, max_new, temperature, top_k,
              top_p, stop_tokens, pad_id, use_cache, unstack):
  b, t = prompt_bt.shape
  decoder = Decoder.of(bind(cfg, params, expert, lora_scale=lora_scale))
  if use_cache:
    fns = cached_decode(decoder, t + max_new, decoder.unstacked() if unstack else decoder)
  else:
    fns = _recompute_decode(decoder, max_new, pad_id)
  stop = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
  return decode_loop(*fns, prompt_bt, lengths_b, jnp.ones((b, 1), jnp.float32), stop, key,
                     max_new=max_new, pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p)


def generate(params: Params, expert, prompt_bt, lengths_b, cfg: LlamaConfig, *, max_new: int,
             key: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), pad_id: int = 0, lora_scale: float = 1.0,
             use_cache: bool = True, unstack: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Generates up to `max_new` tokens after right-padded prompts, one jitted program per call shape.

  Args:
    params, expert, cfg, lora_scale: the base, and `None` or one LoRA expert for every row.
    prompt_bt: int prompts, right-padded; `lengths_b`: their true lengths (each >= 1).
    max_new: number of new tokens to produce per row (at most).
    key: PRNG key for sampling (unused when greedy).
    temperature, top_k, top_p: see `sample_logits`; temperature 0 is greedy.
    stop_tokens: a row is finished after emitting one of these (it is kept in the output).
    pad_id: fills each row after it finished.
    use_cache: KV-cache decoding; False recomputes the whole prefix every step.
    unstack: decode over unstacked layers (`Llama.unstacked`): faster small-batch decoding, for one
      more copy of the layer weights during the call. None: on CPU only.

  Returns:
    `(tokens_bn, lengths_b)`: the new tokens `[b, max_new]` (pad after the end) and how many each row
    produced (stop token included).
  """
  prompt_bt = jnp.asarray(prompt_bt, jnp.int32)
  if prompt_bt.ndim != 2:
    raise MixieError(f"generate: prompts must be [batch, time], got shape {prompt_bt.shape}")
  if max_new < 1:
    raise MixieError(f"generate: max_new must be >= 1, got {max_new}")
  if isinstance(lengths_b, np.ndarray | list | tuple):
    lens = np.asarray(lengths_b)
    if lens.shape != prompt_bt.shape[:1] or lens.min() < 1 or lens.max() > prompt_bt.shape[1]:
      raise MixieError(f"generate: prompt lengths must be in [1, {prompt_bt.shape[1]}] per row, "
                       f"got {lens.tolist()}")
  key = jax.random.key(0) if key is None else key
  return _generate(params, expert, prompt_bt, jnp.asarray(lengths_b, jnp.int32), key, cfg=cfg,
                   lora_scale=float(lora_scale), max_new=int(max_new), temperature=float(temperature),
                   top_k=int(top_k), top_p=float(top_p), stop_tokens=tuple(int(s) for s in stop_tokens),
                   pad_id=int(pad_id), use_cache=bool(use_cache),
                   unstack=(jax.default_backend() == "cpu") if unstack is None else bool(unstack))


def generate_text(params: Params, expert, tokenizer, prompts: Sequence[str], cfg: LlamaConfig, *,
                  max_new: int = 32, add_bos: bool | None = None, **kw) -> list[str]:
  """Text in, text out: encodes `prompts`, generates (stopping at the tokenizer's EOS ids), decodes."""
  prompt_bt, lengths_b = tokenizer.encode_padded(prompts, add_bos=add_bos)
  if lengths_b.min() < 1:
    raise MixieError("generate_text: an empty prompt (add_bos=True gives it a BOS token)")
  kw.setdefault("stop_tokens", tokenizer.eos_ids)
  kw.setdefault("pad_id", tokenizer.pad_id)
  out_bn, n_b = generate(params, expert, prompt_bt, lengths_b, cfg, max_new=max_new, **kw)
  out_bn, n_b = np.asarray(out_bn), np.asarray(n_b)
  return [tokenizer.decode(out_bn[i, :n_b[i]]) for i in range(len(prompts))]

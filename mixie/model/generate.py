"""Greedy and sampled generation: one jitted program per call shape (prefill, then an on-device loop).

The pieces are factored so that serving can vmap them over rows with per-row experts:

- `prefill(params, expert, prompt_bt, lengths_b, cache, cfg)`: runs right-padded prompts through the
  model into a KV cache and returns the logits after each row's last prompt token.
- `decode_step(params, expert, tokens_b, cache, cfg)`: appends one token per row and returns the next
  logits.
- `sample_logits(logits_bv, key, ...)`: greedy (temperature 0) or temperature / top-k / top-p sampling.

`generate` runs them in one `jit`: prefill, then a `lax.while_loop` that stops when every row has
emitted a stop token or `max_new` tokens. `use_cache=False` recomputes the full forward over a fixed
`[b, prompt + max_new]` buffer each step instead: slow, but an independent check of the cache path.
Jitted single steps with a donated cache are `prefill_jit` and `decode_step_jit`.

On CPU the decode loop runs over unstacked layers (`mixie.model.llama.unstack_layers`, `unstack=`):
XLA:CPU copies each layer's weights out of a stacked array before its matmuls, which doubles the
memory traffic of small-batch decoding. Unstacked, the weights are read in place (at the price of a
longer compile and one more copy of the layers while the call runs).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixie.errors import MixieError
from mixie.model.llama import LlamaConfig, Params, forward, init_cache, unembed, unstack_layers


def _last_hidden(h_btd, index_b):
  return jnp.take_along_axis(h_btd, index_b[:, None, None], axis=1)[:, 0]


def prefill(params: Params, expert: Params | None, prompt_bt: jax.Array, lengths_b: jax.Array,
            cache: dict, cfg: LlamaConfig, *, lora_scale: float = 1.0) -> tuple[jax.Array, dict]:
  """Feeds right-padded prompts into an empty `cache`.

  Returns the f32 logits `[b, v]` after each row's last real token and the cache with `length` set to
  the true prompt lengths (the padded tail is overwritten by the tokens decoded next).
  """
  _, cache, h_btd = forward(params, expert, prompt_bt, cfg, lora_scale=lora_scale, cache=cache,
                            return_hidden=True)
  logits_bv = unembed(params, _last_hidden(h_btd, lengths_b - 1), cfg)
  return logits_bv, dict(cache, length=lengths_b.astype(jnp.int32))


def decode_step(params: Params, expert: Params | None, tokens_b: jax.Array, cache: dict,
                cfg: LlamaConfig, *, lora_scale: float = 1.0) -> tuple[jax.Array, dict]:
  """Appends `tokens_b` at each row's cache length; returns the next logits `[b, v]` and the cache."""
  _, cache, h_btd = forward(params, expert, tokens_b[:, None], cfg, lora_scale=lora_scale, cache=cache,
                            return_hidden=True)
  return unembed(params, h_btd[:, 0], cfg), cache


prefill_jit = jax.jit(prefill, static_argnames=("cfg",), donate_argnames=("cache",))
decode_step_jit = jax.jit(decode_step, static_argnames=("cfg",), donate_argnames=("cache",))


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


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "temperature", "top_k", "top_p",
                                             "stop_tokens", "pad_id", "use_cache", "unstack"))
def _generate(params, expert, prompt_bt, lengths_b, key, lora_scale, *, cfg, max_new, temperature,
              top_k, top_p, stop_tokens, pad_id, use_cache, unstack):
  b, p = prompt_bt.shape
  lengths_b = lengths_b.astype(jnp.int32)
  stop = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

  def draw(logits_bv, key):  # greedy decoding needs no PRNG at all (and compiles faster without it)
    if temperature <= 0.0:
      return sample_logits(logits_bv, None), key
    key, sub = jax.random.split(key)
    return sample_logits(logits_bv, sub, temperature=temperature, top_k=top_k, top_p=top_p), key

  if use_cache:
    cache = init_cache(cfg, b, p + max_new)
    logits_bv, state = prefill(params, expert, prompt_bt, lengths_b, cache, cfg, lora_scale=lora_scale)
    step_params = unstack_layers(params) if unstack else params  # copied once, before the loop

    def advance(state, tok_b, step):
      del step
      return decode_step(step_params, expert, tok_b, state, cfg, lora_scale=lora_scale)
  else:
    buf_bs = jnp.concatenate([prompt_bt.astype(jnp.int32), jnp.full((b, max_new), pad_id, jnp.int32)], 1)

    def logits_at(buf_bs, pos_b):
      _, _, h_bsd = forward(params, expert, buf_bs, cfg, lora_scale=lora_scale, return_hidden=True)
      return unembed(params, _last_hidden(h_bsd, pos_b), cfg)

    logits_bv, state = logits_at(buf_bs, lengths_b - 1), buf_bs

    def advance(buf_bs, tok_b, step):  # step-th new token sits at lengths + step
      buf_bs = buf_bs.at[jnp.arange(b), lengths_b + step].set(tok_b)
      return logits_at(buf_bs, lengths_b + step), buf_bs

  tok_b, key = draw(logits_bv, key)
  out_bn = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok_b)
  done_b = jnp.isin(tok_b, stop)
  n_b = jnp.ones((b,), jnp.int32)

  def cond(carry):
    step, _, _, _, done_b, _, _ = carry
    return (step < max_new) & ~jnp.all(done_b)

  def body(carry):
    step, tok_b, state, out_bn, done_b, n_b, key = carry
    logits_bv, state = advance(state, tok_b, step - 1)
    new_b, key = draw(logits_bv, key)
    new_b = jnp.where(done_b, pad_id, new_b)
    out_bn = out_bn.at[:, step].set(new_b)
    n_b = n_b + (~done_b).astype(jnp.int32)
    done_b = done_b | jnp.isin(new_b, stop)
    return step + 1, new_b, state, out_bn, done_b, n_b, key

  carry = (jnp.int32(1), tok_b, state, out_bn, done_b, n_b, key)
  _, _, _, out_bn, _, n_b, _ = jax.lax.while_loop(cond, body, carry)
  return out_bn, n_b


def generate(params: Params, expert: Params | None, prompt_bt, lengths_b, cfg: LlamaConfig, *,
             max_new: int, key: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens: Sequence[int] = (), pad_id: int = 0,
             lora_scale: float = 1.0, use_cache: bool = True, unstack: bool | None = None
             ) -> tuple[jax.Array, jax.Array]:
  """Generates up to `max_new` tokens after right-padded prompts.

  Args:
    params, expert, cfg, lora_scale: the base, and `None` or one LoRA expert.
    prompt_bt: int prompts, right-padded; `lengths_b`: their true lengths (each >= 1).
    max_new: number of new tokens to produce per row (at most).
    key: PRNG key for sampling (unused when greedy).
    temperature, top_k, top_p: see `sample_logits`; temperature 0 is greedy.
    stop_tokens: a row is finished after emitting one of these (it is kept in the output).
    pad_id: fills each row after it finished.
    use_cache: KV-cache decoding; False recomputes the whole prefix every step.
    unstack: decode over unstacked layers (`mixie.model.llama.unstack_layers`): faster small-batch
      decoding, for one more copy of the layer weights during the call. None: on CPU only.

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
  return _generate(params, expert, prompt_bt, jnp.asarray(lengths_b, jnp.int32), key,
                   jnp.float32(lora_scale), cfg=cfg, max_new=int(max_new),
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   stop_tokens=tuple(int(s) for s in stop_tokens), pad_id=int(pad_id),
                   use_cache=bool(use_cache),
                   unstack=(jax.default_backend() == "cpu") if unstack is None else bool(unstack))


def generate_text(params: Params, expert: Params | None, tokenizer, prompts: Sequence[str],
                  cfg: LlamaConfig, *, max_new: int = 32, add_bos: bool | None = None, **kw) -> list[str]:
  """Text in, text out: encodes `prompts`, generates (stopping at the tokenizer's EOS ids), decodes."""
  prompt_bt, lengths_b = tokenizer.encode_padded(prompts, add_bos=add_bos)
  if lengths_b.min() < 1:
    raise MixieError("generate_text: an empty prompt (add_bos=True gives it a BOS token)")
  kw.setdefault("stop_tokens", tokenizer.eos_ids)
  kw.setdefault("pad_id", tokenizer.pad_id)
  out_bn, n_b = generate(params, expert, prompt_bt, lengths_b, cfg, max_new=max_new, **kw)
  out_bn, n_b = np.asarray(out_bn), np.asarray(n_b)
  return [tokenizer.decode(out_bn[i, :n_b[i]]) for i in range(len(prompts))]

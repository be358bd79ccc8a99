"""The building blocks of a decoder as Flax NNX modules, written for ONE expert.

- `Embed`, `RMSNorm`: token embedding (also the tied LM head) and root-mean-square norm.
- `LoRA`: one expert's low-rank update of one projection; its weights are `nnx.LoRAParam`s, the
  Variable type that selects what trains, is checkpointed and exported (the base is `nnx.Param`).
- `Linear`: a frozen projection `x @ kernel` (kernel `[in, out]`) plus an optional `LoRA`.
- `Attention` (GQA, RoPE with Llama-3 scaling, `jax.nn.dot_product_attention`, KV cache with per-row
  lengths, optional sliding window and score soft-capping), `MLP` (gated, SiLU or GELU-tanh), `Block`
  (pre-norm decoder layer, optional post-norms).

Family differences (`mixie.model.families`) are Python-level switches read from the static config when
a module is built: a switch that is off adds nothing to the compiled graph.

Every variable carries its logical axis names as `out_sharding` metadata (`mixie.sharding` maps them
to mesh axes by the config's rules). A stack of experts is not a module of its own: the same modules
are `nnx.vmap`ped with the `LoRAParam`s on the expert axis (`mixie.model.llama.over_experts`).

Matmuls take 2-D operands (`[n, d]`): XLA:CPU's transposed-operand dots in the backward pass of a 3-D
LoRA product ran 10x slower than the same FLOPs in 2-D. Outputs the backward pass needs are named
(`checkpoint_name`) so that a training step saves only those per layer (`SAVED`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mixie.model import families
from mixie.model.config import LlamaConfig

# Activations a training step keeps for the backward pass (everything else in a layer is recomputed
# from them: norms, RoPE, softmax, activations, LoRA's rank-r products): the projections' outputs
# that are expensive to redo and the attention output.
SAVED = ("q", "k", "v", "attn_out", "o", "gate", "up")


def param(value, axes, kind=nnx.Param):
  """A variable of type `kind` with logical axis names `axes` (no placement at creation)."""
  return kind(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
  """RMSNorm computed in f32, returned in the input's dtype; the weight is `(offset + scale)`."""

  def __init__(self, d: int, cfg: LlamaConfig):
    self.scale = param(jnp.ones((d,), cfg.param_dtype), ("embed",))
    self.eps = cfg.rms_eps
    self.offset = families.get(cfg.family).norm_offset

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    w = self.scale[...].astype(jnp.float32)
    return (y * (w + self.offset if self.offset else w)).astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding `[v, d]`; `attend` is the tied LM head (f32 logits)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    w = 0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model))
    self.embedding = param(w.astype(cfg.param_dtype), ("vocab", "embed"))
    self.dtype = cfg.compute_dtype
    self.multiplier = math.sqrt(cfg.d_model) if families.get(cfg.family).embed_scale else None

  def __call__(self, tokens):
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
    # sqrt(d) rounded to the activations' dtype first, as HF does (in bf16 it is not exact)
    return x if self.multiplier is None else x * jnp.asarray(self.multiplier, self.dtype)

  def attend(self, h_xd):
    """Logits `[..., v]` of hidden states: contracted against `[v, d]` (no transposed copy)."""
    h_xd = h_xd.astype(self.dtype)
    return jnp.einsum("...d,vd->...v", h_xd, self.embedding[...].astype(h_xd.dtype),
                      preferred_element_type=jnp.float32)


def kaiming_a(key, shape, d_in: int, dtype):
  """LoRA `a` init as PEFT's kaiming-uniform: U(-1/sqrt(d_in), 1/sqrt(d_in)), drawn in f32."""
  bound = 1.0 / jnp.sqrt(d_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class LoRA(nnx.Module):
  """`(x @ a) @ b * scale` of one expert for one projection: `a [d_in, r]`, `b [r, d_out]` (zero at
  init, so a fresh expert is exactly the base)."""

  def __init__(self, d_in: int, d_out: int, rank: int, *, scale: float, dropout: float, dtype,
               rngs: nnx.Rngs):
    self.a = param(kaiming_a(rngs.params(), (d_in, rank), d_in, dtype), ("lora_in", "lora_rank"),
                   nnx.LoRAParam)
    self.b = param(jnp.zeros((rank, d_out), dtype), ("lora_rank", "lora_out"), nnx.LoRAParam)
    self.scale = float(scale)
    self.dropout = float(dropout)

  def __call__(self, x_nd, dropout_key=None, mask_shape=None):
    """The f32 update `[n, d_out]`; LoRA dropout on the input when a key is given (the mask is drawn
    over `mask_shape`, the input's shape before it was flattened to 2-D)."""
    if dropout_key is not None and self.dropout > 0.0:
      keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, mask_shape or x_nd.shape)
      x_nd = jnp.where(keep.reshape(x_nd.shape), x_nd / (1.0 - self.dropout), 0).astype(x_nd.dtype)
    xr_nr = jnp.einsum("nd,dr->nr", x_nd, self.a[...].astype(x_nd.dtype),
                       preferred_element_type=jnp.float32)
    return self.scale * jnp.einsum("nr,rf->nf", xr_nr.astype(x_nd.dtype), self.b[...].astype(x_nd.dtype),
                                   preferred_element_type=jnp.float32)


class Linear(nnx.Module):
  """`x @ kernel` (`[in, out]`, frozen) plus `bias` (`[out]`, frozen, when `bias`), plus the `lora`
  update when an expert targets it. The dense `kernel + a @ b` is never formed; matmuls run in x's dtype
  with f32 accumulation."""

  def __init__(self, d_in: int, d_out: int, axes, cfg: LlamaConfig, *, lora=None, bias: bool = False,
               rngs: nnx.Rngs):
    w = 0.02 * jax.random.normal(rngs.params(), (d_in, d_out))
    self.kernel = param(w.astype(cfg.param_dtype), axes)
    self.bias = param(jnp.zeros((d_out,), cfg.param_dtype), axes[1:]) if bias else None
    self.lora = None if lora is None else LoRA(d_in, d_out, lora.rank, scale=lora.scale,
                                               dropout=lora.dropout, dtype=lora.dtype, rngs=rngs)

  def __call__(self, x_nd, dropout_key=None, mask_shape=None):
    y_nf = jnp.einsum("nd,df->nf", x_nd, self.kernel[...].astype(x_nd.dtype),
                      preferred_element_type=jnp.float32)
    if self.bias is not None:
      y_nf = y_nf + self.bias[...].astype(jnp.float32)
    if self.lora is not None:
      y_nf = y_nf + self.lora(x_nd, dropout_key, mask_shape)
    return y_nf.astype(x_nd.dtype)


class LoraSpec(NamedTuple):
  """What a `Linear` needs to build its adapter: rank, output scale, dropout, storage dtype."""

  rank: int
  scale: float
  dropout: float
  dtype: str


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies `[h/2]`, with Llama-3 scaling when configured."""
  h = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
  if cfg.rope_scaling is not None:
    factor, low, high, orig = cfg.rope_scaling
    low_wavelen, high_wavelen = orig / low, orig / high
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - low) / (high - low)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
  return inv.astype(np.float32)


def apply_rope(x_btnh, positions_bt, inv_freq):
  """Rotary embedding, HF "rotate half" convention, computed in f32."""
  ang = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [b, t, h/2]
  cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :]
  xf = x_btnh.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rot = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * cos + rot * sin).astype(x_btnh.dtype)


class LayerInputs(NamedTuple):
  """What every layer of one call shares: positions `[b, t]`, RoPE inverse frequencies, each row's
  cache start `[b]` (None without a cache); and the layer's attention window (None: none; an int:
  the same static window in every layer; a scalar array: this layer's, scanned over the layers)."""

  positions_bt: jax.Array
  inv_freq: jax.Array
  start_b: jax.Array | None
  window: int | jax.Array | None = None


def softcapped_attention(q_btnh, k_bskh, v_bskh, mask_bts, scale, cap):
  """Attention with soft-capped scores `cap * tanh(s / cap)` (Gemma 2), computed explicitly (f32
  scores and softmax): `jax.nn.dot_product_attention` has no soft-capping argument, so only families
  with `attn_softcap` take this path. Query head n reads kv head n // (N / K), as in GQA."""
  b, t, N, H = q_btnh.shape
  K = k_bskh.shape[2]
  q_btkgh = q_btnh.reshape(b, t, K, N // K, H)
  s_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
  s_bkgts = cap * jnp.tanh(s_bkgts * (H ** -0.5 if scale is None else scale) / cap)
  s_bkgts = jnp.where(mask_bts[:, None, None], s_bkgts, jnp.finfo(jnp.float32).min)
  p_bkgts = jax.nn.softmax(s_bkgts, axis=-1).astype(v_bskh.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", p_bkgts, v_bskh, preferred_element_type=jnp.float32)
  return out.reshape(b, t, N, H).astype(q_btnh.dtype)


def _write_rows(cache_bskh, new_btkh, start_b):
  """Writes `new` into `cache` at each row's own start position."""
  return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0)))(
      cache_bskh, new_btkh, start_b)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE; causal, or over a KV cache with per-row lengths."""

  def __init__(self, cfg: LlamaConfig, adapters: dict, *, rngs: nnx.Rngs):
    D, NH, KH = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    bias = families.get(cfg.family).qkv_bias
    self.q = Linear(D, NH, ("embed", "heads"), cfg, lora=adapters.get("q"), bias=bias, rngs=rngs)
    self.k = Linear(D, KH, ("embed", "kv_heads"), cfg, lora=adapters.get("k"), bias=bias, rngs=rngs)
    self.v = Linear(D, KH, ("embed", "kv_heads"), cfg, lora=adapters.get("v"), bias=bias, rngs=rngs)
    self.o = Linear(NH, D, ("heads", "embed"), cfg, lora=adapters.get("o"), rngs=rngs)
    self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.impl = cfg.attention_impl
    self.scale = cfg.query_scale ** -0.5 if cfg.query_scale else None  # None: head_dim ** -0.5
    self.softcap = cfg.attn_softcap or None

  def __call__(self, h_btd, ctx: LayerInputs, cache_l, keys):
    """Returns the attention output `[b, t, d]` (after `o`) and this call's keys/values `{k, v}`
    `[b, t, k, h]` (None without a cache: the caller writes all layers' entries at once)."""
    N, K, H = self.n_heads, self.n_kv_heads, self.head_dim
    b, t, d = h_btd.shape
    h_nd, shape = h_btd.reshape(b * t, d), h_btd.shape
    q_btnh = checkpoint_name(self.q(h_nd, keys["q"], shape), "q").reshape(b, t, N, H)
    k_btkh = checkpoint_name(self.k(h_nd, keys["k"], shape), "k").reshape(b, t, K, H)
    v_btkh = checkpoint_name(self.v(h_nd, keys["v"], shape), "v").reshape(b, t, K, H)
    q_btnh = apply_rope(q_btnh, ctx.positions_bt, ctx.inv_freq)
    k_btkh = apply_rope(k_btkh, ctx.positions_bt, ctx.inv_freq)
    if cache_l is None:
      attn_btnh = self._attend(q_btnh, k_btkh, v_btkh, None, ctx.window)
      new_kv = None
    else:
      k_bskh = _write_rows(cache_l["k"], k_btkh, ctx.start_b)
      v_bskh = _write_rows(cache_l["v"], v_btkh, ctx.start_b)
      attn_btnh = self._attend(q_btnh, k_bskh.astype(q_btnh.dtype), v_bskh.astype(q_btnh.dtype),
                               ctx.positions_bt, ctx.window)
      new_kv = {"k": k_btkh, "v": v_btkh}
    a_nd = checkpoint_name(attn_btnh.reshape(b * t, N * H), "attn_out")
    out_nd = checkpoint_name(self.o(a_nd, keys["o"], (b, t, N * H)), "o")
    return out_nd.reshape(b, t, -1), new_kv

  def _attend(self, q_btnh, k_bskh, v_bskh, positions_bt, window):
    """Causal attention, windowed when `window` is set: a query at position p sees keys in
    (p - window, p]. Without a cache (`positions_bt` None) keys are the queries' own positions;
    with one, key j of the cache sits at position j and queries at `positions_bt`."""
    if positions_bt is None and not isinstance(window, jax.Array) and self.softcap is None:
      return jax.nn.dot_product_attention(
          q_btnh, k_bskh, v_bskh, scale=self.scale, is_causal=True, implementation=self.impl,
          local_window_size=None if window is None else (window - 1, 0))
    q_pos_bt = jnp.arange(q_btnh.shape[1])[None] if positions_bt is None else positions_bt
    k_pos_11s = jnp.arange(k_bskh.shape[1])[None, None, :]
    mask_bts = k_pos_11s <= q_pos_bt[:, :, None]
    if window is not None:
      mask_bts = mask_bts & (k_pos_11s > q_pos_bt[:, :, None] - window)
    if self.softcap is not None:
      return softcapped_attention(q_btnh, k_bskh, v_bskh, mask_bts, self.scale, self.softcap)
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None], scale=self.scale)


class MLP(nnx.Module):
  """Gated MLP: `down(act(gate(x)) * up(x))`."""

  def __init__(self, cfg: LlamaConfig, adapters: dict, *, rngs: nnx.Rngs):
    D, F = cfg.d_model, cfg.d_ff
    self.gate = Linear(D, F, ("embed", "mlp"), cfg, lora=adapters.get("gate"), rngs=rngs)
    self.up = Linear(D, F, ("embed", "mlp"), cfg, lora=adapters.get("up"), rngs=rngs)
    self.down = Linear(F, D, ("mlp", "embed"), cfg, lora=adapters.get("down"), rngs=rngs)
    self.activation = families.get(cfg.family).activation

  def __call__(self, h_btd, keys):
    b, t, d = h_btd.shape
    h_nd, shape = h_btd.reshape(b * t, d), h_btd.shape
    g_nf = checkpoint_name(self.gate(h_nd, keys["gate"], shape), "gate")
    u_nf = checkpoint_name(self.up(h_nd, keys["up"], shape), "up")
    act = jax.nn.silu(g_nf) if self.activation == "silu" else jax.nn.gelu(g_nf, approximate=True)
    m_nf = act * u_nf
    return self.down(m_nf, keys["down"], (b, t, m_nf.shape[-1])).reshape(b, t, d)


class Block(nnx.Module):
  """One pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`; with the family's
  `post_norms` (Gemma 2) each branch's output is normed too: `x + post_norm(attn(norm(x)))`."""

  def __init__(self, cfg: LlamaConfig, adapters: dict, *, rngs: nnx.Rngs):
    post = families.get(cfg.family).post_norms
    self.attn_norm = RMSNorm(cfg.d_model, cfg)
    self.attn = Attention(cfg, adapters, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.d_model, cfg) if post else None
    self.mlp_norm = RMSNorm(cfg.d_model, cfg)
    self.mlp = MLP(cfg, adapters, rngs=rngs)
    self.post_mlp_norm = RMSNorm(cfg.d_model, cfg) if post else None

  def __call__(self, x_btd, ctx: LayerInputs, cache_l=None, dropout_key=None):
    """`(x_btd, new_kv)`; `dropout_key`: this layer's LoRA-dropout key (None: no dropout)."""
    names = ("q", "k", "v", "o", "gate", "up", "down")
    subkeys = (jax.random.split(dropout_key, len(names)) if dropout_key is not None
               else [None] * len(names))
    keys = dict(zip(names, subkeys))
    a_btd, new_kv = self.attn(self.attn_norm(x_btd), ctx, cache_l, keys)
    if self.post_attn_norm is not None:
      a_btd = self.post_attn_norm(a_btd)
    x_btd = x_btd + a_btd
    m_btd = self.mlp(self.mlp_norm(x_btd), keys)
    if self.post_mlp_norm is not None:
      m_btd = self.post_mlp_norm(m_btd)
    return x_btd + m_btd, new_kv

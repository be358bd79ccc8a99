"""A Llama-family decoder (TinyLlama, Llama 2/3, SmolLM2), written for ONE expert.

The core is a pure function, `forward(params, expert, tokens_bt, cfg, ...)`, over plain pytrees:

- `params`: the frozen base, layers stacked on a leading `L` axis and scanned (fast compiles, and the
  same layout a `layers` sharding rule can address). Projection weights are stored `[in, out]`.
- `expert`: `None` for the plain base, or one LoRA expert (see `mixie.model.lora`). A stack of E experts
  is the same tree with a leading E axis, applied with `jax.vmap(forward, in_axes=(None, 0, 0))`: the base
  is broadcast, so its matmuls become one large matmul over E*b sequences.

`Llama` is the Flax NNX module holding the parameters (with logical axis names as metadata);
`Llama.__call__` calls the same `forward`.

Shapes use dimension letters: b batch, t/T query positions, s/S key positions, d model width, n query
heads, k kv heads, h head dim, f MLP width, v vocab, l layers, r LoRA rank.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Params = dict[str, Any]

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture and numerics of a Llama-family decoder."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  head_dim: int = 0  # 0: d_model // n_heads
  rope_theta: float = 10000.0
  # Llama-3 style scaling: (factor, low_freq_factor, high_freq_factor, original_max_position) or None.
  rope_scaling: tuple[float, float, float, int] | None = None
  rms_eps: float = 1e-5
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  dtype: str = "float32"  # compute dtype of matmuls and activations
  param_dtype: str = "float32"  # storage dtype of the base parameters
  attention_impl: str | None = None  # None lets JAX pick (cuDNN on GPU); "xla" or "cudnn" to force

  def __post_init__(self):
    if self.head_dim == 0:
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

  @property
  def compute_dtype(self):
    """`dtype` as a jnp dtype (activations and matmul inputs)."""
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> "LlamaConfig":
    """A copy with the given fields changed."""
    return dataclasses.replace(self, **kw)


PRESETS: dict[str, LlamaConfig] = {
    "smollm2_135m": LlamaConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                d_ff=1536, rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192),
    "tinyllama_1b": LlamaConfig(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                d_ff=5632, rope_theta=10000.0, max_seq_len=2048),
    "llama2_7b": LlamaConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                             d_ff=11008, rope_theta=10000.0, max_seq_len=4096),
    # 2 layers, d=64, SmolLM2's vocabulary (so the shipped tokenizer): scale simulations of thousands of experts
    "tiny_smollm2": LlamaConfig(vocab_size=49152, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                rope_theta=10000.0, tie_embeddings=True, max_seq_len=2048),
}


def param_shapes(cfg: LlamaConfig) -> dict[str, Any]:
  """Shape of every base parameter (the tree `forward` takes)."""
  L, D, F, V = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
  N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  shapes = {
      "embed": (V, D),
      "layers": {
          "attn_norm": (L, D),
          "q": (L, D, N * H),
          "k": (L, D, K * H),
          "v": (L, D, K * H),
          "o": (L, N * H, D),
          "mlp_norm": (L, D),
          "gate": (L, D, F),
          "up": (L, D, F),
          "down": (L, F, D),
      },
      "final_norm": (D,),
  }
  if not cfg.tie_embeddings:
    shapes["lm_head"] = (D, V)
  return shapes


# Logical axis names of each base parameter; config rules map them to mesh axes (mixie.sharding).
PARAM_AXES: dict[str, Any] = {
    "embed": ("vocab", "embed"),
    "layers": {
        "attn_norm": ("layers", "embed"),
        "q": ("layers", "embed", "heads"),
        "k": ("layers", "embed", "kv_heads"),
        "v": ("layers", "embed", "kv_heads"),
        "o": ("layers", "heads", "embed"),
        "mlp_norm": ("layers", "embed"),
        "gate": ("layers", "embed", "mlp"),
        "up": ("layers", "embed", "mlp"),
        "down": ("layers", "mlp", "embed"),
    },
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
}


def param_axes(cfg: LlamaConfig) -> dict[str, Any]:
  """`PARAM_AXES` restricted to the parameters `cfg` has."""
  axes = dict(PARAM_AXES)
  if cfg.tie_embeddings:
    axes.pop("lm_head")
  return axes


def init_params(cfg: LlamaConfig, key: jax.Array) -> Params:
  """Random base parameters (normal(0.02) matrices, unit norms), in `cfg.param_dtype`."""
  shapes = param_shapes(cfg)
  flat, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
  keys = jax.random.split(key, len(flat))
  dt = jnp.dtype(cfg.param_dtype)
  leaves = [jnp.ones(s, dt) if "norm" in p else (0.02 * jax.random.normal(k, s)).astype(dt)
            for p, s, k in zip(paths, flat, keys)]
  return jax.tree.unflatten(treedef, leaves)


def unstack_layers(params: Params) -> Params:
  """The same parameters with `layers` as a tuple of per-layer dicts instead of stacked arrays.

  `forward` accepts both. Scanning over stacked layers makes XLA copy each layer's weights out of the
  stack before its matmuls; for small-batch decoding, which only streams the weights, that copy costs
  as much as the matmuls on CPU. Unstacked weights are separate buffers, read in place. (The copy is
  made once, e.g. before a decode loop, and needs memory for one more copy of the layers.)
  """
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  return dict(params, layers=tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)))


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays or `ShapeDtypeStruct`s."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------------
# Building blocks.


def rms_norm(x, w, eps):
  """RMSNorm computed in f32, returned in x's dtype."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


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


def project(x, w, lora_ab, lora_scale, dropout_key=None, dropout_rate=0.0):
  """`x @ w`, plus the low-rank update `(x @ a) @ b * scale` when an expert targets it.

  The dense `w + a @ b` is never formed. Matmuls run in x's dtype with f32 accumulation.
  """
  lead = x.shape[:-1]
  x_nd = x.reshape(-1, x.shape[-1])  # 2-D operands: XLA:CPU's transposed-operand dots in the
  # backward pass of a 3-D `[b, t, d]` LoRA product ran 10x slower than the same FLOPs in 2-D
  y_nf = jnp.einsum("nd,df->nf", x_nd, w.astype(x.dtype), preferred_element_type=jnp.float32)
  if lora_ab is not None:
    xa_nd = x_nd
    if dropout_key is not None and dropout_rate > 0.0:
      keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, x.shape).reshape(x_nd.shape)
      xa_nd = jnp.where(keep, x_nd / (1.0 - dropout_rate), 0).astype(x.dtype)
    a, b = lora_ab["a"], lora_ab["b"]
    xr_nr = jnp.einsum("nd,dr->nr", xa_nd, a.astype(x.dtype), preferred_element_type=jnp.float32)
    y_nf = y_nf + lora_scale * jnp.einsum("nr,rf->nf", xr_nr.astype(x.dtype), b.astype(x.dtype),
                                          preferred_element_type=jnp.float32)
  return y_nf.astype(x.dtype).reshape(*lead, w.shape[-1])


# ---------------------------------------------------------------------------------------------------
# KV cache.


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
  """An empty KV cache: keys/values `[l, b, S, k, h]` and the filled length of each row `[b]`."""
  dt = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "length": jnp.zeros((batch,), jnp.int32)}


def _write_cache(cache_bskh, new_btkh, start_b):
  """Writes `new` into `cache` at each row's own start position."""
  return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0)))(
      cache_bskh, new_btkh, start_b)


# ---------------------------------------------------------------------------------------------------
# The forward pass.


def _layer(cfg, lora_scale, dropout_rate, inv_freq, x_btd, positions_bt, lp, ep, cache_l, start_b,
           dropout_key):
  """One decoder layer. `lp`: this layer's base params; `ep`: its expert params or None."""
  N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  b, t, _ = x_btd.shape
  keys = (list(jax.random.split(dropout_key, len(PROJECTIONS))) if dropout_key is not None
          else [None] * len(PROJECTIONS))
  dk = dict(zip(PROJECTIONS, keys))

  def proj(name, x):
    return project(x, lp[name], None if ep is None else ep.get(name), lora_scale, dk[name], dropout_rate)

  h_btd = rms_norm(x_btd, lp["attn_norm"], cfg.rms_eps)
  q_btnh = proj("q", h_btd).reshape(b, t, N, H)
  k_btkh = proj("k", h_btd).reshape(b, t, K, H)
  v_btkh = proj("v", h_btd).reshape(b, t, K, H)
  q_btnh = apply_rope(q_btnh, positions_bt, inv_freq)
  k_btkh = apply_rope(k_btkh, positions_bt, inv_freq)

  if cache_l is None:
    attn_btnh = jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, is_causal=True,
                                             implementation=cfg.attention_impl)
    new_cache_l = None
  else:
    k_bskh = _write_cache(cache_l["k"], k_btkh, start_b)
    v_bskh = _write_cache(cache_l["v"], v_btkh, start_b)
    s = k_bskh.shape[1]
    mask_bts = jnp.arange(s)[None, None, :] <= positions_bt[:, :, None]
    attn_btnh = jax.nn.dot_product_attention(q_btnh, k_bskh.astype(q_btnh.dtype),
                                             v_bskh.astype(q_btnh.dtype), mask=mask_bts[:, None])
    new_cache_l = {"k": k_btkh, "v": v_btkh}  # only the new entries: the caller writes them once
  x_btd = x_btd + proj("o", attn_btnh.reshape(b, t, N * H))

  h_btd = rms_norm(x_btd, lp["mlp_norm"], cfg.rms_eps)
  g_btf = proj("gate", h_btd)
  u_btf = proj("up", h_btd)
  x_btd = x_btd + proj("down", jax.nn.silu(g_btf) * u_btf)
  return x_btd, new_cache_l


def forward(params: Params, expert: Params | None, tokens_bt: jax.Array, cfg: LlamaConfig, *,
            lora_scale: float = 1.0, positions_bt: jax.Array | None = None,
            cache: dict | None = None, dropout_rate: float = 0.0, dropout_key: jax.Array | None = None,
            return_hidden: bool = False, remat: bool = False):
  """Logits `[b, t, v]` (f32) of the base, or of the base plus one expert.

  Args:
    params: base parameters (`param_shapes`); `layers` stacked, or unstacked by `unstack_layers`.
    expert: `None`, or one LoRA expert: `{proj: {"a": [l, d_in, r], "b": [l, r, d_out]}}`.
    tokens_bt: token ids.
    cfg: the architecture.
    lora_scale: alpha / rank of the expert.
    positions_bt: absolute positions; default `arange(t)` (offset by the cache length with a cache).
    cache: a KV cache from `init_cache`; tokens are written at each row's `length`.
    dropout_rate, dropout_key: LoRA dropout (training only).
    return_hidden: also return the final-norm hidden states `[b, t, d]`.
    remat: rematerialise each layer in the backward pass (saves activation memory).

  Returns:
    `(logits_btv, new_cache)`, or `(logits_btv, new_cache, hidden_btd)` with `return_hidden`.
    With a cache, `new_cache["length"]` is the old length plus t: callers with right-padded prompts
    set it to the true lengths.
  """
  dt = cfg.compute_dtype
  b, t = tokens_bt.shape
  start_b = cache["length"] if cache is not None else jnp.zeros((b,), jnp.int32)
  if positions_bt is None:
    positions_bt = start_b[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  inv_freq = jnp.asarray(rope_inv_freq(cfg))
  x_btd = jnp.take(params["embed"], tokens_bt, axis=0).astype(dt)

  expert_layers = None if expert is None else expert
  layer_keys = (jax.random.split(dropout_key, cfg.n_layers) if dropout_key is not None else None)
  cache_layers = None if cache is None else {"k": cache["k"], "v": cache["v"]}

  def body(x, xs):
    lp, ep, cl, lk = xs
    return _layer(cfg, lora_scale, dropout_rate, inv_freq, x, positions_bt, lp, ep, cl, start_b, lk)

  if remat:
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
  if isinstance(params["layers"], (list, tuple)):  # unstacked (see `unstack_layers`): a Python loop
    new_entries = []
    for i, lp in enumerate(params["layers"]):
      pick = lambda tree: None if tree is None else jax.tree.map(lambda a: a[i], tree)  # noqa: E731
      x_btd, kv = body(x_btd, (lp, pick(expert_layers), pick(cache_layers), pick(layer_keys)))
      new_entries.append(kv)
    new_kv = None if cache is None else jax.tree.map(lambda *xs: jnp.stack(xs), *new_entries)
  else:
    x_btd, new_kv = jax.lax.scan(body, x_btd, (params["layers"], expert_layers, cache_layers, layer_keys))
  h_btd = rms_norm(x_btd, params["final_norm"], cfg.rms_eps)
  logits_btv = unembed(params, h_btd, cfg)
  new_cache = None
  if cache is not None:
    # One in-place write of all layers' new entries `[l, b, t, k, h]` at each row's start.
    write = jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (0, s, 0, 0)),
                     in_axes=(1, 1, 0), out_axes=1)
    new_cache = {"k": write(cache["k"], new_kv["k"], start_b), "v": write(cache["v"], new_kv["v"], start_b),
                 "length": start_b + t}
  if return_hidden:
    return logits_btv, new_cache, h_btd
  return logits_btv, new_cache


def unembed(params: Params, h_xd: jax.Array, cfg: LlamaConfig) -> jax.Array:
  """Logits (f32) of final-norm hidden states `[..., d]`: the tied embedding or `lm_head`."""
  h_xd = h_xd.astype(cfg.compute_dtype)
  if cfg.tie_embeddings:  # contract against [v, d] directly: no transposed copy of the embedding
    return jnp.einsum("...d,vd->...v", h_xd, params["embed"].astype(h_xd.dtype),
                      preferred_element_type=jnp.float32)
  return jnp.einsum("...d,dv->...v", h_xd, params["lm_head"].astype(h_xd.dtype),
                    preferred_element_type=jnp.float32)


def token_logprobs(logits_btv, targets_bt):
  """log p(target) per position, f32."""
  logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]


# ---------------------------------------------------------------------------------------------------
# The NNX module.


class Llama(nnx.Module):
  """Flax NNX container of the base parameters; calling it runs `forward`.

  Parameters are `nnx.Param`s carrying their logical axis names (`logical_axes`), which
  the config's rules (mixie.sharding) map to mesh axes.
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs | None = None, params: Params | None = None):
    self.cfg = cfg
    if params is None:
      params = init_params(cfg, (rngs or nnx.Rngs(0)).params())
    axes = param_axes(cfg)
    self.params = nnx.data(jax.tree.map(
        lambda a, ax: nnx.Param(a, logical_axes=ax), params, axes,
        is_leaf=lambda x: isinstance(x, tuple)))

  def param_tree(self) -> Params:
    """The plain parameter pytree `forward` takes."""
    return jax.tree.map(lambda p: p[...], self.params, is_leaf=lambda x: isinstance(x, nnx.Param))

  def __call__(self, tokens_bt, expert=None, **kw):
    return forward(self.param_tree(), expert, tokens_bt, self.cfg, **kw)


def config_from_hf(hf: Mapping[str, Any], **overrides) -> LlamaConfig:
  """`LlamaConfig` from an HF `config.json` dict (raises ValueError on an unsupported architecture)."""
  archs = hf.get("architectures") or [hf.get("model_type", "?")]
  if not any(a in ("LlamaForCausalLM", "llama", "MistralForCausalLM") for a in archs):
    raise ValueError(f"unsupported architecture {archs!r} (mixie reads Llama-family checkpoints: "
                     "LlamaForCausalLM)")
  scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
  rope_scaling = None
  if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
    rope_scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                    float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
  elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
    raise ValueError(f"unsupported rope_scaling {scaling!r} (supported: none, llama3)")
  theta = hf.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
  n_heads = hf["num_attention_heads"]
  return LlamaConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      d_ff=hf["intermediate_size"], head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
      rope_theta=float(theta), rope_scaling=rope_scaling, rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_seq_len=int(hf.get("max_position_embeddings", 2048)), **overrides)

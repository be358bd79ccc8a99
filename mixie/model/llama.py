"""The decoder as one Flax NNX module, `Llama`, written for ONE expert; and its functional face.

`Llama(cfg, lora)` is the base (lora None) or the base plus one LoRA expert. Its layers are ONE stacked
`Block` (every variable with a leading `layers` axis, created by `nnx.vmap`) run by one `lax.scan`:
one layer is compiled, whatever the depth. `unstacked()` gives the same model with a list of per-layer
blocks, for small-batch decoding (see `Llama.unstacked`).

Many experts are the same module vmapped (`vmap_adapters`): `nnx.vmap` with `nnx.StateAxes` putting
the `nnx.LoRAParam` variables on the mapped axis and broadcasting the base. Training maps E experts and
their batches (`mixie.train.step`); serving maps the rows of a mixed batch, each with the expert
gathered from the on-device cache (`mixie.model.generate`). So one module gives the base, one expert,
the training stack and a mixed batch.

Jitted code takes pure state and binds it inside (`bind`: `nnx.merge` of a cached `GraphDef` with the
base's and the expert's arrays): the graph is split once per configuration, never traversed per step.
The pure state is plain nested dicts: the base as `nnx.state(model, nnx.Param)` (`init_params`,
`param_shapes`, `param_axes`), an expert in the store's layout (`mixie.model.lora`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mixie.model.config import (GLOBAL, PRESETS, PROJECTIONS, LlamaConfig,  # noqa: F401 (re-exported)
                                count_params)
from mixie.model.layers import SAVED, Block, Embed, LayerInputs, Linear, LoraSpec, RMSNorm, rope_inv_freq
from mixie.model.lora import PROJECTION_MODULE, LoraConfig, adapter_state, expert_shapes

Params = dict[str, Any]

# The one filter of what an expert is: what trains, what the train state checkpoints and what the store
# exports. Everything else (`FROZEN`, the base) never enters an optimizer or a checkpoint.
TRAINABLE = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

# Where each named base parameter sits in the parameter tree (the checkpoint readers' keys).
PARAM_PATHS = {
    "embed": ("embed", "embedding"), "final_norm": ("final_norm", "scale"), "lm_head": ("lm_head", "kernel"),
    "attn_norm": ("layers", "attn_norm", "scale"), "mlp_norm": ("layers", "mlp_norm", "scale"),
    "post_attn_norm": ("layers", "post_attn_norm", "scale"),  # families with post_norms
    "post_mlp_norm": ("layers", "post_mlp_norm", "scale"),
    **{p: ("layers",) + m + ("kernel",) for p, m in PROJECTION_MODULE.items()},
    **{f"{p}_bias": ("layers", "attn", p, "bias") for p in ("q", "k", "v")},  # families with qkv_bias
}

# Logical axes of the activations a jitted step places (its inputs and outputs besides parameters and
# optimizer state); the parameters carry their own as variable metadata. `mixie.sharding` maps both by
# the config's rules. Inside the model activations are left to XLA's propagation from these.
ACTIVATION_AXES = {
    "tokens": ("expert", "batch", "length"),  # a training batch [E, b, T]: tokens, targets, loss mask
    "slot": ("expert",),  # one value per slot [E]: topics, metrics, reset masks and horizons
}


class Llama(nnx.Module):
  """A Llama-family decoder (`cfg.family` switches), with `lora`'s adapter on its targets or none."""

  def __init__(self, cfg: LlamaConfig, lora: LoraConfig | None = None, *, rngs: nnx.Rngs,
               lora_scale: float | None = None):
    """`lora_scale` overrides `lora.scale` (callers that know only the scale)."""
    spec = None if lora is None else LoraSpec(lora.rank, lora.scale if lora_scale is None else lora_scale,
                                              lora.dropout, lora.dtype)
    adapters = {} if lora is None else {p: spec for p in lora.targets}
    self.cfg = cfg
    self.embed = Embed(cfg, rngs=rngs)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked(r):
      return Block(cfg, adapters, rngs=r)

    self.layers = stacked(rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg)
    self.lm_head = (None if cfg.tie_embeddings else
                    Linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), cfg, rngs=rngs))

  def __call__(self, tokens_bt, *, positions_bt=None, cache: dict | None = None, dropout_key=None,
               remat: str = "none"):
    """Final-norm hidden states `[b, t, d]` and the updated cache (None without one).

    Args:
      tokens_bt: token ids.
      positions_bt: absolute positions; default `arange(t)`, offset by each row's cache length.
      cache: a KV cache from `init_cache`; tokens are written at each row's `length`, and the new
        cache's `length` is the old plus t (callers with right-padded prompts set the true lengths).
      dropout_key: LoRA-dropout key (training only; None: no dropout).
      remat: what a differentiated call keeps per layer of the stacked scan: "none" (everything;
        inference), "minimal" (the outputs in `mixie.model.layers.SAVED`, recomputing the rest),
        "full" (only the layer inputs). Unstacked layers (decoding) keep everything.
    """
    cfg = self.cfg
    b, t = tokens_bt.shape
    start_b = cache["length"] if cache is not None else jnp.zeros((b,), jnp.int32)
    if positions_bt is None:
      positions_bt = start_b[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    ctx = LayerInputs(positions_bt, jnp.asarray(rope_inv_freq(cfg)), start_b)
    x_btd = self.embed(tokens_bt)
    keys_l = jax.random.split(dropout_key, cfg.n_layers) if dropout_key is not None else None
    kv_l = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    x_btd, new_kv = self._layers(x_btd, ctx, kv_l, keys_l, remat)
    h_btd = self.final_norm(x_btd)
    if cache is None:
      return h_btd, None
    # One in-place write of all layers' new entries `[l, b, t, k, h]` at each row's start.
    write = jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (0, s, 0, 0)),
                     in_axes=(1, 1, 0), out_axes=1)
    return h_btd, {"k": write(cache["k"], new_kv["k"], start_b), "v": write(cache["v"], new_kv["v"], start_b),
                   "length": start_b + t}

  def _layers(self, x_btd, ctx, kv_l, keys_l, remat):
    """Runs every layer: one `lax.scan` over the stacked block, or a loop over unstacked blocks.

    Attention windows (`cfg.layer_windows`): one window in every layer is a static int in `ctx`; a
    mix of local and global layers is a per-layer int array scanned with the layers (a static int
    or None per unstacked block). Without windows nothing is added to the graph."""
    pick = lambda tree, i: None if tree is None else jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    windows = self.cfg.layer_windows()
    mixed = windows is not None and len(set(windows)) > 1
    if windows is not None and not mixed:
      ctx = ctx._replace(window=windows[0])
    if isinstance(self.layers, nnx.List):
      entries = []
      for i, block in enumerate(self.layers):
        ctx_i = ctx._replace(window=None if windows[i] == GLOBAL else windows[i]) if mixed else ctx
        x_btd, kv = block(x_btd, ctx_i, pick(kv_l, i), pick(keys_l, i))
        entries.append(kv)
      return x_btd, None if kv_l is None else jax.tree.map(lambda *xs: jnp.stack(xs), *entries)
    gdef, state = nnx.split(self.layers)
    window_l = jnp.asarray(windows, jnp.int32) if mixed else None

    def body(x_btd, xs):
      st, cache_l, key_l, w = xs
      return nnx.merge(gdef, st)(x_btd, ctx if w is None else ctx._replace(window=w), cache_l, key_l)

    if remat == "full":
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    elif remat == "minimal":
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.save_only_these_names(*SAVED),
                            prevent_cse=False)
    return jax.lax.scan(body, x_btd, (state, kv_l, keys_l, window_l))

  def logits(self, h_xd):
    """f32 logits `[..., v]` of final-norm hidden states: the tied embedding or `lm_head`, then
    `cap * tanh(z / cap)` when the config soft-caps them (`final_softcap`)."""
    if self.lm_head is None:
      z = self.embed.attend(h_xd)
    else:
      h_xd = h_xd.astype(self.cfg.compute_dtype)
      z = jnp.einsum("...d,dv->...v", h_xd, self.lm_head.kernel[...].astype(h_xd.dtype),
                     preferred_element_type=jnp.float32)
    cap = self.cfg.final_softcap
    return cap * jnp.tanh(z / cap) if cap else z

  def unstacked(self, adapter_layer_axis: int = 0) -> "Llama":
    """The same model with `layers` as a list of per-layer blocks (a Python loop instead of a scan).

    Scanning over stacked layers makes XLA:CPU copy each layer's weights out of the stack before its
    matmuls; small-batch decoding only streams the weights, so that copy costs as much as the matmuls.
    Unstacked (sliced once, e.g. before a decode loop; one more copy of the layers meanwhile), the
    weights are separate buffers read in place. Compiles each layer separately.
    `adapter_layer_axis`: the layer axis of the `LoRAParam`s (1 for experts stacked per row `[b, l, ...]`:
    each layer's slice keeps its rows first, and no layer-major copy of the experts is made).
    """
    if isinstance(self.layers, nnx.List):
      return self
    gdef, adapters, base = nnx.split(self.layers, TRAINABLE, ...)
    take = lambda tree, i, axis: jax.tree.map(lambda a: jax.lax.index_in_dim(a, i, axis, False), tree)  # noqa: E731
    blocks = [nnx.merge(gdef, take(adapters, i, adapter_layer_axis), take(base, i, 0))
              for i in range(self.cfg.n_layers)]
    new = nnx.merge(*nnx.split(self))
    new.layers = nnx.List(blocks)
    return new


# ---------------------------------------------------------------------------------------------------
# Pure state: graph definitions, shapes, axes, binding.


@functools.lru_cache(maxsize=64)
def abstract_model(cfg: LlamaConfig, targets: tuple[str, ...] = (), scale: float = 1.0,
                   dropout: float = 0.0, rank: int = 1, dtype: str = "float32") -> Llama:
  """`Llama` with `ShapeDtypeStruct`s for arrays (`nnx.eval_shape`: nothing allocated); with an
  adapter of `rank` on `targets` when given."""
  lora = LoraConfig(rank=rank, alpha=scale * rank, dropout=dropout, targets=targets, dtype=dtype) \
      if targets else None
  return nnx.eval_shape(lambda: Llama(cfg, lora, rngs=nnx.Rngs(0), lora_scale=scale))


def model_def(cfg: LlamaConfig, targets: tuple[str, ...] = (), scale: float = 1.0,
              dropout: float = 0.0) -> nnx.GraphDef:
  """The `GraphDef` of `Llama(cfg)` with an adapter on `targets` (shape-free: any rank, any stack)."""
  return nnx.graphdef(abstract_model(cfg, tuple(targets), float(scale), float(dropout)))


def bind(cfg: LlamaConfig, params: Params, expert=None, *, lora_scale: float = 1.0,
         dropout_rate: float = 0.0) -> Llama:
  """The module over pure state: the base `params` and `expert` (None: the base alone) in the store's
  layout (any leading axes: a stack to `vmap_adapters` over)."""
  if expert is None:
    return nnx.merge(model_def(cfg), params)
  targets = tuple(p for p in PROJECTIONS if p in expert)
  return nnx.merge(model_def(cfg, targets, lora_scale, dropout_rate), params, adapter_state(expert))


def vmap_adapters(fn, *, axis: int = 0, in_axes=(), out_axes=0, mapped=TRAINABLE):
  """`nnx.vmap` of `fn(model, *args)` with the `mapped` variables (the adapters; `nnx.Param` when the
  base itself is stacked) on `axis` and every other variable broadcast; `in_axes` of the other args."""
  state_axes = nnx.StateAxes({mapped: axis, ...: None})
  return nnx.vmap(fn, in_axes=(state_axes,) + tuple(in_axes), out_axes=out_axes)


def _abstract_state(cfg: LlamaConfig):
  return nnx.state(abstract_model(cfg), nnx.Param)


def param_shapes(cfg: LlamaConfig) -> Params:
  """Shape of every base parameter (the tree `bind` takes)."""
  return jax.tree.map(lambda v: tuple(v.shape), nnx.to_pure_dict(_abstract_state(cfg)))


def param_axes(cfg: LlamaConfig) -> Params:
  """Logical axis names of every base parameter, from the variables' `out_sharding` metadata."""
  return variable_axes(_abstract_state(cfg))


def variable_axes(state) -> Any:
  """Plain tree of the `out_sharding` tuples of an `nnx.State`'s variables."""
  return nnx.to_pure_dict(state, lambda v: tuple(v.get_metadata()["out_sharding"]))


def adapter_axes(cfg: LlamaConfig, lora: LoraConfig, stacked: bool = True) -> dict:
  """Logical axes of an expert tree (store layout), from the `LoRAParam`s' metadata; `stacked` puts
  "expert" in front (a stack of E experts)."""
  model = abstract_model(cfg, lora.targets, lora.scale, lora.dropout, lora.rank, lora.dtype)
  layers = nnx.state(model, TRAINABLE)["layers"]
  pre = ("expert",) if stacked else ()
  out = {}
  for p in lora.targets:
    group, name = PROJECTION_MODULE[p]
    node = layers[group][name]["lora"]
    out[p] = {k: pre + tuple(node[k].get_metadata()["out_sharding"]) for k in ("a", "b")}
  return out


def init_params(cfg: LlamaConfig, key: jax.Array) -> Params:
  """Random base parameters (normal(0.02) matrices, unit norms), in `cfg.param_dtype`."""
  return nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(params=key)), nnx.Param))


def param_at(params: Params, key: str):
  """The base parameter named `key` (`PARAM_PATHS`), or None when absent (e.g. a tied `lm_head`)."""
  node = params
  for part in PARAM_PATHS[key]:
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def forward(params: Params, expert, tokens_bt: jax.Array, cfg: LlamaConfig, *, lora_scale: float = 1.0,
            positions_bt: jax.Array | None = None, cache: dict | None = None, dropout_rate: float = 0.0,
            dropout_key: jax.Array | None = None, return_hidden: bool = False, remat: bool = False):
  """Logits `[b, t, v]` (f32) of the base, or of the base plus one expert: `bind` then `Llama`.

  `expert`: None or `{proj: {"a": [l, d_in, r], "b": [l, r, d_out]}}` with output scale `lora_scale`;
  `dropout_rate`/`dropout_key`: LoRA dropout; `remat`: keep only each layer's input for the backward
  pass. Returns `(logits_btv, new_cache)`, plus the hidden states `[b, t, d]` with `return_hidden`.
  """
  model = bind(cfg, params, expert, lora_scale=lora_scale, dropout_rate=dropout_rate)
  h_btd, new_cache = model(tokens_bt, positions_bt=positions_bt, cache=cache,
                           dropout_key=dropout_key if dropout_rate > 0 else None,
                           remat="full" if remat else "none")
  logits_btv = model.logits(h_btd)
  return (logits_btv, new_cache, h_btd) if return_hidden else (logits_btv, new_cache)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
  """An empty KV cache: keys/values `[l, b, S, k, h]` and the filled length of each row `[b]`."""
  dt = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "length": jnp.zeros((batch,), jnp.int32)}


def token_logprobs(logits_btv, targets_bt):
  """log p(target) per position, f32."""
  logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]


__all__ = ["FROZEN", "TRAINABLE", "Llama", "LlamaConfig", "PRESETS", "PROJECTIONS", "PARAM_PATHS", "ACTIVATION_AXES", "abstract_model",
           "adapter_axes", "bind", "count_params", "expert_shapes", "forward", "init_cache", "init_params",
           "model_def", "param_at", "param_axes", "param_shapes", "token_logprobs", "variable_axes",
           "vmap_adapters"]

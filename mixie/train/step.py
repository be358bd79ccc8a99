"""The train state and the jitted train step of E slots trained at once on a frozen base.

A batch holds `[E, b, T]` arrays (`tokens`, `targets`, `loss_mask`), slot e's rows from its own topic. The
model (`mixie.model.llama.Llama`) is written for one expert; the step binds the base and the E stacked
experts into it (pure state in, `nnx.merge` inside the jitted step) and `nnx.vmap`s it over the slots
with the `LoRAParam`s on axis 0 and the base broadcast: the base is never copied per expert. Each
slot's loss is the mean over its own tokens, and the loss differentiated is the SUM of the slot means,
so each expert's gradient is exactly the one it would get trained alone ("introvert" experts). Gradients
and optimizer state exist for the trainable tree only.

Modes (`TrainSpec.mode`): "experts" and "lora_all" train LoRA stacks (lora_all is E = 1 on all data);
"full" trains every base parameter (continued pre-training), the base itself being the trained state
(with a leading E = 1 axis), so nothing is frozen.

State: `{"params": [E, ...] trainable tree, "opt": per-expert optimizer state, "topic": [E] int32}`; it is
created already sharded (`abstract_state` -> `state_shardings` -> `jit(init, out_shardings=...)`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mixie import sharding as shd
from mixie.errors import ConfigError
from mixie.model.llama import (ACTIVATION_AXES, TRAINABLE, Llama, LlamaConfig, adapter_axes, bind, param_axes,
                               vmap_adapters)
from mixie.model.lora import LoraConfig, init_expert
from mixie.train import optim

MODES = ("experts", "lora_all", "full")
BATCH_KEYS = ("tokens", "targets", "loss_mask")
BATCH_AXES = ACTIVATION_AXES["tokens"]
REMAT = ("none", "minimal", "full")  # the layers' remat policies, least recomputation first


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """What is trained and how: the base architecture, the experts, the optimizer, the mode."""

  cfg: LlamaConfig
  lora: LoraConfig
  opt: optim.OptConfig
  slots: int
  mode: str = "experts"
  remat: str = "minimal"  # what the layers keep for the backward (`REMAT`; `Llama.__call__` explains)
  seed: int = 0
  ce_chunk: int = 1024  # tokens per chunk of the LM head + loss (`chunked_nll`)

  def __post_init__(self):
    if self.remat not in REMAT:
      raise ConfigError(f"TrainSpec.remat={self.remat!r} is not one of {REMAT}")

  @property
  def lora_mode(self) -> bool:
    """True when experts are LoRA parameters (not full fine-tuning of the base)."""
    return self.mode != "full"


def _root_key(spec: TrainSpec):
  return jax.random.PRNGKey(spec.seed)


def expert_key(spec: TrainSpec, topic):
  """Initialisation key of the expert of `topic`: depends on the seed and the topic only."""
  return jax.random.fold_in(jax.random.fold_in(_root_key(spec), 0), topic)


def dropout_key(spec: TrainSpec, topic, step):
  """LoRA-dropout key of an expert at its own step: depends on seed, topic and step only."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(_root_key(spec), 1), topic), step)


# ---------------------------------------------------------------------------------------------------
# State: init, axes, shardings.


def fresh_params(spec: TrainSpec, base, topics_e):
  """Initial trainable parameters of slots holding `topics_e` ([E] ints)."""
  if spec.lora_mode:
    return jax.vmap(lambda t: init_expert(spec.cfg, spec.lora, expert_key(spec, t)))(topics_e)
  # full: the base itself, in f32 master weights, with a leading E axis
  return jax.tree.map(lambda p: jnp.broadcast_to(p.astype(jnp.float32), (topics_e.shape[0],) + p.shape),
                      base)


def init_state(spec: TrainSpec, base, topics_e, horizon_e) -> dict[str, Any]:
  """A fresh train state for slots holding `topics_e` with schedule horizons `horizon_e` (steps)."""
  topics_e = jnp.asarray(topics_e, jnp.int32)
  params = fresh_params(spec, base, topics_e)
  return {"params": params, "opt": optim.init_state(spec.opt, params, horizon_e), "topic": topics_e}


def trainable_axes(spec: TrainSpec):
  """Logical axes of the trainable stack."""
  if spec.lora_mode:
    return adapter_axes(spec.cfg, spec.lora, stacked=True)
  return jax.tree.map(lambda a: ("expert",) + a, param_axes(spec.cfg), is_leaf=is_axes)


def is_axes(x):
  """A leaf of a logical-axes tree: a plain tuple of names (optax states are NamedTuples, tree nodes)."""
  return type(x) is tuple and all(isinstance(a, (str, type(None))) for a in x)


def axes_to_shardings(axes_tree, mesh: Mesh, rules):
  """`NamedSharding`s for a tree whose leaves are plain tuples of logical axis names."""
  return jax.tree.map(lambda names: NamedSharding(mesh, shd.logical_to_spec(names, rules, mesh)),
                      axes_tree, is_leaf=is_axes)


def state_axes(spec: TrainSpec, abstract) -> dict[str, Any]:
  """Logical axes of every leaf of a train state (optimizer moments mirror their parameters)."""
  p_axes = trainable_axes(spec)
  p_struct = jax.tree.structure(abstract["params"])
  is_p = lambda x: jax.tree.structure(x) == p_struct and not isinstance(x, jax.ShapeDtypeStruct)
  opt_axes = jax.tree.map(
      lambda x: p_axes if is_p(x) else ("expert",) + (None,) * (x.ndim - 1),
      abstract["opt"], is_leaf=is_p)
  return {"params": p_axes, "opt": opt_axes, "topic": ACTIVATION_AXES["slot"]}


def abstract_state(spec: TrainSpec, base_abstract) -> dict[str, Any]:
  """Shapes and dtypes of the train state (no memory used)."""
  z = jax.ShapeDtypeStruct((spec.slots,), jnp.int32)
  return jax.eval_shape(lambda b, t, h: init_state(spec, b, t, h), base_abstract, z, z)


def state_shardings(spec: TrainSpec, mesh: Mesh, rules, base_abstract) -> dict[str, Any]:
  """`NamedSharding` of every leaf of the train state."""
  return axes_to_shardings(state_axes(spec, abstract_state(spec, base_abstract)), mesh, rules)


def base_shardings(spec: TrainSpec, mesh: Mesh, rules):
  """`NamedSharding`s of the frozen base (replicated, or on `model` as the rules say)."""
  return shd.tree_shardings(param_axes(spec.cfg), mesh, rules)


def batch_shardings(mesh: Mesh, rules) -> dict[str, NamedSharding]:
  """Shardings of a `[E, b, T]` batch: slots on the expert axis, rows on the data axis."""
  s = NamedSharding(mesh, shd.logical_to_spec(BATCH_AXES, rules, mesh))
  return {k: s for k in BATCH_KEYS}


def create_state(spec: TrainSpec, mesh: Mesh, rules, base, topics_e, horizon_e,
                 comp: "Compiled | None" = None):
  """The initial train state, created directly in its shardings (never whole on one device first)."""
  comp = comp or compile_fns(spec, mesh, rules, jax.eval_shape(lambda: base))
  return comp.init(base, np.asarray(topics_e, np.int32), np.asarray(horizon_e, np.int32))


# ---------------------------------------------------------------------------------------------------
# The step.


def chunked_nll(logits_fn, h_btd, targets_bt, mask_bt, chunk: int):
  """Summed masked NLL of the targets from final hidden states, `chunk` tokens at a time.

  `logits_fn`: hidden states `[c, d]` -> f32 logits `[c, v]` (`Llama.logits`). Each chunk's logits are
  made, reduced to `logsumexp - logit[target]` and dropped; the backward pass recomputes them chunk by
  chunk (`jax.checkpoint`), so the `[b, T, v]` logits of a step never exist at once (4 GiB for
  16 x 2048 tokens of a 32k vocabulary). When all tokens fit in one chunk, its logits are kept for the
  backward pass instead (they exist whole in the forward pass anyway): no recomputation.
  """
  b, t, d = h_btd.shape
  n = b * t
  c = max(1, min(chunk, n))
  pad = (-n) % c
  h = jnp.pad(h_btd.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, c, d)
  tg = jnp.pad(targets_bt.reshape(n), (0, pad)).reshape(-1, c)
  m = jnp.pad(mask_bt.reshape(n).astype(jnp.float32), (0, pad)).reshape(-1, c)

  def one(total, xs):
    h_cd, t_c, m_c = xs
    logits_cv = logits_fn(h_cd)
    nll_c = jax.nn.logsumexp(logits_cv, axis=-1) - jnp.take_along_axis(logits_cv, t_c[:, None], -1)[:, 0]
    return total + (nll_c * m_c).sum(), None

  if h.shape[0] == 1:
    return one(jnp.zeros((), jnp.float32), (h[0], tg[0], m[0]))[0]
  total, _ = jax.lax.scan(jax.checkpoint(one), jnp.zeros((), jnp.float32), (h, tg, m))
  return total


def bind_trainable(spec: TrainSpec, trainable, base) -> Llama:
  """The model over a slot's (or a stack's) trainable tree: base + expert, or the trained base itself."""
  if spec.lora_mode:
    return bind(spec.cfg, base, trainable, lora_scale=spec.lora.scale, dropout_rate=spec.lora.dropout)
  return bind(spec.cfg, trainable)


def model_loss(spec: TrainSpec, model: Llama, tokens_bt, targets_bt, mask_bt, key):
  """Token-mean loss of ONE slot's model over its own tokens, and its token count.

  The layers keep what `spec.remat` says for the backward pass (by default only
  `mixie.model.layers.SAVED`; "full": only their inputs); the logits `model` could make are never formed whole: the loss unembeds in chunks.
  """
  rate = spec.lora.dropout if spec.lora_mode else 0.0
  h_btd, _ = model(tokens_bt, dropout_key=key if rate > 0 else None,
                   remat=spec.remat)
  mask_bt = mask_bt.astype(jnp.float32)
  n = mask_bt.sum()
  nll = chunked_nll(model.logits, h_btd, targets_bt, mask_bt, spec.ce_chunk)
  return jnp.where(n > 0, nll / jnp.maximum(n, 1.0), 0.0), n


def slot_loss(spec: TrainSpec, trainable, base, tokens_bt, targets_bt, mask_bt, key):
  """`model_loss` of one slot given as pure state (its trainable tree and the frozen base)."""
  return model_loss(spec, bind_trainable(spec, trainable, base), tokens_bt, targets_bt, mask_bt, key)


def train_step(spec: TrainSpec, state, base, batch):
  """One step for all slots: per-slot losses, their sum differentiated, a masked per-expert update.

  The slots are `model_loss` `nnx.vmap`ped over the trainable variables' leading axis (`LoRAParam`s,
  or every `Param` in "full" mode), the rest broadcast. Returns `(new_state, metrics)`, metrics
  `{"loss", "tokens", "grad_norm", "lr"}` each `[E]`; `loss` and `grad_norm` of slots without tokens
  are 0 and those slots do not move.
  """
  keys_e = jax.vmap(lambda t, s: dropout_key(spec, t, s))(state["topic"], state["opt"]["step"])
  frozen = base if spec.lora_mode else None
  per_slot = vmap_adapters(functools.partial(model_loss, spec), axis=0, in_axes=(0, 0, 0, 0),
                           mapped=TRAINABLE if spec.lora_mode else nnx.Param)

  def total(trainable_e):
    loss_e, n_e = per_slot(bind_trainable(spec, trainable_e, frozen), batch["tokens"], batch["targets"],
                           batch["loss_mask"], keys_e)
    return loss_e.sum(), (loss_e, n_e)

  grads_e, (loss_e, n_e) = jax.grad(total, has_aux=True)(state["params"])
  mask_e = n_e > 0
  params, opt_state, m = optim.masked_update(spec.opt, state["params"], grads_e, state["opt"], mask_e)
  metrics = {"loss": loss_e, "tokens": n_e.astype(jnp.int32),
             "grad_norm": jnp.where(mask_e, m["grad_norm"], 0.0),
             "lr": m["lr"]}
  return {"params": params, "opt": opt_state, "topic": state["topic"]}, metrics


def reset_slots(spec: TrainSpec, state, base, mask_e, topics_e, horizon_e):
  """Slots in `mask_e` start the experts of `topics_e`: fresh parameters and optimizer state."""
  topics_e = jnp.where(mask_e, topics_e, state["topic"])
  fresh = fresh_params(spec, base, topics_e)
  params, opt_state = optim.reset_slots(spec.opt, state["params"], state["opt"], fresh, mask_e, horizon_e)
  return {"params": params, "opt": opt_state, "topic": topics_e}


@dataclasses.dataclass
class Compiled:
  """The jitted functions of one training setup, with their shardings."""

  step: Callable  # (state, base, batch) -> (state, metrics); state donated
  reset: Callable  # (state, base, mask_e, topics_e, horizon_e) -> state; state donated
  init: Callable  # (base, topics_e, horizon_e) -> state, created in its shardings
  state_shardings: Any
  base_shardings: Any
  batch_shardings: Any


_COMPILED: dict = {}


def compile_fns(spec: TrainSpec, mesh: Mesh, rules, base_abstract) -> Compiled:
  """The train step, the slot reset and the state init, jitted with explicit shardings (state donated).

  Memoised on (spec, mesh, rules, base shapes): a second trainer of the same setup in one process
  (a baseline, a resumed run, a test) reuses the compiled functions.
  """
  rules = tuple(tuple(r) for r in rules)
  leaves, treedef = jax.tree.flatten(base_abstract)
  key = (spec, mesh, rules, treedef, tuple((l.shape, str(l.dtype)) for l in leaves))
  if key not in _COMPILED:
    _COMPILED[key] = _compile_fns(spec, mesh, rules, base_abstract)
  return _COMPILED[key]


def _compile_fns(spec: TrainSpec, mesh: Mesh, rules, base_abstract) -> Compiled:
  st = state_shardings(spec, mesh, rules, base_abstract)
  full_bs = base_shardings(spec, mesh, rules)
  bs = full_bs if spec.lora_mode else None  # "full" trains the base: no frozen argument
  bt = batch_shardings(mesh, rules)
  e_sh = NamedSharding(mesh, shd.logical_to_spec(ACTIVATION_AXES["slot"], rules, mesh))
  metrics_sh = {k: e_sh for k in ("loss", "tokens", "grad_norm", "lr")}
  step = jax.jit(lambda s, b, x: train_step(spec, s, b, x), in_shardings=(st, bs, bt),
                 out_shardings=(st, metrics_sh), donate_argnums=(0,))
  reset = jax.jit(lambda s, b, m, t, h: reset_slots(spec, s, b, m, t, h),
                  in_shardings=(st, full_bs, e_sh, e_sh, e_sh), out_shardings=st, donate_argnums=(0,))
  rep = shd.replicated(mesh)
  init = jax.jit(lambda b, t, h: init_state(spec, b, t, h), in_shardings=(full_bs, rep, rep),
                 out_shardings=st)
  return Compiled(step=step, reset=reset, init=init, state_shardings=st, base_shardings=full_bs,
                  batch_shardings=bt)

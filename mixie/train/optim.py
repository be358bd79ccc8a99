"""The per-expert optimizer: everything an optimizer does globally is done for each expert alone.

One expert's optimizer is an optax chain (global-norm clipping over that expert's own tree, Adam moments,
decoupled weight decay), followed by a learning rate from that expert's own step count and horizon
(linear warm-up, then cosine down to `lr * min_lr_ratio`). A stack of E experts vmaps it, so every leaf of
the state has a leading E axis. `masked_update` applies a step only where a slot had data: a slot with no
tokens keeps its parameters and its whole optimizer state bit for bit (no Adam drift, no decay).
`reset_slots` gives slots that take a new topic a fresh state (step 0: the warm-up starts again).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mixie.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OptConfig:
  """AdamW with per-expert warm-up + cosine schedule and per-expert clipping."""

  lr: float = 1e-3
  warmup_steps: int = 5
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0  # per-expert global-norm clip; 0 = off
  schedule: str = "cosine"  # "cosine" (warm-up + cosine) or "constant" (warm-up + constant)

  def __post_init__(self):
    if not (self.lr > 0 and math.isfinite(self.lr)):
      raise ConfigError(f"train.lr must be a positive number, got {self.lr!r}")
    if self.warmup_steps < 0:
      raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps!r}")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
    if self.weight_decay < 0:
      raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay!r}")
    for name in ("b1", "b2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)!r}")
    if self.grad_clip < 0:
      raise ConfigError(f"train.grad_clip must be >= 0 (0 = off), got {self.grad_clip!r}")
    if self.schedule not in ("cosine", "constant"):
      raise ConfigError(f"train.schedule must be 'cosine' or 'constant', got {self.schedule!r}")

  @classmethod
  def from_config(cls, t) -> "OptConfig":
    """From the `train` config section."""
    kw = {f.name: t[f.name] for f in dataclasses.fields(cls) if f.name in t}
    return cls(**kw)


def learning_rate(opt: OptConfig, step, horizon):
  """LR of an expert at its own `step` (0-based) of `horizon` steps: linear warm-up, then cosine.

  Works on arrays (per-expert `step` and `horizon`, any matching shapes).
  """
  step = jnp.asarray(step, jnp.float32)
  horizon = jnp.maximum(jnp.asarray(horizon, jnp.float32), 1.0)
  w = float(opt.warmup_steps)
  warm = opt.lr * jnp.minimum(1.0, (step + 1.0) / max(w, 1.0))
  if opt.schedule == "constant":
    return warm
  frac = jnp.clip((step - w) / jnp.maximum(horizon - w, 1.0), 0.0, 1.0)
  cos = opt.lr * (opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
  return jnp.where(step < w, warm, cos)


def expert_transform(opt: OptConfig) -> optax.GradientTransformation:
  """The optax chain of ONE expert (before the learning rate): clip, Adam, decoupled decay."""
  parts = []
  if opt.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip))
  parts.append(optax.scale_by_adam(opt.b1, opt.b2, opt.eps))
  if opt.weight_decay > 0:
    parts.append(optax.add_decayed_weights(opt.weight_decay))
  return optax.chain(*parts)


def init_state(opt: OptConfig, params_e, horizon_e) -> dict[str, Any]:
  """Optimizer state of a stack of experts (every leaf with a leading E axis)."""
  tx = expert_transform(opt)
  n = jax.tree.leaves(params_e)[0].shape[0]
  return {"tx": jax.vmap(tx.init)(params_e), "step": jnp.zeros((n,), jnp.int32),
          "horizon": jnp.asarray(horizon_e, jnp.int32).reshape(n)}


def _where_e(mask_e, new, old):
  """`where(mask_e)` over every leaf of two trees with a leading E axis."""
  def sel(n, o):
    m = mask_e.reshape(mask_e.shape + (1,) * (n.ndim - 1))
    return jnp.where(m, n, o)
  return jax.tree.map(sel, new, old)


def masked_update(opt: OptConfig, params_e, grads_e, state, mask_e):
  """One AdamW step for each expert whose `mask_e` is set; the others are returned unchanged.

  Returns `(new_params_e, new_state, metrics)` with per-expert `grad_norm` and `lr` `[E]`.
  """
  tx = expert_transform(opt)

  def one(params, grads, tx_state, step, horizon):
    gnorm = optax.tree.norm(grads)
    updates, tx_state = tx.update(grads, tx_state, params)
    lr = learning_rate(opt, step, horizon)
    params = jax.tree.map(lambda p, u: (p - lr * u.astype(jnp.float32)).astype(p.dtype), params, updates)
    return params, tx_state, gnorm, lr

  new_params, new_tx, gnorm_e, lr_e = jax.vmap(one)(params_e, grads_e, state["tx"], state["step"],
                                                     state["horizon"])
  new_state = {"tx": new_tx, "step": state["step"] + 1, "horizon": state["horizon"]}
  new_params = _where_e(mask_e, new_params, params_e)
  new_state = _where_e(mask_e, new_state, state)
  return new_params, new_state, {"grad_norm": gnorm_e, "lr": lr_e}


def reset_slots(opt: OptConfig, params_e, state, fresh_params_e, mask_e, horizon_e):
  """Slots in `mask_e` get `fresh_params_e`, zero Adam moments, step 0 and a new horizon."""
  fresh = init_state(opt, fresh_params_e, horizon_e)
  return _where_e(mask_e, fresh_params_e, params_e), _where_e(mask_e, fresh, state)

"""LoRA experts: one expert is a small pytree; a stack of E experts is the same tree with a leading E axis.

An expert targets any subset of the seven projections. For projection p with base weight `[l, d_in, d_out]`
it holds `a: [l, d_in, r]` (random, as PEFT's kaiming-uniform) and `b: [l, r, d_out]` (zero), and adds
`(x @ a) @ b * alpha / r` to the projection's output (`mixie.model.llama.project`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mixie.errors import ConfigError
from mixie.model.llama import PROJECTIONS, LlamaConfig, forward, param_shapes

Expert = dict[str, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Rank, scaling, dropout and target projections of every expert."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = PROJECTIONS
  dtype: str = "float32"  # storage dtype of expert parameters (their optimizer state is f32 anyway)

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ConfigError(f"lora.rank must be a positive integer, got {self.rank!r}")
    unknown = [t for t in self.targets if t not in PROJECTIONS]
    if unknown or not self.targets:
      raise ConfigError(f"lora.targets: unknown target module(s) {unknown or '(none given)'}; "
                        f"choose from {list(PROJECTIONS)}")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")

  @property
  def scale(self) -> float:
    """The LoRA output scale `alpha / rank`."""
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, c) -> "LoraConfig":
    """From a config section with fields rank, alpha, dropout, targets (and optionally dtype)."""
    kw = {f.name: c[f.name] for f in dataclasses.fields(cls) if f.name in c}
    return cls(**kw)


def expert_shapes(cfg: LlamaConfig, lora: LoraConfig) -> Expert:
  """Shapes of one expert: `{proj: {"a": (l, d_in, r), "b": (l, r, d_out)}}`."""
  base = param_shapes(cfg)["layers"]
  out = {}
  for p in lora.targets:
    l, d_in, d_out = base[p]
    out[p] = {"a": (l, d_in, lora.rank), "b": (l, lora.rank, d_out)}
  return out


# Logical axes of one expert's parameters; a stack adds "expert" in front.
EXPERT_AXES = {"a": ("layers", "lora_in", "lora_rank"), "b": ("layers", "lora_rank", "lora_out")}


def expert_axes(lora: LoraConfig, stacked: bool = True) -> dict[str, Any]:
  """Logical axis names of an expert (or of a stack of experts) tree."""
  pre = ("expert",) if stacked else ()
  return {p: {k: pre + v for k, v in EXPERT_AXES.items()} for p in lora.targets}


def init_expert(cfg: LlamaConfig, lora: LoraConfig, key: jax.Array) -> Expert:
  """One fresh expert: `a` kaiming-uniform (bound 1/sqrt(d_in), as PEFT), `b` zero."""
  shapes = expert_shapes(cfg, lora)
  keys = dict(zip(lora.targets, jax.random.split(key, len(lora.targets))))
  dt = jnp.dtype(lora.dtype)
  out = {}
  for p, s in shapes.items():
    d_in = s["a"][1]
    bound = 1.0 / jnp.sqrt(d_in)
    out[p] = {"a": jax.random.uniform(keys[p], s["a"], jnp.float32, -bound, bound).astype(dt),
              "b": jnp.zeros(s["b"], dt)}
  return out


def init_experts(cfg: LlamaConfig, lora: LoraConfig, key: jax.Array, n: int) -> Expert:
  """A stack of `n` fresh experts, leading axis E."""
  return jax.vmap(lambda k: init_expert(cfg, lora, k))(jax.random.split(key, n))


def forward_stacked(params, experts_e: Expert, tokens_ebt: jax.Array, cfg: LlamaConfig,
                    lora: LoraConfig, **kw):
  """`forward` vmapped over a stack of experts and their batches; the base is broadcast.

  Keyword arrays in `kw` named `*_e*` (e.g. `dropout_key`) are not mapped; pass per-expert values by
  vmapping yourself. Returns logits `[e, b, t, v]`.
  """
  fn = lambda e, t: forward(params, e, t, cfg, lora_scale=lora.scale, **kw)[0]
  return jax.vmap(fn)(experts_e, tokens_ebt)

"""LoRA experts: the config, and one expert as a plain tree in the expert store's layout.

An expert targets any subset of the seven projections. For projection p with per-layer weight
`[d_in, d_out]` it holds `a: [l, d_in, r]` (random, as PEFT's kaiming-uniform) and `b: [l, r, d_out]`
(zero) and adds `(x @ a) @ b * alpha / r` to the projection's output (`mixie.model.layers.LoRA`).

That tree, `{proj: {"a", "b"}}`, is what the expert store, PEFT export, the expert cache and the
train state hold; a stack of E experts is the same tree with a leading E axis. Inside the model the
same arrays are the `nnx.LoRAParam` variables of the `LoRA` modules: `adapter_state` and
`expert_of` convert between the two layouts (paths only, no copies).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mixie.errors import ConfigError
from mixie.model.config import PROJECTIONS, LlamaConfig, projection_dims
from mixie.model.layers import kaiming_a

Expert = dict[str, dict[str, jax.Array]]

# Where each projection's module sits inside a decoder layer (`mixie.model.layers.Block`).
PROJECTION_MODULE = {"q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "o"),
                     "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}


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


def expert_shapes(cfg: LlamaConfig, lora: LoraConfig) -> dict[str, dict[str, tuple[int, ...]]]:
  """Shapes of one expert: `{proj: {"a": (l, d_in, r), "b": (l, r, d_out)}}`."""
  dims = projection_dims(cfg)
  return {p: {"a": (cfg.n_layers, dims[p][0], lora.rank), "b": (cfg.n_layers, lora.rank, dims[p][1])}
          for p in lora.targets}


def init_expert(cfg: LlamaConfig, lora: LoraConfig, key: jax.Array) -> Expert:
  """One fresh expert: `a` kaiming-uniform (bound 1/sqrt(d_in), as PEFT), `b` zero.

  The values depend on the key only (per-topic keys make an expert's start reproducible).
  """
  shapes = expert_shapes(cfg, lora)
  keys = dict(zip(lora.targets, jax.random.split(key, len(lora.targets))))
  dt = jnp.dtype(lora.dtype)
  return {p: {"a": kaiming_a(keys[p], s["a"], s["a"][1], dt), "b": jnp.zeros(s["b"], dt)}
          for p, s in shapes.items()}


def init_experts(cfg: LlamaConfig, lora: LoraConfig, key: jax.Array, n: int) -> Expert:
  """A stack of `n` fresh experts, leading axis E."""
  return jax.vmap(lambda k: init_expert(cfg, lora, k))(jax.random.split(key, n))


def adapter_state(expert: Expert) -> dict[str, Any]:
  """An expert tree as the model's `LoRAParam` state: `{"layers": {"attn": {"q": {"lora": {a, b}}}}}`."""
  out: dict[str, Any] = {}
  for p, ab in expert.items():
    node = out.setdefault("layers", {})
    for part in PROJECTION_MODULE[p]:
      node = node.setdefault(part, {})
    node["lora"] = {"a": ab["a"], "b": ab["b"]}
  return out


def expert_of(state: Any) -> Expert:
  """The inverse of `adapter_state`: the expert tree of a model's `LoRAParam` state (a nested mapping,
  e.g. `nnx.state(model, nnx.LoRAParam)`; variables are unwrapped to their values)."""
  out = {}
  layers = state["layers"]
  for p, (group, name) in PROJECTION_MODULE.items():
    if group in layers and name in layers[group] and "lora" in layers[group][name]:
      node = layers[group][name]["lora"]
      out[p] = {k: node[k][...] if hasattr(node[k], "get_value") else node[k] for k in ("a", "b")}
  return out

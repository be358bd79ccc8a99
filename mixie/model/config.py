"""The architecture of a base decoder: `LlamaConfig` (the fields every family shares) and the presets.

A config names its family (`mixie.model.families`: tensor names and the switches in which families
differ). Shapes use dimension letters: d model width, n query heads, k kv heads, h head dim, f MLP
width, v vocab, l layers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# The seven projections of a decoder layer an expert may target (in this order everywhere).
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# The window of a global layer in a stack of local and global layers (longer than any sequence).
GLOBAL = 2 ** 30


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture and numerics of a decoder of one of the families in `mixie.model.families`."""

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
  family: str = "llama"  # a row of mixie.model.families.FAMILIES
  # Switch values of the families that have them (the defaults are plain Llama attention):
  sliding_window: int = 0  # a local layer's query at position p sees keys in (p - w, p]; 0: no window
  local_layers: tuple[bool, ...] = ()  # which layers are local (use `sliding_window`); (): all of them
  query_scale: float = 0.0  # attention scores scaled by query_scale ** -0.5 (Gemma 2); 0: head_dim
  attn_softcap: float = 0.0  # attention scores s -> c * tanh(s / c) (Gemma 2); 0: none
  final_softcap: float = 0.0  # final logits z -> c * tanh(z / c) (Gemma 2); 0: none

  def __post_init__(self):
    if self.head_dim == 0:
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.local_layers and len(self.local_layers) != self.n_layers:
      raise ValueError(f"local_layers has {len(self.local_layers)} entries for n_layers={self.n_layers}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

  def layer_windows(self) -> tuple[int, ...] | None:
    """Each layer's attention window (`GLOBAL` for a global layer of a mixed stack), or None when no
    layer has one."""
    if not self.sliding_window:
      return None
    local = self.local_layers or (True,) * self.n_layers
    return tuple(self.sliding_window if is_local else GLOBAL for is_local in local)

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


def projection_dims(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
  """`(d_in, d_out)` of each of the seven projections of one layer."""
  D, F, NH, KH = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  return {"q": (D, NH), "k": (D, KH), "v": (D, KH), "o": (NH, D), "gate": (D, F), "up": (D, F),
          "down": (F, D)}


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays or `ShapeDtypeStruct`s."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))

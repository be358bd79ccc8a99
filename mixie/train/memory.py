"""Memory of a training run computed from shapes and shardings alone (`jax.eval_shape`, no allocation).

`expert_param_count` counts the parameters of n stacked experts; `wave_memory` gives the bytes per device
of one training wave (E slots trained at once) on a mesh that need not exist here: base, expert
parameters, Adam moments and gradients from the real state's shapes and the config's sharding rules,
plus an estimate of the activations of one step.

    python -m mixie.train.memory     # TinyLlama-1.1B, 5000 rank-16 experts, a v5e-256 wave
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from configs import tinyllama_moin5k
from mixie import sharding as shd
from mixie.errors import ConfigError
from mixie.model.llama import PRESETS, LlamaConfig, count_params, init_params, param_axes
from mixie.model.lora import LoraConfig, init_experts
from mixie.train import optim
from mixie.train.step import TrainSpec, abstract_state, is_axes, state_axes

GIB = 2.0 ** 30


def expert_param_count(cfg: LlamaConfig, lora: LoraConfig, n: int) -> int:
  """Parameters of `n` stacked experts (via `jax.eval_shape`: nothing is allocated)."""
  shapes = jax.eval_shape(lambda k: init_experts(cfg, lora, k, n), jax.random.PRNGKey(0))
  return count_params(shapes)


def _device_bytes(abstract, axes, mesh, rules) -> int:
  """Bytes per device of a tree of ShapeDtypeStructs sharded by logical `axes` under `rules`."""
  total = 0
  flat_axes = jax.tree.leaves(axes, is_leaf=is_axes)
  for a, names in zip(jax.tree.leaves(abstract), flat_axes):
    spec = shd.logical_to_spec(names, rules, mesh)
    parts = tuple(spec) + (None,) * a.ndim
    shard = [math.ceil(d / (mesh.shape[p] if p else 1)) for d, p in zip(a.shape, parts)]
    total += math.prod(shard) * jnp.dtype(a.dtype).itemsize
  return total


def wave_memory(cfg: LlamaConfig, lora: LoraConfig, *, slots: int, batch_per_slot: int, seq_len: int,
                mesh_shape: dict[str, int], rules, remat: str = "full") -> dict[str, Any]:
  """Bytes per device of one training wave of `slots` experts on a mesh of `mesh_shape` (axis -> size).

  State terms come from the real train state's shapes and shardings. Activations are an estimate of
  what each layer keeps for the backward pass under `remat` (`TrainSpec.remat`, see `layer_saved_bytes`),
  plus one layer's intermediates being recomputed/differentiated and the f32 logits with their gradient.
  """
  mesh = AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape.keys()))
  spec = TrainSpec(cfg=cfg, lora=lora, opt=optim.OptConfig(), slots=slots, remat=remat)
  base_abs = jax.eval_shape(lambda k: _init_base(cfg, k), jax.random.PRNGKey(0))
  st = abstract_state(spec, base_abs)
  axes = state_axes(spec, st)
  out = {
      "base": _device_bytes(base_abs, param_axes(cfg), mesh, rules),
      "expert_params": _device_bytes(st["params"], axes["params"], mesh, rules),
      "adam_moments": _device_bytes(st["opt"], axes["opt"], mesh, rules),
      "gradients": _device_bytes(st["params"], axes["params"], mesh, rules),
  }
  e_dev = slots / mesh_shape.get("expert", 1)
  rows = e_dev * batch_per_slot / mesh_shape.get("data", 1)
  tok = rows * seq_len
  layer = layer_saved_bytes(cfg, "none", tok)
  logits = 2 * tok * cfg.vocab_size * 4
  out["activations_estimate"] = int(cfg.n_layers * layer_saved_bytes(cfg, remat, tok) + 2 * layer + logits)
  out["total"] = int(sum(out.values()))
  out["slots_per_device"] = e_dev
  out["rows_per_device"] = rows
  return out


def layer_saved_bytes(cfg: LlamaConfig, remat: str, tokens: float) -> float:
  """Bytes one layer keeps for the backward pass over `tokens` tokens, by `TrainSpec.remat`:
  "full" its input; "minimal" its input plus the outputs named in `mixie.model.layers.SAVED` (q, k, v,
  attention output, o, gate, up); "none" every intermediate (two norm outputs, q, k, v, attention
  output, o, gate, up and their gated product)."""
  D, F = cfg.d_model, cfg.d_ff
  NH, KH = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  width = {"full": D, "minimal": D + 2 * NH + 2 * KH + D + 2 * F,
           "none": 2 * D + 2 * NH + 2 * KH + D + 3 * F}
  if remat not in width:
    raise ConfigError(f"remat={remat!r} is not one of {sorted(width)}")
  return tokens * width[remat] * jnp.dtype(cfg.dtype).itemsize


def _init_base(cfg: LlamaConfig, key):
  return init_params(cfg, key)


def moin5k_report(n_experts: int = 5000, devices: int = 256) -> dict[str, Any]:
  """TinyLlama-1.1B (bf16 base and compute), rank-16 experts on all seven projections, MoIN-5k config:
  the experts' parameter count and the per-device memory of one wave on `devices` chips."""
  c = tinyllama_moin5k.get_config()
  cfg = PRESETS["tinyllama_1b"].replace(dtype=c.model.dtype, param_dtype=c.model.param_dtype)
  lora = LoraConfig.from_config(c.lora)
  shape = dict(zip(tuple(c.mesh.axes), tuple(c.mesh.shape)))
  known = math.prod(v for v in shape.values() if v != -1)
  shape = {k: (devices // known if v == -1 else v) for k, v in shape.items()}
  mem = wave_memory(cfg, lora, slots=c.train.slots, batch_per_slot=c.train.batch_per_slot,
                    seq_len=c.dataset.seq_len, mesh_shape=shape, rules=tuple(tuple(r) for r in c.mesh.rules),
                    remat="full" if c.model.remat else "minimal")  # as `mixie.train.main` maps it
  n = expert_param_count(cfg, lora, n_experts)
  return {"experts": n_experts, "rank": lora.rank, "targets": list(lora.targets),
          "expert_params": n, "expert_params_billions": round(n / 1e9, 2),
          "expert_params_f32_gib": round(4 * n / GIB, 1), "mesh": shape, "slots_per_wave": c.train.slots,
          "waves": math.ceil(n_experts / c.train.slots),
          "per_device_bytes": mem, "per_device_gib": {k: round(v / GIB, 3) for k, v in mem.items()
                                                     if k not in ("slots_per_device", "rows_per_device")}}


if __name__ == "__main__":
  print(json.dumps(moin5k_report(), indent=2))

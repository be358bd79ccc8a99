"""Memory from shapes and shardings: 5000 rank-16 TinyLlama experts, and one wave on a v5e-256."""

import jax
import pytest

from mixie.errors import ConfigError
from mixie.model.config import projection_dims
from mixie.model.llama import PRESETS, count_params, param_shapes
from mixie.model.lora import LoraConfig
from mixie.train.memory import expert_param_count, layer_saved_bytes, moin5k_report, wave_memory

V5E_HBM = 16 * 2**30


def test_tinyllama_5000_experts_parameter_count():
  cfg = PRESETS["tinyllama_1b"]
  lora = LoraConfig(rank=16, alpha=32.0)
  n = expert_param_count(cfg, lora, 5000)
  # by hand: per layer and projection r * (d_in + d_out)
  per_layer = sum(16 * (d_in + d_out) for p, (d_in, d_out) in projection_dims(cfg).items()
                  if p in lora.targets)
  assert n == 5000 * cfg.n_layers * per_layer
  assert round(n / 1e9, 1) == 63.1


def test_v5e_256_wave_memory_is_plausible():
  r = moin5k_report()
  mem = r["per_device_bytes"]
  cfg = PRESETS["tinyllama_1b"]
  per_expert = r["expert_params"] // 5000
  assert r["mesh"] == {"expert": 256, "data": 1, "model": 1} and mem["slots_per_device"] == 1
  assert mem["expert_params"] == 4 * per_expert  # one f32 expert per chip
  assert 2 * 4 * per_expert <= mem["adam_moments"] <= 2 * 4 * per_expert + 64  # mu, nu (+ counters)
  n_base = count_params(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, "float32"), param_shapes(cfg),
                                      is_leaf=lambda x: isinstance(x, tuple)))
  assert abs(mem["base"] - 2 * n_base) < 1e6  # bf16, replicated on every chip
  assert mem["base"] < mem["total"] < V5E_HBM  # fits a v5e chip's 16 GiB
  assert r["waves"] == 20


def test_sharding_rules_change_the_per_device_share():
  cfg = PRESETS["tinyllama_1b"].replace(param_dtype="bfloat16", dtype="bfloat16")
  lora = LoraConfig(rank=16, alpha=32.0)
  rules = (("expert", "expert"), ("batch", "data"), ("heads", "model"), ("kv_heads", "model"),
           ("mlp", "model"))
  one = wave_memory(cfg, lora, slots=256, batch_per_slot=8, seq_len=2048,
                    mesh_shape={"expert": 256, "data": 1, "model": 1}, rules=rules)
  two = wave_memory(cfg, lora, slots=256, batch_per_slot=8, seq_len=2048,
                    mesh_shape={"expert": 128, "data": 2, "model": 1}, rules=rules)
  model = wave_memory(cfg, lora, slots=256, batch_per_slot=8, seq_len=2048,
                      mesh_shape={"expert": 64, "data": 1, "model": 4}, rules=rules)
  assert two["expert_params"] == 2 * one["expert_params"]  # two slots per chip
  assert model["base"] < one["base"] / 2  # the base's matrices split over the model axis


def test_activation_estimate_follows_the_three_remat_modes():
  """Remat "full" keeps each layer's input, "minimal" also the `SAVED` projections' outputs, "none" every
  intermediate; the estimate orders them so, and "minimal" counts what `SAVED` names, by hand."""
  cfg = PRESETS["tinyllama_1b"].replace(param_dtype="bfloat16", dtype="bfloat16")
  lora = LoraConfig(rank=16, alpha=32.0)
  kw = dict(slots=256, batch_per_slot=8, seq_len=2048, mesh_shape={"expert": 256, "data": 1, "model": 1},
            rules=(("expert", "expert"),))
  act = {m: wave_memory(cfg, lora, remat=m, **kw)["activations_estimate"] for m in ("full", "minimal", "none")}
  assert act["full"] < act["minimal"] < act["none"]
  tok, D, F = 8 * 2048, cfg.d_model, cfg.d_ff
  NH, KH = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  by_hand = tok * 2 * (D + NH + KH + KH + NH + D + F + F)  # input, q, k, v, attn_out, o, gate, up in bf16
  assert layer_saved_bytes(cfg, "minimal", tok) == by_hand
  assert act["minimal"] - act["full"] == cfg.n_layers * (by_hand - tok * 2 * D)
  with pytest.raises(ConfigError, match="remat='some'"):
    layer_saved_bytes(cfg, "some", tok)

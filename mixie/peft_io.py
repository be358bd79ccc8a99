"""Experts as standard PEFT LoRA adapters, both ways, bit-exact.

mixie stores projection p of an expert as `a: [l, d_in, r]`, `b: [l, r, d_out]` and adds
`(x @ a) @ b * alpha / r`. PEFT stores, per layer i, `lora_A.weight: [r, d_in]` and
`lora_B.weight: [d_out, r]` (torch Linear layout) with the same `alpha / r` scaling, so export is a
transpose per layer and import its inverse: no arithmetic, the round trip is bit-exact.

Tensor names (for a Llama `LlamaForCausalLM` wrapped by `PeftModel`):
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (q, k, v, o under `self_attn`,
gate, up, down under `mlp`). `write_adapter` writes `adapter_model.safetensors` + `adapter_config.json`
as `PeftModel.from_pretrained` reads them.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
import safetensors.numpy

from mixie.errors import MixieError, check
from mixie.io import PathLike, atomic_write_bytes, atomic_write_json, path as _path, read_json
from mixie.model.families import LLAMA
from mixie.model.llama import PROJECTIONS
from mixie.model.lora import LoraConfig

PREFIX = "base_model.model.model.layers"
HF_MODULE = dict(LLAMA.peft_modules)  # projection -> PEFT module path (the architecture table's row)
_FROM_HF = {v.split(".")[1]: k for k, v in HF_MODULE.items()}
_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])"
                   r"(?:\.default)?\.weight$")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def to_peft_tensors(expert: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """One expert `{proj: {"a": [l, d_in, r], "b": [l, r, d_out]}}` -> PEFT tensor dict."""
  out = {}
  for proj, ab in expert.items():
    check(proj in HF_MODULE, f"expert projection {proj!r} is not one of {list(PROJECTIONS)}")
    a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
    check(a.ndim == 3 and b.ndim == 3, f"expert {proj}: expected a [l, d_in, r] and b [l, r, d_out], "
                                       f"got a{a.shape} b{b.shape} (a stack? export one expert)")
    for i in range(a.shape[0]):
      name = f"{PREFIX}.{i}.{HF_MODULE[proj]}"
      out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
      out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
  return out


def from_peft_tensors(tensors: Mapping[str, np.ndarray], n_layers: int | None = None,
                      source: str = "PEFT tensors") -> dict[str, Any]:
  """PEFT tensor dict -> one expert tree (inverse of `to_peft_tensors`).

  Every targeted projection must have lora_A and lora_B in every layer `0..n_layers-1` (n_layers
  defaults to the number found); MixieError naming the tensor otherwise.
  """
  found: dict[str, dict[str, dict[int, np.ndarray]]] = {}
  for name, t in tensors.items():
    m = _NAME.match(name)
    if not m:
      raise MixieError(f"{source}: tensor {name!r} is not a LoRA weight of a Llama projection "
                       "(only lora_A / lora_B of q,k,v,o,gate,up,down are supported)")
    layer, hf_proj, which = int(m.group(1)), m.group(3), m.group(4)
    proj = _FROM_HF.get(hf_proj)
    if proj is None or HF_MODULE[proj].split(".")[0] != m.group(2):
      raise MixieError(f"{source}: tensor {name!r}: unknown projection {m.group(2)}.{hf_proj}")
    found.setdefault(proj, {}).setdefault(which, {})[layer] = np.asarray(t)
  check(found, f"{source}: no LoRA tensors found")
  n = n_layers if n_layers is not None else 1 + max(l for p in found.values() for d in p.values() for l in d)
  expert = {}
  for proj in [p for p in PROJECTIONS if p in found]:
    parts = found[proj]
    for which in "AB":
      for i in range(n):
        if i not in parts.get(which, {}):
          raise MixieError(f"{source}: missing tensor {PREFIX}.{i}.{HF_MODULE[proj]}.lora_{which}.weight")
    a = np.stack([parts["A"][i].T for i in range(n)])
    b = np.stack([parts["B"][i].T for i in range(n)])
    if a.shape[2] != b.shape[1]:
      raise MixieError(f"{source}: {proj}: lora_A rank {a.shape[2]} != lora_B rank {b.shape[1]}")
    expert[proj] = {"a": a, "b": b}
  return expert


def adapter_config(lora: LoraConfig, base_model: str = "") -> dict[str, Any]:
  """The `adapter_config.json` dict of a mixie expert (plain LoRA, alpha / r scaling)."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
      "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
      "target_modules": [HF_MODULE[p].split(".")[1] for p in lora.targets],
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
  }


def write_adapter(directory: PathLike, expert: Mapping[str, Any], lora: LoraConfig,
                  base_model: str = "", extra_config: Mapping[str, Any] | None = None) -> None:
  """Writes one expert as a PEFT adapter directory (weights first, config last; atomic files)."""
  d = _path(directory)
  d.mkdir(parents=True, exist_ok=True)
  check(sorted(expert) == sorted(lora.targets),
        f"write_adapter: expert projections {sorted(expert)} differ from lora.targets {sorted(lora.targets)}")
  atomic_write_bytes(d / ADAPTER_WEIGHTS, safetensors.numpy.save(to_peft_tensors(expert)))
  atomic_write_json(d / ADAPTER_CONFIG, dict(adapter_config(lora, base_model), **(extra_config or {})))


def read_adapter(directory: PathLike, n_layers: int | None = None) -> tuple[dict[str, Any], LoraConfig]:
  """Reads a PEFT LoRA adapter directory into `(expert, LoraConfig)`.

  Refuses (MixieError) adapters mixie cannot represent exactly: DoRA, rsLoRA, fan_in_fan_out, biases,
  or targets outside the seven Llama projections.
  """
  d = _path(directory)
  cfg = read_json(d / ADAPTER_CONFIG)
  where = str(d / ADAPTER_CONFIG)
  check(cfg.get("peft_type", "LORA") == "LORA", f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
  for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
    check(not cfg.get(flag), f"{where}: {flag}=true is not supported")
  check(cfg.get("bias", "none") == "none", f"{where}: bias={cfg.get('bias')!r} is not supported")
  wp = d / ADAPTER_WEIGHTS
  if not wp.exists():
    raise MixieError(f"{wp}: file not found")
  try:
    tensors = safetensors.numpy.load(wp.read_bytes())
  except Exception as e:
    raise MixieError(f"{wp}: corrupt or truncated safetensors file ({e})") from None
  expert = from_peft_tensors(tensors, n_layers, source=str(wp))
  rank = next(iter(expert.values()))["a"].shape[2]
  check(rank == cfg.get("r", rank), f"{where}: r={cfg.get('r')} but the tensors have rank {rank}")
  lora = LoraConfig(rank=int(rank), alpha=float(cfg.get("lora_alpha", rank)),
                    dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                    targets=tuple(p for p in PROJECTIONS if p in expert))
  return expert, lora

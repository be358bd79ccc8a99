"""The PEFT LoRA adapter format: mixie experts as PEFT adapter directories, and the one reader of them.

mixie stores projection p of an expert as `a: [l, d_in, r]`, `b: [l, r, d_out]` and adds
`(x @ a) @ b * alpha / r`. PEFT stores, per layer i, `lora_A.weight: [r, d_in]` and
`lora_B.weight: [d_out, r]` (torch Linear layout) with the same `alpha / r` scaling (`alpha / sqrt(r)`
with rsLoRA), so export is a transpose per layer and reading its inverse: no arithmetic, the round trip
is bit-exact.

Tensor names (for a Llama `LlamaForCausalLM` wrapped by `PeftModel`):
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (q, k, v, o under `self_attn`,
gate, up, down under `mlp`). `write_adapter` writes `adapter_model.safetensors` + `adapter_config.json`
as `PeftModel.from_pretrained` reads them; `read_adapter` reads any plain or rsLoRA adapter of those
projections (float16, bfloat16 or float32) and refuses, naming each reason, what is not plain LoRA:
other adapter types (IA3, LoHa, ...), DoRA, LoRA biases, `modules_to_save`, other modules, per-module
rank/alpha patterns, partial layers.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import tempfile
from typing import Any, Mapping

import numpy as np
import safetensors.numpy

from mixie.errors import MixieError, check
from mixie.io import PathLike, atomic_write_bytes, atomic_write_json, path as _path, read_json
from mixie.model.checkpoint import SafetensorsFile
from mixie.model.families import LLAMA
from mixie.model.llama import PROJECTIONS
from mixie.model.lora import LoraConfig

PREFIX = "base_model.model.model.layers"
HF_MODULE = dict(LLAMA.peft_modules)  # projection -> PEFT module path (the architecture table's row)
HF_PROJ = {p: m.split(".")[1] for p, m in HF_MODULE.items()}  # q -> q_proj, ...
_FROM_HF = {v: k for k, v in HF_PROJ.items()}
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
      "target_modules": [HF_PROJ[p] for p in lora.targets],
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


# ---------------------------------------------------------------------------------------------------
# Reading.


def check_adapter_config(cfg: Mapping[str, Any]) -> list[str]:
  """Reasons mixie cannot represent an adapter, from its `adapter_config.json` alone ([] = none)."""
  problems = []
  if cfg.get("peft_type", "LORA") != "LORA":
    problems.append(f"peft_type={cfg.get('peft_type')!r} (only LORA adapters are supported)")
  if cfg.get("use_dora"):
    problems.append("use_dora=true (DoRA's magnitude vectors are not LoRA)")
  if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
    problems.append(f"bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r} (LoRA biases)")
  if cfg.get("fan_in_fan_out"):
    problems.append("fan_in_fan_out=true (Conv1D-style layers, not a Llama)")
  if cfg.get("modules_to_save"):
    problems.append(f"modules_to_save={cfg['modules_to_save']!r} (fully trained modules outside the "
                    "seven projections)")
  tm = cfg.get("target_modules")
  if isinstance(tm, (list, tuple)):
    bad = [m for m in tm if str(m).split(".")[-1] not in _FROM_HF]
    if bad:
      problems.append(f"target_modules {bad} outside the seven projections ({', '.join(_FROM_HF)})")
  for key in ("rank_pattern", "alpha_pattern"):
    if cfg.get(key):
      problems.append(f"{key}={cfg[key]!r} (per-module ranks/alphas)")
  if cfg.get("layers_to_transform") is not None:
    problems.append(f"layers_to_transform={cfg['layers_to_transform']!r} (every layer must be adapted)")
  for key in ("layer_replication", "trainable_token_indices", "target_parameters"):
    if cfg.get(key):
      problems.append(f"{key}={cfg[key]!r}")
  r = cfg.get("r")
  if not isinstance(r, int) or isinstance(r, bool) or r < 1:
    problems.append(f"r={r!r} (a positive integer rank is required)")
  alpha = cfg.get("lora_alpha", r)
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
    problems.append(f"lora_alpha={alpha!r} (a number is required)")
  return problems


def read_adapter_config(directory: PathLike) -> dict[str, Any]:
  """An adapter's `adapter_config.json`, refused (one MixieError listing every reason) unless mixie can
  represent the adapter (`check_adapter_config`)."""
  d = _path(directory)
  cfg = read_json(d / ADAPTER_CONFIG)
  problems = check_adapter_config(cfg) if isinstance(cfg, dict) else [f"{ADAPTER_CONFIG} is not a JSON object"]
  if problems:
    raise MixieError(f"{d}: not a PEFT adapter mixie can read: " + "; ".join(problems))
  return cfg


def read_tensors(p: PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file (float16/bfloat16/float32 alike), MixieError naming the file."""
  p = _path(p)
  if not p.exists():
    raise MixieError(f"{p}: file not found")
  if "://" not in str(p):
    f = SafetensorsFile(pathlib.Path(str(p)))
    return {name: np.array(f.array(name)) for name in f.entries}
  with tempfile.TemporaryDirectory() as tmp:  # a remote adapter (gs://): read from a local copy
    local = pathlib.Path(tmp) / p.name
    local.write_bytes(p.read_bytes())
    f = SafetensorsFile(local)
    return {name: np.array(f.array(name)) for name in f.entries}


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
  """A PEFT LoRA adapter as read by `read_adapter`."""

  expert: dict[str, Any]  # {proj: {"a": [l, d_in, r], "b": [l, r, d_out]}}, in the file's dtype
  rank: int
  alpha: float
  use_rslora: bool  # scale alpha / sqrt(r) instead of alpha / r
  dropout: float
  config: dict[str, Any]  # its adapter_config.json

  @property
  def targets(self) -> tuple[str, ...]:
    """The adapted projections, in mixie's order."""
    return tuple(p for p in PROJECTIONS if p in self.expert)

  @property
  def scale(self) -> float:
    """PEFT's scale of the adapter: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


def read_adapter(directory: PathLike, n_layers: int | None = None) -> PeftAdapter:
  """Reads a PEFT LoRA adapter directory (see the module docstring); MixieError naming the directory
  and every reason it cannot be read. `n_layers`: the layers every projection must have (default: as
  many as found)."""
  d = _path(directory)
  cfg = read_adapter_config(d)
  where = f"{d}: not a PEFT adapter mixie can read"
  try:
    expert = from_peft_tensors(read_tensors(d / ADAPTER_WEIGHTS), n_layers, source=str(d / ADAPTER_WEIGHTS))
  except MixieError as e:
    raise MixieError(f"{where}: {e}") from None
  rank = next(iter(expert.values()))["a"].shape[2]
  check(cfg["r"] == rank, f"{where}: {ADAPTER_CONFIG} says r={cfg['r']} but the tensors have rank {rank}")
  return PeftAdapter(expert=expert, rank=int(rank), alpha=float(cfg.get("lora_alpha", rank)),
                     use_rslora=bool(cfg.get("use_rslora")), dropout=float(cfg.get("lora_dropout") or 0.0),
                     config=cfg)

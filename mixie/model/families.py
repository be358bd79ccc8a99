"""The architecture table: one row per base family, with its tensor names and its switches.

A row holds everything in which decoder families differ:

- tensor names: HF safetensors names and GGUF names of every parameter (keys as in
  `mixie.model.llama.PARAM_PATHS`; `{i}` is the layer), and the PEFT module path of each projection;
- switches: RMSNorm offset (`(offset + w)`), MLP activation, q/k/v biases, embedding scale (`sqrt(d)`),
  attention window, logit soft-capping and post-norms.

The model (`mixie.model.layers`) reads the switches; the checkpoint readers read the names; a
checkpoint field the row does not support fails with one message naming it (`check_hf_fields`).
Adding a family is one row here (plus its parity test row); switches the model does not implement yet
are refused in `get` until it does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mixie.errors import ConfigError, MixieError


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
  """One base family: names in each file format and the architectural switches."""

  name: str
  hf_architectures: tuple[str, ...]  # config.json "architectures" / "model_type" values read by this row
  gguf_architecture: str  # GGUF "general.architecture"; metadata keys are "<this>.<key>" ("": not read)
  hf_tensors: Mapping[str, str]  # parameter key -> HF tensor name
  gguf_tensors: Mapping[str, str]  # parameter key -> GGUF tensor name
  peft_modules: Mapping[str, str]  # projection -> module path under "model.layers.{i}."
  hf_ignored: tuple[str, ...] = ()  # suffixes of HF tensors that carry nothing the model needs
  norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + w): 1.0 for Gemma
  activation: str = "silu"  # gated MLP activation: "silu" or "gelu_tanh"
  qkv_bias: bool = False  # q/k/v projections have biases (Qwen2)
  embed_scale: bool = False  # embeddings are multiplied by sqrt(d_model) (Gemma)
  sliding_window: bool = False  # attention may be restricted to a window (Mistral, Gemma 2)
  soft_capping: bool = False  # attention and final logits are soft-capped (Gemma 2)
  post_norms: bool = False  # extra norms after attention and MLP (Gemma 2)


# Switches the model implements today (`Family` field -> the values it supports).
IMPLEMENTED = {"norm_offset": (0.0,), "activation": ("silu",), "qkv_bias": (False, True),
               "embed_scale": (False,), "sliding_window": (False,), "soft_capping": (False,),
               "post_norms": (False,)}

LLAMA = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM", "llama", "MistralForCausalLM", "mistral"),
    gguf_architecture="llama",
    hf_tensors={
        "embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight",
        "attn_norm": "model.layers.{i}.input_layernorm.weight",
        "q": "model.layers.{i}.self_attn.q_proj.weight", "k": "model.layers.{i}.self_attn.k_proj.weight",
        "v": "model.layers.{i}.self_attn.v_proj.weight", "o": "model.layers.{i}.self_attn.o_proj.weight",
        "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "gate": "model.layers.{i}.mlp.gate_proj.weight", "up": "model.layers.{i}.mlp.up_proj.weight",
        "down": "model.layers.{i}.mlp.down_proj.weight",
    },
    gguf_tensors={
        "embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
        "attn_norm": "blk.{i}.attn_norm.weight", "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight",
        "v": "blk.{i}.attn_v.weight", "o": "blk.{i}.attn_output.weight", "mlp_norm": "blk.{i}.ffn_norm.weight",
        "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight", "down": "blk.{i}.ffn_down.weight",
    },
    peft_modules={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                  "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                  "down": "mlp.down_proj"},
    hf_ignored=(".rotary_emb.inv_freq",),
)

# Qwen2 / Qwen2.5: Llama plus q/k/v biases (HF safetensors only: its GGUF files are not read yet).
QWEN2 = Family(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM", "qwen2"),
    gguf_architecture="",
    hf_tensors={**LLAMA.hf_tensors, **{f"{p}_bias": f"model.layers.{{i}}.self_attn.{p}_proj.bias"
                                       for p in ("q", "k", "v")}},
    gguf_tensors={},
    peft_modules=LLAMA.peft_modules,
    hf_ignored=LLAMA.hf_ignored,
    qkv_bias=True,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, QWEN2)}


def get(name: str) -> Family:
  """The row of family `name` (`ConfigError` for an unknown name or a switch the model lacks)."""
  if name not in FAMILIES:
    raise ConfigError(f"model family {name!r} is not supported (supported: {sorted(FAMILIES)})")
  fam = FAMILIES[name]
  for field, ok in IMPLEMENTED.items():
    if getattr(fam, field) not in ok:
      raise ConfigError(f"model family {name!r}: {field}={getattr(fam, field)!r} is not implemented")
  return fam


def for_hf_architecture(archs, where: str) -> Family:
  """The row that reads an HF config with `architectures` (or `model_type`) `archs`."""
  for fam in FAMILIES.values():
    if any(a in fam.hf_architectures for a in archs):
      return get(fam.name)
  known = sorted(a for f in FAMILIES.values() for a in f.hf_architectures if a[0].isupper())
  raise MixieError(f"{where}: unsupported architecture {list(archs)!r} (mixie reads {known})")


def for_gguf_architecture(arch: str, where: str) -> Family:
  """The row that reads GGUF files of `general.architecture == arch`."""
  for fam in FAMILIES.values():
    if fam.gguf_architecture and fam.gguf_architecture == arch:
      return get(fam.name)
  known = sorted(f.gguf_architecture for f in FAMILIES.values() if f.gguf_architecture)
  raise MixieError(f"{where}: GGUF architecture {arch!r} is not supported (mixie reads {known})")


def _window_active(v, hf) -> bool:
  """A sliding window shorter than the model's positions (a longer one is plain causal attention)."""
  if v is None or hf.get("use_sliding_window") is False:
    return False
  limit = hf.get("max_position_embeddings")
  return limit is None or int(v) < int(limit)


# HF config.json fields that only some families support: (field, is it in effect?, the row's switch
# that supports it; None: no family does).
_HF_FIELDS = (
    ("attention_bias", lambda v, hf: bool(v), "qkv_bias"),
    ("mlp_bias", lambda v, hf: bool(v), None),
    ("sliding_window", _window_active, "sliding_window"),
    ("attn_logit_softcapping", lambda v, hf: v is not None, "soft_capping"),
    ("final_logit_softcapping", lambda v, hf: v is not None, "soft_capping"),
)


def check_hf_fields(fam: Family, hf: Mapping[str, Any], where: str) -> None:
  """`MixieError` naming the first field of an HF config that `fam` does not support."""
  for field, active, switch in _HF_FIELDS:
    if field in hf and active(hf[field], hf) and (switch is None or not getattr(fam, switch)):
      raise MixieError(f"{where}: {field}={hf[field]!r} is not supported for the {fam.name} family")
  for field in ("hidden_act", "hidden_activation"):
    act = hf.get(field)
    if act is not None and {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(act) != fam.activation:
      raise MixieError(f"{where}: {field}={act!r} is not supported for the {fam.name} family "
                       f"(it uses {fam.activation})")

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
  gguf_qk_permuted: bool = True  # llama.cpp's converter permuted Q/K rows for RoPE (its Llama converter)
  gguf_norms_offset: bool = False  # llama.cpp stored every RMSNorm weight as (norm_offset + w) (Gemma)
  norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + w): 1.0 for Gemma
  activation: str = "silu"  # gated MLP activation: "silu" or "gelu_tanh"
  qkv_bias: bool = False  # q/k/v projections have biases (Qwen2)
  embed_scale: bool = False  # embeddings are multiplied by sqrt(d_model) (Gemma)
  sliding_window: bool = False  # attention may be restricted to a window (Mistral, Gemma 2)
  alternating_window: bool = False  # without config "layer_types": layers 0, 2, ... local, the rest global
  soft_capping: bool = False  # attention and final logits are soft-capped (Gemma 2)
  query_scale: bool = False  # scores scaled by query_pre_attn_scalar ** -0.5, not head_dim's (Gemma 2)
  post_norms: bool = False  # extra norms after attention and MLP (Gemma 2)
  hf_activation_aliases: tuple[str, ...] = ()  # more HF activation names read as `activation`


# Switches the model implements today (`Family` field -> the values it supports).
IMPLEMENTED = {"norm_offset": (0.0, 1.0), "activation": ("silu", "gelu_tanh"), "qkv_bias": (False, True),
               "embed_scale": (False, True), "sliding_window": (False, True),
               "alternating_window": (False, True), "soft_capping": (False, True),
               "query_scale": (False, True), "post_norms": (False, True)}

LLAMA = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM", "llama"),
    # llama.cpp also writes Mistral (and its window-free GGUF metadata) as "llama": read by this row
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

# Qwen2 / Qwen2.5: Llama plus q/k/v biases. llama.cpp writes its GGUF as "qwen2", Q/K rows in HF's order.
QWEN2 = Family(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM", "qwen2"),
    gguf_architecture="qwen2",
    hf_tensors={**LLAMA.hf_tensors, **{f"{p}_bias": f"model.layers.{{i}}.self_attn.{p}_proj.bias"
                                       for p in ("q", "k", "v")}},
    gguf_tensors={**LLAMA.gguf_tensors, **{f"{p}_bias": f"blk.{{i}}.attn_{p}.bias" for p in ("q", "k", "v")}},
    gguf_qk_permuted=False,
    peft_modules=LLAMA.peft_modules,
    hf_ignored=LLAMA.hf_ignored,
    qkv_bias=True,
)

# Mistral: Llama plus sliding-window attention in every layer. Its GGUF files are read by the llama row
# (llama.cpp writes them as architecture "llama", without the window).
MISTRAL = dataclasses.replace(LLAMA, name="mistral", hf_architectures=("MistralForCausalLM", "mistral"),
                              gguf_architecture="", gguf_tensors={}, sliding_window=True)

# Gemma: (1 + w) RMSNorm, GELU-tanh gated MLP, sqrt(d)-scaled (tied) embeddings, head_dim free of
# d / n. llama.cpp's converter writes it as "gemma" with Llama's tensor names, Q/K rows in HF's order and
# every norm weight stored as 1 + w. (transformers reads a Gemma config's hidden_act "gelu" as the tanh
# form: so does this row)
GEMMA = dataclasses.replace(LLAMA, name="gemma", hf_architectures=("GemmaForCausalLM", "gemma"),
                            gguf_architecture="gemma", gguf_qk_permuted=False, gguf_norms_offset=True,
                            norm_offset=1.0, activation="gelu_tanh", embed_scale=True,
                            hf_activation_aliases=("gelu",))

# Gemma 2: Gemma plus soft-capped attention scores and logits, alternating local (windowed) and global
# layers, query_pre_attn_scalar, and norms after attention and MLP (the pre-MLP norm is renamed). Its GGUF
# ("gemma2") has Gemma's 1 + w norms, the caps and the window, but no query_pre_attn_scalar
# (`mixie.model.checkpoint.gguf_query_scale` follows llama.cpp's rule).
GEMMA2 = dataclasses.replace(
    GEMMA, name="gemma2", hf_architectures=("Gemma2ForCausalLM", "gemma2"), hf_activation_aliases=(),
    gguf_architecture="gemma2",
    hf_tensors={**LLAMA.hf_tensors,
                "mlp_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
                "post_attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
                "post_mlp_norm": "model.layers.{i}.post_feedforward_layernorm.weight"},
    gguf_tensors={**LLAMA.gguf_tensors, "post_attn_norm": "blk.{i}.post_attention_norm.weight",
                  "post_mlp_norm": "blk.{i}.post_ffw_norm.weight"},
    sliding_window=True, alternating_window=True, soft_capping=True, query_scale=True, post_norms=True)

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, QWEN2, MISTRAL, GEMMA, GEMMA2)}


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
    ("query_pre_attn_scalar", lambda v, hf: v is not None, "query_scale"),
    ("use_bidirectional_attention", lambda v, hf: bool(v), None),
)


def check_hf_fields(fam: Family, hf: Mapping[str, Any], where: str) -> None:
  """`MixieError` naming the first field of an HF config that `fam` does not support."""
  for field, active, switch in _HF_FIELDS:
    if field in hf and active(hf[field], hf) and (switch is None or not getattr(fam, switch)):
      raise MixieError(f"{where}: {field}={hf[field]!r} is not supported for the {fam.name} family")
  for field in ("hidden_act", "hidden_activation"):
    act = hf.get(field)
    if act in fam.hf_activation_aliases:
      continue
    if act is not None and {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(act) != fam.activation:
      raise MixieError(f"{where}: {field}={act!r} is not supported for the {fam.name} family "
                       f"(it uses {fam.activation})")


def hf_windows(fam: Family, hf: Mapping[str, Any], where: str) -> dict[str, Any]:
  """`LlamaConfig` fields of an HF config's attention window: `sliding_window` (0: none) and
  `local_layers` (from "layer_types", or the row's alternating default); `MixieError` naming a layer
  type mixie lacks."""
  n = int(hf["num_hidden_layers"])
  types = hf.get("layer_types")
  if types is not None:
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != n:
      raise MixieError(f"{where}: layer_types={types!r} is not supported for the {fam.name} family "
                       f"(mixie reads {n} of 'sliding_attention' / 'full_attention')")
  if types is not None:
    local = tuple(t == "sliding_attention" for t in types)
  elif fam.alternating_window:
    local = tuple(i % 2 == 0 for i in range(n))
  else:
    local = (True,) * n
  # (an active window on a row without the switch was refused by `check_hf_fields`)
  if not fam.sliding_window or not _window_active(hf.get("sliding_window"), hf) or not any(local):
    return {"sliding_window": 0, "local_layers": ()}
  return {"sliding_window": int(hf["sliding_window"]), "local_layers": () if all(local) else local}

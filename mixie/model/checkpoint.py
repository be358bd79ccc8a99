"""Checkpoint import: HF safetensors directories and GGUF files, into the model's parameter tree.

Both formats go through one path. The family's row (`mixie.model.families`) names every tensor; a
tensor source (`mixie.model.tensor_sources`) answers "shape of tensor X" from the file headers alone
and "rows r, columns c of tensor X" by reading only those bytes. Loading then

1. reads the architecture (`hf_config`, `gguf_config`): a field the family does not support fails
   with one message naming it;
2. validates every tensor against the expected shapes before any array exists (missing directory,
   file, tensor, wrong shape, truncated file, a tensor the family does not have: `MixieError` naming
   the file and the tensor), and
3. builds each leaf with `jax.make_array_from_callback`, so every device shard is assembled from just
   the slices it needs, cast to `param_dtype` per tensor. At most one leaf's shard is held on the host
   at a time: a 7B checkpoint never needs two full copies in host memory.

Orientation: HF and GGUF store a linear layer as `[out, in]`; mixie stores `[in, out]`, with the layers
stacked on a leading axis (`mixie.model.llama.param_shapes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mixie.errors import MixieError
from mixie.model import families
from mixie.model.config import LlamaConfig
from mixie.model.llama import PARAM_PATHS, Params, param_at, param_shapes
from mixie.model.tensor_sources import (GGUFSource, PathLike, SafetensorsFile,  # noqa: F401 (re-exported)
                                        SafetensorsSource, Source, gguf_value, open_gguf)

_SINGLE = ("embed", "final_norm", "lm_head")  # one tensor each; the other keys have one per layer
# not `[out, in]` matrices: stored as in the file
_KEEP_ORIENTATION = ("embed", "final_norm", "attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm",
                     "q_bias", "k_bias", "v_bias")

# ---------------------------------------------------------------------------------------------------
# Architectures.


def config_from_hf(hf: dict[str, Any], where: str = "config.json", **overrides) -> LlamaConfig:
  """`LlamaConfig` from an HF `config.json` dict; `MixieError` naming an unsupported architecture or
  field (`where` names the file)."""
  archs = hf.get("architectures") or [hf.get("model_type", "?")]
  fam = families.for_hf_architecture(archs, where)
  families.check_hf_fields(fam, hf, where)
  scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
  kind = scaling and scaling.get("rope_type", scaling.get("type"))
  rope_scaling = None
  if kind == "llama3":
    rope_scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                    float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
  elif kind not in (None, "default"):
    raise MixieError(f"{where}: unsupported rope_scaling {scaling!r} (supported: none, llama3)")
  theta = hf.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
  n_heads = hf["num_attention_heads"]
  switches = families.hf_windows(fam, hf, where)
  if fam.soft_capping:
    switches.update(attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                    final_softcap=float(hf.get("final_logit_softcapping") or 0.0))
  if fam.query_scale and hf.get("query_pre_attn_scalar") is not None:
    switches["query_scale"] = float(hf["query_pre_attn_scalar"])
  return LlamaConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      d_ff=hf["intermediate_size"], head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
      rope_theta=float(theta), rope_scaling=rope_scaling, rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_seq_len=int(hf.get("max_position_embeddings", 2048)), family=fam.name, **switches, **overrides)


def hf_config(directory: PathLike, **overrides) -> LlamaConfig:
  """`LlamaConfig` from `directory/config.json`; `MixieError` naming the file on any problem."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise MixieError(f"{directory}: checkpoint directory not found")
  cfg_path = directory / "config.json"
  if not cfg_path.is_file():
    raise MixieError(f"{cfg_path}: file not found (an HF checkpoint directory needs config.json)")
  try:
    hf = json.loads(cfg_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise MixieError(f"{cfg_path}: not valid JSON ({e})") from None
  try:
    return config_from_hf(hf, str(cfg_path), **overrides)
  except ValueError as e:
    raise MixieError(f"{cfg_path}: {e}") from None
  except KeyError as e:
    raise MixieError(f"{cfg_path}: required field {e.args[0]!r} is missing") from None


def gguf_config(reader, path: PathLike = "", **overrides) -> LlamaConfig:
  """`LlamaConfig` from a GGUF file's `<architecture>.*` metadata."""
  arch = gguf_value(reader, "general.architecture", path=path)
  fam = families.for_gguf_architecture(arch, str(path))
  g = lambda k, d=None: gguf_value(reader, f"{fam.gguf_architecture}.{k}", d, path=path)  # noqa: E731
  tensors = {t.name for t in reader.tensors}
  scaling = g("rope.scaling.type", "none")
  if scaling not in ("none", "") or "rope_freqs.weight" in tensors:
    raise MixieError(f"{path}: GGUF rope scaling ({scaling!r} / rope_freqs.weight) is not supported; "
                     "load the HF safetensors checkpoint instead")
  n_heads = int(g("attention.head_count"))
  d_model = int(g("embedding_length"))
  vocab = g("vocab_size", -1)
  if vocab == -1:
    vocab = len(gguf_value(reader, "tokenizer.ggml.tokens", path=path))
  n_layers, head_dim = int(g("block_count")), int(g("attention.key_length", d_model // n_heads))
  try:
    return LlamaConfig(
        vocab_size=int(vocab), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(g("attention.head_count_kv", n_heads)), d_ff=int(g("feed_forward_length")),
        head_dim=head_dim, rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=fam.gguf_tensors["lm_head"] not in tensors,
        max_seq_len=int(g("context_length", 2048)), family=fam.name,
        **_gguf_switches(fam, g, n_layers, d_model // n_heads, head_dim, path), **overrides)
  except ValueError as e:
    raise MixieError(f"{path}: inconsistent GGUF metadata ({e})") from None


def _gguf_switches(fam: families.Family, g, n_layers: int, d_per_head: int, head_dim: int, path
                   ) -> dict[str, Any]:
  """The `LlamaConfig` switches of a GGUF file's family from its `<architecture>.*` metadata (`g`):
  the window (llama.cpp's Gemma 2 alternates local and global layers, even layers local, as the row's
  `alternating_window`), the soft-caps, and the query scale."""
  out: dict[str, Any] = {}
  window, limit = int(g("attention.sliding_window", 0) or 0), int(g("context_length", 0) or 0)
  if window and (not limit or window < limit) and not fam.sliding_window:
    raise MixieError(f"{path}: GGUF {fam.gguf_architecture}.attention.sliding_window={window} is not "
                     f"supported for the {fam.name} family (mixie would ignore the window)")
  if fam.sliding_window:
    pattern = g("attention.sliding_window_pattern", 2 if fam.alternating_window else 1)  # 1: every layer
    if int(pattern) != (2 if fam.alternating_window else 1):
      raise MixieError(f"{path}: GGUF {fam.gguf_architecture}.attention.sliding_window_pattern={pattern!r} "
                       f"is not supported for the {fam.name} family")
    if window and (not limit or window < limit):
      out.update(sliding_window=window,
                 local_layers=tuple(i % 2 == 0 for i in range(n_layers)) if fam.alternating_window else ())
  if fam.soft_capping:
    out.update(attn_softcap=float(g("attn_logit_softcapping", 0.0) or 0.0),
               final_softcap=float(g("final_logit_softcapping", 0.0) or 0.0))
  if fam.query_scale:
    out["query_scale"] = gguf_query_scale(g("attention.scale", 0.0), n_layers, d_per_head, head_dim)
  return out


def gguf_query_scale(scale, n_layers: int, d_per_head: int, head_dim: int) -> float:
  """Gemma 2's `query_pre_attn_scalar` q (scores scaled by q ** -0.5) of a GGUF file, which llama.cpp's
  converter does not write: from `attention.scale` (= q ** -0.5) when the file has one, else llama.cpp's
  rule by model size: d_model / n_heads for the 27B model (46 layers; q = 144), head_dim for every other
  size (2B and 9B: 256, what their HF configs say)."""
  if scale:
    return 1.0 / float(scale) ** 2
  return float(d_per_head if n_layers == 46 else head_dim)


# ---------------------------------------------------------------------------------------------------
# Building the parameter tree.


@dataclasses.dataclass(frozen=True)
class _Leaf:
  names: tuple[str, ...]  # one tensor per layer (stacked) or a single tensor
  stacked: bool
  transpose: bool  # file [out, in] -> mixie [in, out]


def _leaf_specs(cfg: LlamaConfig, names: dict[str, str]) -> dict[str, _Leaf]:
  """Each parameter key's file tensors, from a family row's name table (the keys `cfg`'s model has)."""
  specs = {}
  for key in _flat_shapes(cfg):
    stacked = key not in _SINGLE
    tensors = tuple(names[key].format(i=i) for i in range(cfg.n_layers)) if stacked else (names[key],)
    specs[key] = _Leaf(tensors, stacked, key not in _KEEP_ORIENTATION)
  return specs


def _flat_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  shapes = param_shapes(cfg)
  return {k: param_at(shapes, k) for k in PARAM_PATHS if param_at(shapes, k) is not None}


def _validate(cfg: LlamaConfig, specs, source: Source, ignored: tuple[str, ...] = ()) -> None:
  """Every tensor exists with the expected shape and the file has no tensor the family lacks
  (headers only, nothing read)."""
  shapes = _flat_shapes(cfg)
  for key, leaf in specs.items():
    per = shapes[key][1:] if leaf.stacked else shapes[key]
    want = tuple(reversed(per)) if leaf.transpose else tuple(per)
    for name in leaf.names:
      got = source.shape(name)
      if got is None:
        raise MixieError(f"{source.file_of(name)}: tensor {name!r} is missing "
                         f"(expected shape {list(want)})")
      if tuple(got) != want:
        raise MixieError(f"{source.file_of(name)}: tensor {name!r} has shape {list(got)}, "
                         f"expected {list(want)} for this config")
  known = {n for leaf in specs.values() for n in leaf.names}
  for name in source.names():
    if name not in known and not name.endswith(ignored):
      raise MixieError(f"{source.file_of(name)}: tensor {name!r} is not supported for the {cfg.family} "
                       "family (mixie would ignore it)")


def _resolve_shardings(shardings, cfg: LlamaConfig) -> dict[str, jax.sharding.Sharding]:
  """Flat `{key: Sharding}` from None (first local device), one Sharding, a tree, or `cfg -> tree`."""
  if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
    shardings = shardings(cfg)
  keys = _flat_shapes(cfg)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    return {k: shardings for k in keys}
  flat = {k: param_at(shardings, k) for k in keys}
  missing = [k for k, v in flat.items() if v is None]
  if missing:
    raise MixieError(f"shardings tree lacks entries for {missing}")
  return flat


def _build(cfg: LlamaConfig, specs, source: Source, shardings) -> Params:
  """Each leaf via `make_array_from_callback`, reading only the slices each shard needs."""
  shapes = _flat_shapes(cfg)
  shard_of = _resolve_shardings(shardings, cfg)
  dt = np.dtype(jnp.dtype(cfg.param_dtype))
  params: Params = {}
  for key, leaf in specs.items():
    shape = shapes[key]
    # Devices holding replicas ask for the same block: read each distinct block of this leaf once.
    # At most one leaf's addressable blocks are held on the host at a time.
    memo: dict[tuple, np.ndarray] = {}

    def cb(index, leaf=leaf, shape=shape, memo=memo):
      idx = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
      sig = tuple((s.start, s.stop) for s in idx)
      if sig not in memo:
        memo[sig] = _read_block(source, leaf, idx, dt)
      return memo[sig]

    node = params
    *parents, last = PARAM_PATHS[key]
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = jax.make_array_from_callback(shape, shard_of[key], cb)
    memo.clear()
  return params


def _read_block(source: Source, leaf: _Leaf, idx: tuple[slice, ...], dt) -> np.ndarray:
  """The block `idx` of one mixie leaf, assembled from file tensors and cast per tensor to `dt`."""

  def one(name, sub):
    file_idx = tuple(reversed(sub)) if leaf.transpose else sub
    w = source.read(name, file_idx)
    return (w.T if leaf.transpose else w).astype(dt)

  if not leaf.stacked:
    return np.ascontiguousarray(one(leaf.names[0], idx))
  layers = range(*idx[0].indices(len(leaf.names)))
  out = None
  for j, i in enumerate(layers):
    w = one(leaf.names[i], idx[1:])
    if out is None:
      out = np.empty((len(layers),) + w.shape, dt)
    out[j] = w
  return out


def _checked_hf(directory: pathlib.Path, **overrides) -> tuple[LlamaConfig, dict[str, _Leaf], Source]:
  """An HF directory's config, leaf specs and tensor source, validated from the headers."""
  cfg = hf_config(directory, **overrides)
  fam = families.get(cfg.family)
  source = SafetensorsSource(directory)
  specs = _leaf_specs(cfg, dict(fam.hf_tensors))
  # a tied checkpoint may still store its LM head (the embedding's copy)
  _validate(cfg, specs, source, fam.hf_ignored + ((fam.hf_tensors["lm_head"],) if cfg.tie_embeddings else ()))
  return cfg, specs, source


def _checked_gguf(path: pathlib.Path, reader=None, **overrides
                  ) -> tuple[LlamaConfig, dict[str, _Leaf], Source]:
  """A GGUF file's config, leaf specs and tensor source, validated from the headers."""
  reader = reader if reader is not None else open_gguf(path)
  cfg = gguf_config(reader, path, **overrides)
  fam = families.get(cfg.family)
  names = dict(fam.gguf_tensors)
  heads = {names[p].format(i=i): n for p, n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads))
           for i in range(cfg.n_layers)} if fam.gguf_qk_permuted else {}
  norms = [k for k in _KEEP_ORIENTATION if k.endswith("norm") and k in names]
  shifts = {names[k].format(i=i): fam.norm_offset for k in norms
            for i in range(cfg.n_layers if "{i}" in names[k] else 1)} if fam.gguf_norms_offset else {}
  source = GGUFSource(reader, path, heads, shifts)
  specs = _leaf_specs(cfg, names)
  _validate(cfg, specs, source)
  return cfg, specs, source


# ---------------------------------------------------------------------------------------------------
# Public API.


def load_hf(path: PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
            attention_impl: str | None = None, shardings=None) -> tuple[LlamaConfig, Params]:
  """Loads an HF checkpoint directory (`config.json` + `model.safetensors` or a sharded index) of a
  family in `mixie.model.families`.

  Args:
    path: the checkpoint directory.
    dtype, param_dtype, attention_impl: numerics of the returned `LlamaConfig`; weights are cast to
      `param_dtype` tensor by tensor.
    shardings: None (first local device), one `Sharding` for every leaf, a tree of shardings shaped
      like the params, or a callable `LlamaConfig -> tree`.

  Returns:
    `(cfg, params)`; raises `MixieError` (naming the file and tensor) before building anything if the
    checkpoint is incomplete or inconsistent.
  """
  cfg, specs, source = _checked_hf(pathlib.Path(path), dtype=dtype, param_dtype=param_dtype,
                                   attention_impl=attention_impl)
  return cfg, _build(cfg, specs, source, shardings)


def load_gguf(path: PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
              attention_impl: str | None = None, shardings=None, reader=None
              ) -> tuple[LlamaConfig, Params]:
  """Loads a GGUF file of a family in `mixie.model.families` (any quantization `gguf` can dequantize),
  e.g. the shipped SmolLM2.

  Same arguments as `load_hf`; `reader` may pass an already opened `open_gguf(path)`.
  """
  cfg, specs, source = _checked_gguf(pathlib.Path(path), reader, dtype=dtype, param_dtype=param_dtype,
                                     attention_impl=attention_impl)
  return cfg, _build(cfg, specs, source, shardings)


def check_headers(source: str, path: PathLike) -> LlamaConfig:
  """Validates a checkpoint from its headers and metadata alone (no weight is read): the architecture
  is supported and every tensor the base needs is there with its shape, inside its file. `source` is
  "hf" (a directory) or "gguf" (a file). The same checks `load_hf` / `load_gguf` run before reading;
  `MixieError` naming the file and field or tensor. Returns the checkpoint's config."""
  if source == "gguf":
    return _checked_gguf(pathlib.Path(path))[0]
  if source == "hf":
    return _checked_hf(pathlib.Path(path))[0]
  raise MixieError(f"checkpoint source {source!r} has no headers to check (expected 'hf' or 'gguf')")


def hf_tensors(cfg: LlamaConfig, params: Params) -> dict[str, np.ndarray]:
  """The base as HF tensors (the family's names, `[out, in]` matrices, one per layer): what `load_hf`
  reads back. For handing a base to transformers (benchmarks' and tests' peers)."""
  out = {}
  for key, leaf in _leaf_specs(cfg, dict(families.get(cfg.family).hf_tensors)).items():
    x = np.asarray(jax.device_get(param_at(params, key)))
    for i, name in enumerate(leaf.names):
      w = x[i] if leaf.stacked else x
      out[name] = np.ascontiguousarray(w.T if leaf.transpose else w)
  return out


_FINGERPRINT_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim",
                       "rope_theta", "rope_scaling", "rms_eps", "tie_embeddings")
# hashed only when a family sets them (so a Llama base hashes as before)
_FINGERPRINT_SWITCHES = ("sliding_window", "local_layers", "query_scale", "attn_softcap", "final_softcap")


def fingerprint(cfg: LlamaConfig, params: Params) -> str:
  """A short stable hash of a base: its architecture plus a few parameter slices.

  Independent of compute dtype, param dtype and sharding (slices are hashed as bfloat16), so experts
  trained on a base in bf16 are recognised on the same base loaded in f32, but not on another base.
  (A family other than Llama adds its name to the hashed architecture; a Llama base hashes as before.)
  """
  h = hashlib.sha256()
  arch = {f: getattr(cfg, f) for f in _FINGERPRINT_FIELDS}
  if cfg.family != "llama":
    arch["family"] = cfg.family
  arch.update({f: getattr(cfg, f) for f in _FINGERPRINT_SWITCHES if getattr(cfg, f)})
  h.update(json.dumps(arch, sort_keys=True, default=list).encode())
  p = lambda key: param_at(params, key)  # noqa: E731
  probes = [p("embed")[:8, :16], p("embed")[-8:, -16:], p("final_norm")[:16],
            p("q")[0, :8, :16], p("k")[-1, -8:, -16:], p("down")[cfg.n_layers // 2, :8, :16],
            p("attn_norm")[-1, :16]]
  if p("lm_head") is not None:
    probes.append(p("lm_head")[:8, -16:])
  for x in probes:
    h.update(np.asarray(jax.device_get(x)).astype(ml_dtypes.bfloat16).tobytes())
  return h.hexdigest()[:16]

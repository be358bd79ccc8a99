"""Checkpoint import: HF safetensors directories and GGUF files, into the stacked parameter tree.

Both formats go through one path: a *tensor source* answers "shape of tensor X" from the file headers
alone, and "rows r, columns c of tensor X" by reading only those bytes (safetensors through a memory map,
GGUF through `gguf`'s memory-mapped reader and dequantizer). Loading then

1. validates everything against the expected shapes before any array exists (missing directory, file,
   tensor, wrong shape, truncated file: `MixieError` naming the file and the tensor), and
2. builds each leaf with `jax.make_array_from_callback`, so every device shard is assembled from just
   the slices it needs, cast to `param_dtype` per tensor. At most one leaf's shard is held on the host
   at a time: a 7B checkpoint never needs two full copies in host memory.

Orientation: HF and GGUF store a linear layer as `[out, in]`; mixie stores `[in, out]`, with the layers
stacked on a leading axis (`mixie.model.llama.param_shapes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mixie.errors import MixieError
from mixie.model.llama import LlamaConfig, Params, config_from_hf, param_shapes

PathLike = str | os.PathLike

# mixie layer leaf -> per-layer tensor name (HF, GGUF); matrices are transposed on the way in.
_HF_LAYER = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}
_HF_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
           "lm_head": "lm_head.weight"}
_GGUF_LAYER = {
    "attn_norm": "blk.{i}.attn_norm.weight", "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight", "o": "blk.{i}.attn_output.weight", "mlp_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight", "down": "blk.{i}.ffn_down.weight",
}
_GGUF_TOP = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}


# ---------------------------------------------------------------------------------------------------
# Tensor sources: shapes from headers, lazy slices of single tensors.


class _Source:
  """Named tensors in `[out, in]` (file) orientation, read lazily."""

  def shape(self, name: str) -> tuple[int, ...] | None:
    """Shape of `name`, or None when absent."""
    raise NotImplementedError

  def file_of(self, name: str) -> str:
    """The file that holds (or should hold) `name`, for messages."""
    raise NotImplementedError

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """`tensor[index]` as a numpy array (float types as stored, or f32 for quantized GGUF)."""
    raise NotImplementedError


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
  """One `.safetensors` file: the JSON header parsed up front, tensors as views of a memory map.

  (`safetensors.safe_open(framework="numpy")` cannot return bfloat16, the dtype most Llama checkpoints
  use, so the simple, documented format is read directly: an 8-byte little-endian header length, a
  JSON header `{name: {dtype, shape, data_offsets}}`, then the raw bytes.)
  """

  def __init__(self, path: pathlib.Path, listed_in: pathlib.Path | None = None):
    self.path = path
    try:
      size = path.stat().st_size
      with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n <= 0 or 8 + n > size:
          raise ValueError("header length exceeds the file")
        header = json.loads(f.read(n))
    except FileNotFoundError:
      where = f" (listed in {listed_in})" if listed_in else ""
      raise MixieError(f"{path}: file not found{where}") from None
    except (ValueError, UnicodeDecodeError) as e:
      raise MixieError(f"{path}: not a valid safetensors file ({e})") from None
    header.pop("__metadata__", None)
    self.data_start = 8 + n
    self.data_size = size - self.data_start
    self.entries: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
      try:
        dt = e["dtype"]
        shape = tuple(int(s) for s in e["shape"])
        begin, end = (int(o) for o in e["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise MixieError(f"{path}: tensor {name!r} has a malformed header entry") from None
      if dt not in _ST_DTYPES:
        raise MixieError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
      np_dt = np.dtype(_ST_DTYPES[dt])
      if end - begin != math.prod(shape) * np_dt.itemsize:
        raise MixieError(f"{path}: tensor {name!r}: byte range does not match shape {shape} {dt}")
      if end > self.data_size:
        raise MixieError(f"{path}: tensor {name!r} lies past the end of the file "
                         "(truncated download?)")
      self.entries[name] = (np_dt, shape, begin, end)
    self._mm = None

  def array(self, name: str) -> np.ndarray:
    """A read-only, memory-mapped view of tensor `name` (no bytes read until sliced)."""
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    dt, shape, begin, end = self.entries[name]
    return self._mm[self.data_start + begin:self.data_start + end].view(dt).reshape(shape)


class _SafetensorsSource(_Source):
  """A HF checkpoint directory: one `model.safetensors`, or shards listed in an index."""

  def __init__(self, directory: pathlib.Path):
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
          raise TypeError
      except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise MixieError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
      files = {f: SafetensorsFile(directory / f, index) for f in sorted(set(weight_map.values()))}
      self.owner = {}
      for name, f in weight_map.items():
        if name in files[f].entries:
          self.owner[name] = files[f]
      self.default_file = str(index)
    elif single.exists():
      f = SafetensorsFile(single)
      self.owner = {name: f for name in f.entries}
      self.default_file = str(single)
    else:
      found = sorted(p.name for p in directory.glob("*.safetensors"))
      hint = f" (found {found}, but no index)" if found else ""
      raise MixieError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")

  def shape(self, name):
    f = self.owner.get(name)
    return None if f is None else f.entries[name][1]

  def file_of(self, name):
    f = self.owner.get(name)
    return str(f.path) if f is not None else self.default_file

  def read(self, name, index):
    return np.asarray(self.owner[name].array(name)[index])


def _truncation_checked_reader():
  """A `gguf.GGUFReader` that names the first tensor lying past the end of a truncated file."""
  import gguf

  class Reader(gguf.GGUFReader):

    def _build_tensors(self, start_offs, fields):
      for field in fields:
        _, name_data, _, dims, raw_dtype, offset = field.parts
        name = bytes(name_data).decode("utf-8", "replace")
        try:
          block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_dtype[0]))]
        except (ValueError, KeyError):
          raise _GGUFProblem(f"corrupt GGUF file: tensor {name!r} has an unknown ggml type "
                             f"{int(raw_dtype[0])}") from None
        n_bytes = int(np.prod(dims.astype(np.int64))) * type_size // block
        end = int(start_offs + offset[0]) + n_bytes
        if end > len(self.data):
          raise _GGUFProblem(f"truncated GGUF file: tensor {name!r} needs bytes up to {end}, the file "
                             f"has {len(self.data)}")
      super()._build_tensors(start_offs, fields)

  return Reader


class _GGUFProblem(Exception):
  pass


def open_gguf(path: PathLike):
  """A `gguf.GGUFReader` for `path` (memory-mapped); `MixieError` naming the file (and tensor) if bad."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise MixieError(f"{path}: GGUF file not found")
  try:
    return _truncation_checked_reader()(path)
  except _GGUFProblem as e:
    raise MixieError(f"{path}: {e}") from None
  except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
    raise MixieError(f"{path}: truncated or corrupt GGUF file (metadata unreadable: {e})") from None


def gguf_value(reader, key: str, default: Any = None, *, path: PathLike = "") -> Any:
  """A scalar, string or array metadata value of a GGUF file; `default` when absent (None: required)."""
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise MixieError(f"{path}: GGUF metadata key {key!r} is missing")
    return default
  try:
    return field.contents()
  except (ValueError, IndexError, UnicodeDecodeError) as e:
    raise MixieError(f"{path}: GGUF metadata key {key!r} is unreadable ({e})") from None


class _GGUFSource(_Source):
  """Tensors of a GGUF file, dequantized to f32 per row range; Q and K rows un-permuted.

  llama.cpp's converter reorders each head's rows of the Q and K projections from HF's "rotate half"
  RoPE layout to interleaved pairs: file row `(p, i)` of a head (pair p < h/2, i in {0, 1}) is HF row
  `i * h/2 + p`. Viewing the rows as `[heads, h/2, 2]` and swapping the last two axes restores HF's
  order.
  """

  def __init__(self, reader, path: pathlib.Path, cfg: LlamaConfig):
    self.path = path
    self.tensors = {t.name: t for t in reader.tensors}
    self.heads = {}
    for i in range(cfg.n_layers):
      self.heads[_GGUF_LAYER["q"].format(i=i)] = cfg.n_heads
      self.heads[_GGUF_LAYER["k"].format(i=i)] = cfg.n_kv_heads

  def shape(self, name):
    t = self.tensors.get(name)
    return None if t is None else tuple(int(d) for d in reversed(t.shape.tolist()))

  def file_of(self, name):
    return str(self.path)

  def read(self, name, index):
    import gguf

    t = self.tensors[name]
    rows = index[0]
    n_heads = self.heads.get(name)
    if n_heads is not None:  # permuted rows: dequantize all, undo the permutation, then slice
      w = gguf.dequantize(t.data, t.tensor_type)
      n_out = w.shape[0]
      h = n_out // n_heads
      w = w.reshape(n_heads, h // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
      return np.asarray(w[index])
    data = t.data[rows] if t.data.ndim > 1 else t.data
    w = gguf.dequantize(data, t.tensor_type)
    if t.data.ndim == 1:
      return np.asarray(w[index])
    return np.asarray(w[(slice(None),) + tuple(index[1:])])


# ---------------------------------------------------------------------------------------------------
# Building the parameter tree.


@dataclasses.dataclass(frozen=True)
class _Leaf:
  names: tuple[str, ...]  # one tensor per layer (stacked) or a single tensor
  stacked: bool
  transpose: bool  # file [out, in] -> mixie [in, out]


def _leaf_specs(cfg: LlamaConfig, layer_names: Mapping[str, str], top_names: Mapping[str, str]):
  specs = {"embed": _Leaf((top_names["embed"],), False, False),
           "final_norm": _Leaf((top_names["final_norm"],), False, False)}
  if not cfg.tie_embeddings:
    specs["lm_head"] = _Leaf((top_names["lm_head"],), False, True)
  for key, pattern in layer_names.items():
    specs[f"layers/{key}"] = _Leaf(tuple(pattern.format(i=i) for i in range(cfg.n_layers)), True,
                                   "norm" not in key)
  return specs


def _flat_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  shapes = param_shapes(cfg)
  flat = {k: v for k, v in shapes.items() if k != "layers"}
  flat.update({f"layers/{k}": v for k, v in shapes["layers"].items()})
  return flat


def _validate(cfg: LlamaConfig, specs, source: _Source) -> None:
  """Every tensor exists with the expected shape (headers only, nothing read)."""
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


def _resolve_shardings(shardings, cfg: LlamaConfig) -> dict[str, jax.sharding.Sharding]:
  """Flat `{key: Sharding}` from None (first local device), one Sharding, a tree, or `cfg -> tree`."""
  if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
    shardings = shardings(cfg)
  keys = _flat_shapes(cfg)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    return {k: shardings for k in keys}
  flat = {k: v for k, v in shardings.items() if k != "layers"}
  flat.update({f"layers/{k}": v for k, v in shardings.get("layers", {}).items()})
  missing = [k for k in keys if k not in flat]
  if missing:
    raise MixieError(f"shardings tree lacks entries for {missing}")
  return {k: flat[k] for k in keys}


def _build(cfg: LlamaConfig, specs, source: _Source, shardings) -> Params:
  """Each leaf via `make_array_from_callback`, reading only the slices each shard needs."""
  shapes = _flat_shapes(cfg)
  shard_of = _resolve_shardings(shardings, cfg)
  dt = np.dtype(jnp.dtype(cfg.param_dtype))
  flat = {}
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

    flat[key] = jax.make_array_from_callback(shape, shard_of[key], cb)
    memo.clear()
  params = {k: v for k, v in flat.items() if not k.startswith("layers/")}
  params["layers"] = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("layers/")}
  return params


def _read_block(source: _Source, leaf: _Leaf, idx: tuple[slice, ...], dt) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------------
# Public API.


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
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise MixieError(f"{cfg_path}: attention_bias/mlp_bias are not supported (Llama has no biases)")
  try:
    return config_from_hf(hf, **overrides)
  except ValueError as e:
    raise MixieError(f"{cfg_path}: {e}") from None
  except KeyError as e:
    raise MixieError(f"{cfg_path}: required field {e.args[0]!r} is missing") from None


def load_hf(path: PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
            attention_impl: str | None = None, shardings=None) -> tuple[LlamaConfig, Params]:
  """Loads an HF Llama checkpoint directory (`config.json` + `model.safetensors` or a sharded index).

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
  directory = pathlib.Path(path)
  cfg = hf_config(directory, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
  source = _SafetensorsSource(directory)
  top = dict(_HF_TOP)
  specs = _leaf_specs(cfg, _HF_LAYER, top)
  _validate(cfg, specs, source)
  return cfg, _build(cfg, specs, source, shardings)


def gguf_config(reader, path: PathLike = "", **overrides) -> LlamaConfig:
  """`LlamaConfig` from a GGUF file's `llama.*` metadata."""
  arch = gguf_value(reader, "general.architecture", path=path)
  if arch != "llama":
    raise MixieError(f"{path}: GGUF architecture {arch!r} is not supported (mixie reads 'llama')")
  g = lambda k, d=None: gguf_value(reader, f"llama.{k}", d, path=path)  # noqa: E731
  scaling = g("rope.scaling.type", "none")
  if scaling not in ("none", "") or "rope_freqs.weight" in {t.name for t in reader.tensors}:
    raise MixieError(f"{path}: GGUF rope scaling ({scaling!r} / rope_freqs.weight) is not supported; "
                     "load the HF safetensors checkpoint instead")
  n_heads = int(g("attention.head_count"))
  d_model = int(g("embedding_length"))
  tensors = {t.name for t in reader.tensors}
  vocab = g("vocab_size", -1)
  if vocab == -1:
    vocab = len(gguf_value(reader, "tokenizer.ggml.tokens", path=path))
  try:
    return LlamaConfig(
        vocab_size=int(vocab), d_model=d_model, n_layers=int(g("block_count")), n_heads=n_heads,
        n_kv_heads=int(g("attention.head_count_kv", n_heads)), d_ff=int(g("feed_forward_length")),
        head_dim=int(g("attention.key_length", d_model // n_heads)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors,
        max_seq_len=int(g("context_length", 2048)), **overrides)
  except ValueError as e:
    raise MixieError(f"{path}: inconsistent GGUF metadata ({e})") from None


def load_gguf(path: PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
              attention_impl: str | None = None, shardings=None, reader=None
              ) -> tuple[LlamaConfig, Params]:
  """Loads a Llama GGUF file (any quantization `gguf` can dequantize), e.g. the shipped SmolLM2.

  Same arguments as `load_hf`; `reader` may pass an already opened `open_gguf(path)`.
  """
  path = pathlib.Path(path)
  reader = reader if reader is not None else open_gguf(path)
  cfg = gguf_config(reader, path, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
  source = _GGUFSource(reader, path, cfg)
  specs = _leaf_specs(cfg, _GGUF_LAYER, _GGUF_TOP)
  _validate(cfg, specs, source)
  return cfg, _build(cfg, specs, source, shardings)


_FINGERPRINT_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim",
                       "rope_theta", "rope_scaling", "rms_eps", "tie_embeddings")


def fingerprint(cfg: LlamaConfig, params: Params) -> str:
  """A short stable hash of a base: its architecture plus a few parameter slices.

  Independent of compute dtype, param dtype and sharding (slices are hashed as bfloat16), so experts
  trained on a base in bf16 are recognised on the same base loaded in f32, but not on another base.
  """
  h = hashlib.sha256()
  arch = {f: getattr(cfg, f) for f in _FINGERPRINT_FIELDS}
  h.update(json.dumps(arch, sort_keys=True, default=list).encode())
  lay = params["layers"]
  probes = [params["embed"][:8, :16], params["embed"][-8:, -16:], params["final_norm"][:16],
            lay["q"][0, :8, :16], lay["k"][-1, -8:, -16:], lay["down"][cfg.n_layers // 2, :8, :16],
            lay["attn_norm"][-1, :16]]
  if "lm_head" in params:
    probes.append(params["lm_head"][:8, -16:])
  for x in probes:
    h.update(np.asarray(jax.device_get(x)).astype(ml_dtypes.bfloat16).tobytes())
  return h.hexdigest()[:16]

"""Tensor sources of checkpoint files: shapes from the headers alone, lazy slices of single tensors.

- `SafetensorsFile` / `SafetensorsSource`: one `.safetensors` file / an HF checkpoint directory (one
  file or shards listed in an index), read through a memory map.
- `open_gguf` / `GGUFSource`: a GGUF file through `gguf`'s memory-mapped reader and dequantizer (Q and
  K rows un-permuted); `gguf_value` reads its metadata.

Every problem (missing or truncated file, malformed header) is a `MixieError` naming the file and the
tensor. Tensors keep the file's `[out, in]` orientation; `mixie.model.checkpoint` builds parameters.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from mixie.errors import MixieError

PathLike = str | os.PathLike


class Source:
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

  def names(self) -> list[str]:
    """Every tensor name the source holds."""
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


class SafetensorsSource(Source):
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
    """See `Source.shape`."""
    f = self.owner.get(name)
    return None if f is None else f.entries[name][1]

  def file_of(self, name):
    """See `Source.file_of`."""
    f = self.owner.get(name)
    return str(f.path) if f is not None else self.default_file

  def read(self, name, index):
    """See `Source.read`."""
    return np.asarray(self.owner[name].array(name)[index])

  def names(self):
    """See `Source.names`."""
    return list(self.owner)


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


class GGUFSource(Source):
  """Tensors of a GGUF file, dequantized to f32 per row range; Q and K rows un-permuted; norm weights
  that llama.cpp stored as `offset + w` (Gemma) shifted back to `w`.

  llama.cpp's converter reorders each head's rows of the Q and K projections from HF's "rotate half"
  RoPE layout to interleaved pairs: file row `(p, i)` of a head (pair p < h/2, i in {0, 1}) is HF row
  `i * h/2 + p`. Viewing the rows as `[heads, h/2, 2]` and swapping the last two axes restores HF's
  order.
  """

  def __init__(self, reader, path: pathlib.Path, permuted_heads: Mapping[str, int],
               shifts: Mapping[str, float] | None = None):
    """`permuted_heads`: tensor name -> number of heads, for the Q and K tensors whose rows llama.cpp
    permuted; `shifts`: tensor name -> the offset llama.cpp added to it (subtracted here, in f32)."""
    self.path = path
    self.tensors = {t.name: t for t in reader.tensors}
    self.heads = dict(permuted_heads)
    self.shifts = dict(shifts or {})

  def names(self):
    """See `Source.names`."""
    return list(self.tensors)

  def shape(self, name):
    """See `Source.shape`."""
    t = self.tensors.get(name)
    return None if t is None else tuple(int(d) for d in reversed(t.shape.tolist()))

  def file_of(self, name):
    """See `Source.file_of`."""
    return str(self.path)

  def read(self, name, index):
    """See `Source.read`."""
    w = self._read(name, index)
    shift = self.shifts.get(name)
    return w if shift is None else np.asarray(w, np.float32) - np.float32(shift)

  def _read(self, name, index):
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

"""Paths and atomic writes. Paths may be local or `gs://` (through `etils.epath`).

Every file mixie writes goes to a temporary name first and is renamed into place, so a killed run
never leaves a file that looks complete but is not.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import numpy as np
from etils import epath

from mixie.errors import MixieError

PathLike = str | os.PathLike | epath.Path


def path(p: PathLike) -> epath.Path:
  """An `epath.Path` for a local or `gs://` path."""
  return epath.Path(p)


def atomic_write_bytes(p: PathLike, data: bytes) -> None:
  """Writes `data` to `p` via a temporary sibling and a rename."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.write_bytes(data)
  tmp.replace(p)  # replace, not rename: overwrites an existing file (atomic on POSIX)


def atomic_write_text(p: PathLike, text: str) -> None:
  """Writes `text` (UTF-8) atomically."""
  atomic_write_bytes(p, text.encode("utf-8"))


def atomic_write_json(p: PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON atomically."""
  atomic_write_text(p, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(p: PathLike) -> Any:
  """Reads a JSON file, raising `MixieError` naming the file when it is missing or corrupt."""
  p = path(p)
  if not p.exists():
    raise MixieError(f"{p}: file not found")
  try:
    return json.loads(p.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise MixieError(f"{p}: not valid JSON ({e})") from None


def save_arrays(p: PathLike, arrays: dict[str, np.ndarray]) -> None:
  """Saves named arrays as an uncompressed `.npz` atomically (loaded back without pickle)."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  atomic_write_bytes(p, buf.getvalue())


def load_arrays(p: PathLike) -> dict[str, np.ndarray]:
  """Loads a `.npz` written by `save_arrays`; never unpickles. Raises `MixieError` when unreadable."""
  p = path(p)
  if not p.exists():
    raise MixieError(f"{p}: file not found")
  try:
    with p.open("rb") as f:
      with np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
  except (ValueError, OSError, EOFError) as e:
    raise MixieError(f"{p}: corrupt or truncated array file ({e})") from None


def json_safe(x: Any) -> Any:
  """`x` made strict JSON: NaN -> None, +-inf -> "inf" / "-inf" (`float()` reads them back), numpy
  scalars and arrays -> Python numbers and lists; dicts, lists and tuples recursively."""
  if isinstance(x, dict):
    return {str(k): json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [json_safe(v) for v in x]
  if isinstance(x, (np.integer, np.bool_)):
    return x.item()
  if isinstance(x, (float, np.floating)):
    x = float(x)
    return None if x != x else ("inf" if x == float("inf") else "-inf" if x == float("-inf") else x)
  return x

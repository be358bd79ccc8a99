"""The expert store: a directory with one entry per trained expert.

Layout (local path or `gs://`):

    <dir>/topic_000042/weights.safetensors   the expert's tensors: "q.a" [l, d_in, r], "q.b" [l, r, d_out]...
    <dir>/topic_000042/meta.json             topic id, centroid, tokens seen, final loss, rank, alpha,
                                             targets, base fingerprint (written last: the entry's
                                             completion marker)

Every file is written atomically (temporary name, then rename), `meta.json` after the weights, and a
rewrite removes `meta.json` first: an entry without `meta.json` is incomplete and not listed. Weights are
safetensors (no code can run on load). An expert is bound to the base it was trained on: `load` refuses
an expert whose base fingerprint differs from the caller's (`mixie.model.checkpoint.fingerprint`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import safetensors.numpy

from mixie.errors import MixieError, check
from mixie.io import PathLike, atomic_write_bytes, atomic_write_json, path as _path, read_json

FORMAT = "mixie_expert/1"
WEIGHTS = "weights.safetensors"
META = "meta.json"
_ENTRY = re.compile(r"^topic_(\d+)$")
# meta fields every entry must carry
REQUIRED_META = ("topic", "rank", "alpha", "targets", "base_fingerprint")


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dicts of arrays -> {"a.b.c": numpy array}, on the host."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    check("." not in str(k), f"tree key {k!r} contains '.'")
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, name + "."))
    else:
      out[name] = np.asarray(jax.device_get(v))
  return out


def unflatten_tree(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Inverse of `flatten_tree`."""
  out: dict[str, Any] = {}
  for name, v in flat.items():
    node = out
    *parents, leaf = name.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def save_tree(p: PathLike, tree: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
  """Writes a nested dict of arrays as one safetensors file, atomically."""
  flat = {k: np.ascontiguousarray(v) for k, v in flatten_tree(tree).items()}
  atomic_write_bytes(p, safetensors.numpy.save(flat, metadata=dict(metadata or {}) or None))


def load_tree(p: PathLike) -> dict[str, Any]:
  """Reads a safetensors file written by `save_tree` (MixieError naming the file when unreadable)."""
  p = _path(p)
  if not p.exists():
    raise MixieError(f"{p}: file not found")
  try:
    flat = safetensors.numpy.load(p.read_bytes())
  except Exception as e:  # safetensors raises its own SafetensorError / OSError on corrupt headers
    raise MixieError(f"{p}: corrupt or truncated safetensors file ({e})") from None
  return unflatten_tree(flat)


def _expected_shapes(meta: Mapping[str, Any], tree: Mapping[str, Any]) -> list[str]:
  problems = []
  targets = list(meta["targets"])
  if sorted(tree) != sorted(targets):
    problems.append(f"projections {sorted(tree)} but meta targets {sorted(targets)}")
    return problems
  for proj in targets:
    ab = tree[proj]
    if sorted(ab) != ["a", "b"]:
      problems.append(f"{proj}: tensors {sorted(ab)}, expected ['a', 'b']")
      continue
    a, b = ab["a"], ab["b"]
    if a.ndim != 3 or b.ndim != 3 or a.shape[2] != meta["rank"] or b.shape[1] != meta["rank"] or \
        a.shape[0] != b.shape[0]:
      problems.append(f"{proj}: a{tuple(a.shape)} b{tuple(b.shape)} do not fit rank {meta['rank']}")
  return problems


class ExpertStore:
  """A directory of trained experts, one entry per topic (see the module docstring)."""

  def __init__(self, directory: PathLike):
    self.dir = _path(directory)

  def entry_dir(self, topic: int):
    """Directory of the expert of `topic` (it may not exist yet)."""
    return self.dir / f"topic_{int(topic):06d}"

  def write(self, topic: int, expert_params: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Writes (or replaces) the expert of `topic`: weights first, then `meta.json`.

    `meta` must hold at least rank, alpha, targets and base_fingerprint; `topic` and the format are
    added. Values must be JSON-able (numpy scalars and arrays are converted).
    """
    meta = dict(_jsonable(meta), topic=int(topic), format=FORMAT)
    missing = [k for k in REQUIRED_META if k not in meta]
    check(not missing, f"expert store: meta of topic {topic} lacks {missing}")
    tree = {p: {k: np.asarray(jax.device_get(v)) for k, v in ab.items()} for p, ab in expert_params.items()}
    problems = _expected_shapes(meta, tree)
    check(not problems, f"expert store: topic {topic}: " + "; ".join(problems))
    d = self.entry_dir(topic)
    d.mkdir(parents=True, exist_ok=True)
    if (d / META).exists():
      (d / META).unlink()
    # one metadata key only: safetensors writes its metadata map in no fixed order, and entries must be
    # byte-identical across runs (a resumed run rewrites them)
    save_tree(d / WEIGHTS, tree, metadata={"format": FORMAT})
    atomic_write_json(d / META, meta)

  def topics(self) -> list[int]:
    """Topic ids of the complete entries, ascending."""
    if not self.dir.exists():
      return []
    out = []
    for child in self.dir.iterdir():
      m = _ENTRY.match(child.name)
      if m and (child / META).exists():
        out.append(int(m.group(1)))
    return sorted(out)

  def __contains__(self, topic: int) -> bool:
    return (self.entry_dir(topic) / META).exists()

  def __len__(self) -> int:
    return len(self.topics())

  def meta(self, topic: int) -> dict[str, Any]:
    """The metadata of one expert (MixieError when the entry is missing or incomplete)."""
    d = self.entry_dir(topic)
    if not (d / META).exists():
      raise MixieError(f"{d}: no expert for topic {topic} in the store {self.dir} "
                       "(missing, or its write was interrupted)")
    meta = read_json(d / META)
    missing = [k for k in REQUIRED_META if k not in meta]
    check(not missing, f"{d / META}: corrupt expert metadata, missing {missing}")
    return meta

  def load(self, topic: int, expected_fingerprint: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(expert_params, meta)` of `topic` as numpy arrays.

    Refuses (MixieError) an expert trained on another base than `expected_fingerprint`; pass None to
    skip that check (inspection only).
    """
    meta = self.meta(topic)
    d = self.entry_dir(topic)
    if expected_fingerprint is not None and meta["base_fingerprint"] != expected_fingerprint:
      raise MixieError(
          f"{d}: the expert of topic {topic} was trained on base {meta['base_fingerprint']}, but the loaded "
          f"base is {expected_fingerprint}: an expert only works on the base it was trained on")
    tree = load_tree(d / WEIGHTS)
    problems = _expected_shapes(meta, tree)
    check(not problems, f"{d / WEIGHTS}: corrupt expert: " + "; ".join(problems))
    return tree, meta

  def load_stack(self, topics: Sequence[int], expected_fingerprint: str | None = None
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The experts of `topics` stacked on a leading axis (numpy), and their metas (each checked
    against `expected_fingerprint` as in `load`)."""
    check(len(topics) > 0, "expert store: load_stack needs at least one topic")
    trees, metas = zip(*(self.load(t, expected_fingerprint) for t in topics))
    shapes = {jax.tree.map(np.shape, t).__repr__() for t in trees}
    check(len(shapes) == 1, f"expert store {self.dir}: experts of topics {list(topics)} differ in shape "
                            "(rank or targets) and cannot be stacked")
    return jax.tree.map(lambda *xs: np.stack(xs), *trees), list(metas)


def _jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return _jsonable(np.asarray(x).tolist())
  if isinstance(x, np.generic):
    return x.item()
  return x


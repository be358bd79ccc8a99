"""The expert store: a directory with one entry per expert, and the one schema of an expert's metadata.

Layout (local path or `gs://`):

    <dir>/topic_000042/weights.safetensors   the expert's tensors: "q.a" [l, d_in, r], "q.b" [l, r, d_out]...
    <dir>/topic_000042/meta.json             its `ExpertMeta` (written last: the entry's completion marker)

Every file is written atomically (temporary name, then rename), `meta.json` after the weights, and a
rewrite removes `meta.json` first: an entry without `meta.json` is incomplete and not listed. Weights are
safetensors (no code can run on load). `ExpertStore.weights_file` / `meta_file` are the one place that
maps an expert id to its files.

Metadata has one writer (`ExpertMeta.to_json`, called by `ExpertStore.write`) and one reader
(`ExpertMeta.from_json`, which validates every field it knows and keeps the others in `extra`), in the
format `mixie_expert/1`. An expert fits a caller only when it was trained on the caller's base (its
`mixie.model.checkpoint.fingerprint`) and has the caller's LoRA rank, alpha and targets: `check_fits`,
applied by `ExpertStore.load`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import safetensors.numpy

from mixie.errors import ConfigError, MixieError, check
from mixie.io import PathLike, atomic_write_bytes, atomic_write_json, path as _path, read_json
from mixie.model.lora import LoraConfig

META_VERSION = 1
FORMAT = f"mixie_expert/{META_VERSION}"
WEIGHTS = "weights.safetensors"
META = "meta.json"
EXPERTS = "experts"  # the run's expert store under its work directory (`run_store`)
_ENTRY = re.compile(r"^topic_(\d+)$")
REQUIRED_META = ("rank", "alpha", "targets", "base_fingerprint")


# ---------------------------------------------------------------------------------------------------
# Metadata.


@dataclasses.dataclass(frozen=True)
class ExpertMeta:
  """What the store records about one expert (`meta.json`, format `FORMAT`).

  Build a new one with `ExpertMeta.new(lora, fingerprint, **fields)`; `ExpertStore.write` sets `topic`.
  """

  rank: int  # LoRA rank r
  alpha: float  # LoRA alpha: the update is scaled by alpha / r
  targets: tuple[str, ...]  # adapted projections, a subset of mixie.model.llama.PROJECTIONS
  base_fingerprint: str  # mixie.model.checkpoint.fingerprint of the base it was trained on
  topic: int = -1  # the id it is stored under
  # "expert" (a topic's), "lora_all" / "lora_all_wide" (the all-data baselines), "seed" (the seed adapter
  # branched experts start from: mixie.train.branch), "imported"
  kind: str = "expert"
  centroid: tuple[float, ...] | None = None  # routing centroid in the topics' embedding space
  merged_topics: tuple[int, ...] | None = None  # small topics merged into this one (routed to it)
  mode: str | None = None  # the training run that made it: "experts", "lora_all", "lora_all_wide", "seed"
  steps: int | None = None  # the run's step when the expert finished
  tokens_seen: int | None = None  # training tokens the expert saw
  final_loss: float | None = None  # its training loss at the last step
  budget: int | None = None  # its token budget
  topic_tokens: int | None = None  # tokens of its topic in the training split
  seq_len: int | None = None  # the length T of its training rows (its attention FLOPs: mixie.compute)
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # any other field, as written

  @classmethod
  def new(cls, lora: LoraConfig, base_fingerprint: str, **fields) -> "ExpertMeta":
    """The metadata of a new expert of shape `lora` on the base of `base_fingerprint`; `fields` are
    any others (unknown names are kept in `extra`), validated like a read."""
    d = {**fields, "rank": lora.rank, "alpha": float(lora.alpha), "targets": list(lora.targets),
         "base_fingerprint": base_fingerprint}
    return cls.from_json(_jsonable(d), where="new expert metadata")

  @classmethod
  def from_json(cls, d: Any, where: str = "expert metadata") -> "ExpertMeta":
    """Reads and validates a `meta.json` dict (MixieError naming `where` and the field)."""
    check(isinstance(d, Mapping), f"{where}: not a JSON object")
    fmt = d.get("format", FORMAT)  # stores of every mixie version so far carry FORMAT
    check(fmt == FORMAT, f"{where}: expert metadata of format {fmt!r}; this mixie reads {FORMAT!r}")
    missing = [k for k in REQUIRED_META if k not in d]
    check(not missing, f"{where}: corrupt expert metadata, missing {missing}")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    typed = {k: _field(k, d[k], where) for k in names if k in d}
    extra = {k: v for k, v in d.items() if k not in names and k != "format"}
    try:
      lora = LoraConfig(rank=typed["rank"], alpha=typed["alpha"], targets=typed["targets"])
    except ConfigError as e:
      raise MixieError(f"{where}: {e}") from None
    typed["targets"] = lora.targets
    return cls(**typed, extra=extra)

  def to_json(self) -> dict[str, Any]:
    """The `meta.json` dict (inverse of `from_json`); fields that are None are left out."""
    out = dict(self.extra)
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name != "extra" and v is not None:
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return {**out, "format": FORMAT}

  @property
  def lora(self) -> LoraConfig:
    """The expert's LoRA shape."""
    return LoraConfig(rank=self.rank, alpha=self.alpha, targets=self.targets)

  def has_shape(self, lora: LoraConfig) -> bool:
    """Whether the expert has `lora`'s rank, alpha and targets (what experts served together share)."""
    return (self.rank, self.alpha, self.targets) == (lora.rank, float(lora.alpha), tuple(lora.targets))


_INT = ("rank", "topic", "steps", "tokens_seen", "budget", "topic_tokens", "seq_len")
_STR = ("base_fingerprint", "kind", "mode")


def _field(name: str, v: Any, where: str) -> Any:
  """One known metadata field, type-checked and converted (tuples for lists)."""
  bad = MixieError(f"{where}: field {name!r} has the invalid value {v!r}")
  if name in _INT:
    if not isinstance(v, int) or isinstance(v, bool):
      raise bad
    return v
  if name in _STR:
    if not isinstance(v, str):
      raise bad
    return v
  if name in ("alpha", "final_loss"):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or (name == "alpha" and not math.isfinite(v)):
      raise bad
    return float(v)
  if name == "targets":
    if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) for t in v):
      raise bad
    return tuple(v)
  if name == "merged_topics":
    if not isinstance(v, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
      raise bad
    return tuple(v)
  if name == "centroid":
    if not isinstance(v, (list, tuple)) or not v or \
        not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
      raise bad
    return tuple(float(x) for x in v)
  raise AssertionError(name)  # every dataclass field is handled above


def check_fits(meta: ExpertMeta, where: str, *, fingerprint: str | None = None,
               lora: LoraConfig | None = None) -> None:
  """Refuses (MixieError) an expert trained on another base than `fingerprint`, or of another LoRA
  rank, alpha or targets than `lora` (None: that part is not checked)."""
  if fingerprint is not None and meta.base_fingerprint != fingerprint:
    raise MixieError(
        f"{where}: the expert of topic {meta.topic} was trained on base {meta.base_fingerprint}, but the "
        f"loaded base is {fingerprint}: an expert only works on the base it was trained on")
  if lora is not None and not meta.has_shape(lora):
    raise MixieError(f"{where}: expert of topic {meta.topic} has rank {meta.rank}, alpha {meta.alpha}, "
                     f"targets {list(meta.targets)}; the other experts have rank {lora.rank}, alpha "
                     f"{lora.alpha}, targets {list(lora.targets)}")


# ---------------------------------------------------------------------------------------------------
# Trees of arrays as safetensors.


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


def _shape_problems(meta: ExpertMeta, tree: Mapping[str, Any]) -> list[str]:
  """Why `tree` does not hold the tensors `meta` describes ([] = it does)."""
  if sorted(tree) != sorted(meta.targets):
    return [f"projections {sorted(tree)} but meta targets {sorted(meta.targets)}"]
  problems = []
  for proj in meta.targets:
    ab = tree[proj]
    if sorted(ab) != ["a", "b"]:
      problems.append(f"{proj}: tensors {sorted(ab)}, expected ['a', 'b']")
      continue
    a, b = ab["a"], ab["b"]
    if a.ndim != 3 or b.ndim != 3 or a.shape[2] != meta.rank or b.shape[1] != meta.rank or \
        a.shape[0] != b.shape[0]:
      problems.append(f"{proj}: a{tuple(a.shape)} b{tuple(b.shape)} do not fit rank {meta.rank}")
  return problems


# ---------------------------------------------------------------------------------------------------
# The store.


class ExpertStore:
  """A directory of experts, one entry per id (topic); see the module docstring."""

  def __init__(self, directory: PathLike):
    self.dir = _path(directory)

  def entry_dir(self, topic: int):
    """Directory of the expert of `topic` (it may not exist yet)."""
    return self.dir / f"topic_{int(topic):06d}"

  def weights_file(self, topic: int):
    """The weights file of expert `topic`."""
    return self.entry_dir(topic) / WEIGHTS

  def meta_file(self, topic: int):
    """The metadata file of expert `topic` (its presence marks a complete entry)."""
    return self.entry_dir(topic) / META

  def write(self, topic: int, expert_params: Mapping[str, Any], meta: ExpertMeta) -> ExpertMeta:
    """Writes (or replaces) the expert of `topic`: weights first, then its metadata (with `topic` set).
    Returns the metadata written."""
    check(isinstance(meta, ExpertMeta), f"expert store: the metadata of topic {topic} must be an "
                                        f"ExpertMeta (ExpertMeta.new), got {type(meta).__name__}")
    meta = dataclasses.replace(meta, topic=int(topic))
    tree = {p: {k: np.asarray(jax.device_get(v)) for k, v in ab.items()} for p, ab in expert_params.items()}
    problems = _shape_problems(meta, tree)
    check(not problems, f"expert store: topic {topic}: " + "; ".join(problems))
    self.entry_dir(topic).mkdir(parents=True, exist_ok=True)
    if self.meta_file(topic).exists():
      self.meta_file(topic).unlink()
    # one metadata key only: safetensors writes its metadata map in no fixed order, and entries must be
    # byte-identical across runs (a resumed run rewrites them)
    save_tree(self.weights_file(topic), tree, metadata={"format": FORMAT})
    atomic_write_json(self.meta_file(topic), meta.to_json())
    return meta

  def topics(self) -> list[int]:
    """Ids of the complete entries, ascending."""
    if not self.dir.exists():
      return []
    out = []
    for child in self.dir.iterdir():
      m = _ENTRY.match(child.name)
      if m and (child / META).exists():
        out.append(int(m.group(1)))
    return sorted(out)

  def __contains__(self, topic: int) -> bool:
    return self.meta_file(topic).exists()

  def __len__(self) -> int:
    return len(self.topics())

  def meta(self, topic: int) -> ExpertMeta:
    """The metadata of one expert (MixieError when the entry is missing, incomplete or corrupt)."""
    p = self.meta_file(topic)
    if not p.exists():
      raise MixieError(f"{self.entry_dir(topic)}: no expert for topic {topic} in the store {self.dir} "
                       "(missing, or its write was interrupted)")
    return dataclasses.replace(ExpertMeta.from_json(read_json(p), where=str(p)), topic=int(topic))

  def metas(self) -> dict[int, ExpertMeta]:
    """Every complete entry's metadata, by id (ascending)."""
    return {t: self.meta(t) for t in self.topics()}

  def lora(self, default: LoraConfig | None = None) -> LoraConfig:
    """The LoRA shape of the store's experts (its first expert's); `default` when the store is empty
    (ConfigError when there is no default either)."""
    topics = self.topics()
    if topics:
      return self.meta(topics[0]).lora
    check(default is not None, f"expert store {self.dir} holds no experts; train them first "
          "(python -m mixie.train) or pass lora=", ConfigError)
    return default

  def load(self, topic: int, fingerprint: str | None, lora: LoraConfig | None = None
           ) -> tuple[dict[str, Any], ExpertMeta]:
    """`(expert_params, meta)` of `topic` as numpy arrays, refused by `check_fits` unless it was trained
    on the base of `fingerprint` and (when given) has `lora`'s shape; None skips a check (inspection)."""
    meta = self.meta(topic)
    check_fits(meta, str(self.entry_dir(topic)), fingerprint=fingerprint, lora=lora)
    tree = load_tree(self.weights_file(topic))
    problems = _shape_problems(meta, tree)
    check(not problems, f"{self.weights_file(topic)}: corrupt expert: " + "; ".join(problems))
    return tree, meta

  def load_stack(self, topics: Sequence[int], fingerprint: str | None = None
                 ) -> tuple[dict[str, Any], list[ExpertMeta]]:
    """The experts of `topics` stacked on a leading axis (numpy), and their metas (each checked
    against `fingerprint` as in `load`)."""
    check(len(topics) > 0, "expert store: load_stack needs at least one topic")
    trees, metas = zip(*(self.load(t, fingerprint) for t in topics))
    shapes = {jax.tree.map(np.shape, t).__repr__() for t in trees}
    check(len(shapes) == 1, f"expert store {self.dir}: experts of topics {list(topics)} differ in shape "
                            "(rank or targets) and cannot be stacked")
    return jax.tree.map(lambda *xs: np.stack(xs), *trees), list(metas)


def run_store(workdir: PathLike, name: str = EXPERTS) -> ExpertStore:
  """A store of the run in `workdir`: its experts (`experts`), or a baseline's (`lora_all`)."""
  return ExpertStore(_path(workdir) / name)


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

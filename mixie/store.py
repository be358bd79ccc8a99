"""The expert store: a versioned directory of experts, and the one schema of an expert's metadata.

Layout (local path or `gs://`; the files and the commit protocol are `mixie.store_versions`'):

    <dir>/CURRENT                              the current generation's number: the commit point
    <dir>/generations/000007.json              generation 7: expert id -> weight file, hash, flags, meta
    <dir>/blobs/<sha256>.safetensors           an expert's tensors: "q.a" [l, d_in, r], "q.b" [l, r, d_out]...
    <dir>/staging/<session>/topic_000042.json  written, not committed yet (a training run's experts)

Each change (a finished training run, an import, `python -m mixie.experts add / retrain / retire /
restore / rollback`) commits a new generation by an atomic switch of CURRENT; earlier generations stay
readable (`history`, `at`) and any can be made current again (`commit(start=N)`). Weight files are
immutable and named by their content's hash, so generations share the files of unchanged experts, and
`load` refuses bytes that do not match the recorded hash. A store written before generations
(`<dir>/topic_000042/{weights.safetensors,meta.json}`) reads as generation 0 and is migrated, its files
untouched, by the first commit. Weights are safetensors (no code can run on load).
`ExpertStore.weights_file` / `meta_file` are the one place that maps an expert id to its files.

Metadata has one writer (`ExpertMeta.to_json`, called by `Staging.write`) and one reader
(`ExpertMeta.from_json`, which validates every field it knows and keeps the others in `extra`), in the
format `mixie_expert/1`. An expert fits a caller only when it was trained on the caller's base (its
`mixie.model.checkpoint.fingerprint`) and has the caller's LoRA rank, alpha and targets: `check_fits`,
applied by `ExpertStore.load`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import uuid
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from mixie import store_versions as sv
from mixie.errors import ConfigError, MixieError, check
from mixie.io import PathLike, path as _path
from mixie.model.lora import LoraConfig
# re-exported: the tree files were written through mixie.store before mixie.trees existed
from mixie.trees import flatten_tree, load_tree, save_tree, tree_bytes, tree_from_bytes, unflatten_tree  # noqa: F401

META_VERSION = 1
FORMAT = f"mixie_expert/{META_VERSION}"
META = "meta.json"
EXPERTS = "experts"  # the run's expert store under its work directory (`run_store`)
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
  """A versioned directory of experts, one entry per id (topic) in each generation; see the module
  docstring. `ExpertStore(dir)` reads the current generation (each call reads CURRENT once);
  `ExpertStore(dir, generation=N)` / `store.at(N)` is a read-only view pinned to generation N."""

  def __init__(self, directory: PathLike, generation: int | None = None):
    self.dir = _path(directory)
    self.pinned = None if generation is None else int(generation)
    self._gens: dict[int, sv.Generation] = {}

  # --- generations ---------------------------------------------------------------------------------

  def current_generation(self) -> int:
    """The number of the generation that is current on disk now (reads CURRENT; 0: none committed)."""
    return sv.read_current(self.dir)

  @property
  def generation(self) -> int:
    """The generation this handle reads: its pinned one, else the current one."""
    return self.pinned if self.pinned is not None else self.current_generation()

  def snapshot(self, generation: int | None = None) -> sv.Generation:
    """Generation `generation` (default: `self.generation`), read once per handle."""
    n = self.generation if generation is None else int(generation)
    if n not in self._gens or n == 0:  # generation 0 (the layout before generations) is not frozen
      self._gens[n] = sv.read_generation(self.dir, n)
    return self._gens[n]

  def at(self, generation: int | None = None) -> "ExpertStore":
    """A read-only view pinned to `generation` (default: the current one)."""
    n = self.current_generation() if generation is None else int(generation)
    check(n == 0 or sv.manifest_path(self.dir, n).exists() and n <= self.current_generation(),
          f"expert store {self.dir}: there is no generation {n} (history: python -m mixie.experts history)")
    view = ExpertStore(self.dir, generation=n)
    view._gens = self._gens
    return view

  def history(self) -> list[sv.Generation]:
    """Every generation up to the current one, oldest first (generation 0 when it holds experts)."""
    cur = self.current_generation()
    gens = [self.snapshot(n) for n in range(1, cur + 1)]
    g0 = self.snapshot(0)
    return ([g0] if g0.entries or not gens else []) + gens

  @property
  def extra(self) -> dict[str, Any]:
    """What the expert lifecycle keeps with the generation (`mixie.lifecycle`)."""
    return dict(self.snapshot().extra)

  # --- reading (one generation per call) -------------------------------------------------------------

  def entry_dir(self, topic: int):
    """The directory of expert `topic` in the layout before generations (read as generation 0)."""
    return self.dir / f"topic_{int(topic):06d}"

  def _entry(self, topic: int, gen: sv.Generation | None = None) -> sv.Entry:
    gen = gen if gen is not None else self.snapshot()
    if int(topic) not in gen.entries:
      raise MixieError(f"{self.dir}: no expert for topic {topic} in generation {gen.number} of the store "
                       "(missing, or its write was never committed)")
    return gen.entries[int(topic)]

  def weights_file(self, topic: int):
    """The weights file of expert `topic` in this handle's generation."""
    return self.dir / self._entry(topic).file

  def meta_file(self, topic: int):
    """The file holding the metadata of expert `topic`: the generation's manifest (generation 0:
    the entry's meta.json)."""
    gen = self.snapshot()
    self._entry(topic, gen)
    return gen.manifest_file() or self.entry_dir(topic) / META

  def sha256(self, topic: int) -> str:
    """The SHA-256 of expert `topic`'s weights file (as recorded; computed for generation 0)."""
    return sv.file_sha256(self.dir, self._entry(topic))

  def topics(self) -> list[int]:
    """Ids of the experts of the generation (retired ones included), ascending."""
    return sorted(self.snapshot().entries)

  def retired(self) -> set[int]:
    """Ids of the retired experts (the router does not send queries to them; weights kept)."""
    return self.snapshot().retired

  def __contains__(self, topic: int) -> bool:
    return int(topic) in self.snapshot().entries

  def __len__(self) -> int:
    return len(self.snapshot().entries)

  def meta(self, topic: int) -> ExpertMeta:
    """The metadata of one expert (MixieError when it is missing or corrupt)."""
    return self._meta(self.snapshot(), topic)

  def _meta(self, gen: sv.Generation, topic: int) -> ExpertMeta:
    self._entry(topic, gen)
    where = str(gen.manifest_file() or self.entry_dir(topic) / META)
    return dataclasses.replace(ExpertMeta.from_json(gen.full_meta(int(topic)), where=where),
                               topic=int(topic))

  def metas(self) -> dict[int, ExpertMeta]:
    """Every expert's metadata, by id (ascending)."""
    gen = self.snapshot()
    return {t: self._meta(gen, t) for t in sorted(gen.entries)}

  def lora(self, default: LoraConfig | None = None) -> LoraConfig:
    """The LoRA shape of the store's experts (its first expert's); `default` when the store is empty
    (ConfigError when there is no default either)."""
    gen = self.snapshot()
    if gen.entries:
      return self._meta(gen, min(gen.entries)).lora
    check(default is not None, f"expert store {self.dir} holds no experts; train them first "
          "(python -m mixie.train) or pass lora=", ConfigError)
    return default

  def load(self, topic: int, fingerprint: str | None, lora: LoraConfig | None = None
           ) -> tuple[dict[str, Any], ExpertMeta]:
    """`(expert_params, meta)` of `topic` as numpy arrays, refused by `check_fits` unless it was trained
    on the base of `fingerprint` and (when given) has `lora`'s shape; None skips a check (inspection).
    The file's bytes must match the hash the generation recorded."""
    return self._load(self.snapshot(), topic, fingerprint, lora)

  def _load(self, gen, topic, fingerprint, lora):
    meta = self._meta(gen, topic)
    entry = gen.entries[int(topic)]
    f = self.dir / entry.file
    where = str(self.entry_dir(topic)) if gen.number == 0 else f"{self.dir} (generation {gen.number})"
    check_fits(meta, where, fingerprint=fingerprint, lora=lora)
    if not f.exists():
      raise MixieError(f"{f}: weights file of expert {topic} (generation {gen.number}) is missing")
    data = f.read_bytes()
    if entry.sha256 is not None and hashlib.sha256(data).hexdigest() != entry.sha256:
      raise MixieError(f"{f}: corrupt weights file of expert {topic}: its bytes do not match the hash "
                       f"generation {gen.number} recorded")
    tree = tree_from_bytes(data, f)
    problems = _shape_problems(meta, tree)
    check(not problems, f"{f}: corrupt expert: " + "; ".join(problems))
    return tree, meta

  def load_stack(self, topics: Sequence[int], fingerprint: str | None = None
                 ) -> tuple[dict[str, Any], list[ExpertMeta]]:
    """The experts of `topics` stacked on a leading axis (numpy), and their metas (each checked
    against `fingerprint` as in `load`)."""
    check(len(topics) > 0, "expert store: load_stack needs at least one topic")
    gen = self.snapshot()
    trees, metas = zip(*(self._load(gen, t, fingerprint, None) for t in topics))
    shapes = {jax.tree.map(np.shape, t).__repr__() for t in trees}
    check(len(shapes) == 1, f"expert store {self.dir}: experts of topics {list(topics)} differ in shape "
                            "(rank or targets) and cannot be stacked")
    return jax.tree.map(lambda *xs: np.stack(xs), *trees), list(metas)

  # --- writing ---------------------------------------------------------------------------------------

  def staging(self, session: str) -> "Staging":
    """A staging session: experts written into it are stored at once but become part of the store
    only when the session is committed (a training run commits when it finishes)."""
    check(self.pinned is None, f"expert store {self.dir}: a view pinned to generation {self.pinned} is "
                               "read-only")
    return Staging(self, session)

  def write(self, topic: int, expert_params: Mapping[str, Any], meta: ExpertMeta) -> ExpertMeta:
    """Writes (or replaces) the expert of `topic` and commits it as a new generation. Returns the
    metadata written."""
    s = self.staging(f"write-{uuid.uuid4().hex[:12]}")
    out = s.write(topic, expert_params, meta)
    s.commit(f"write expert {topic}")
    return out

  def commit(self, message: str, *, session: str | None = None, retire: Sequence[int] = (),
             restore: Sequence[int] = (), remove: Sequence[int] = (), extra: Mapping[str, Any] | None = None,
             start: int | None = None) -> int | None:
    """Commits a new generation and makes it current: the current one's experts (or generation
    `start`'s: a rollback), with `session`'s staged experts written in, `retire` / `restore` flags
    changed, `remove`d experts left out (their files stay) and `extra` (None: kept). Returns its
    number, or None when nothing changed (no new generation; a committed session's records are
    cleared either way)."""
    check(self.pinned is None, f"expert store {self.dir}: a view pinned to generation {self.pinned} is "
                               "read-only")
    return sv.commit(self.dir, message, session=session, retire=retire, restore=restore, remove=remove,
                     extra=extra, start=start)


class Staging:
  """Experts written into the store but not committed yet (`ExpertStore.staging`)."""

  def __init__(self, store: ExpertStore, session: str):
    self.store, self.session = store, session
    sv.staging_dir(store.dir, session)  # validates the name

  def write(self, topic: int, expert_params: Mapping[str, Any], meta: ExpertMeta) -> ExpertMeta:
    """Stores the expert of `topic` (weights as a content-addressed file, then its staging record).
    Returns the metadata written."""
    check(isinstance(meta, ExpertMeta), f"expert store: the metadata of topic {topic} must be an "
                                        f"ExpertMeta (ExpertMeta.new), got {type(meta).__name__}")
    meta = dataclasses.replace(meta, topic=int(topic))
    tree = {p: {k: np.asarray(jax.device_get(v)) for k, v in ab.items()} for p, ab in expert_params.items()}
    problems = _shape_problems(meta, tree)
    check(not problems, f"expert store: topic {topic}: " + "; ".join(problems))
    # one metadata key only: safetensors writes its metadata map in no fixed order, and an expert must
    # be byte-identical across runs (a resumed run rewrites it; an unchanged expert keeps its hash)
    sv.stage(self.store.dir, self.session, topic, tree_bytes(tree, {"format": FORMAT}), meta.to_json())
    return meta

  def topics(self) -> list[int]:
    """Ids of the experts staged so far."""
    return list(sv.staged(self.store.dir, self.session))

  def commit(self, message: str, **changes) -> int | None:
    """Commits the staged experts (`ExpertStore.commit(message, session=..., **changes)`)."""
    return self.store.commit(message, session=self.session, **changes)


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

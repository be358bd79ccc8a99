"""The versioned layout of an expert store: immutable content-addressed weight files, one manifest per
generation, and a CURRENT pointer whose atomic switch commits a generation (`mixie.store.ExpertStore` is
the API; this module owns the files).

    <store>/CURRENT                             the current generation's number ("7\\n"): the commit point
    <store>/generations/000007.json             the manifest of generation 7 (format `FORMAT`)
    <store>/blobs/<sha256>.safetensors          an expert's weights, named by the SHA-256 of their bytes
    <store>/blobs/<sha256>.npy                  a generation's routing centroids (float64 [m, d])
    <store>/staging/<session>/topic_000042.json an expert written but not committed yet (a training run's)
    <store>/topic_000042/{weights.safetensors,meta.json}   a store written before generations existed

Manifest (`generations/NNNNNN.json`, JSON):

    {"format": "mixie_store/1", "generation": 7, "parent": 6, "time": <unix s>, "message": "...",
     "base_fingerprint": "<fingerprint all experts share>" | null (none, or they differ),
     "centroids": "blobs/<sha256>.npy" | null,
     "experts": [{"topic": 3, "file": "blobs/<sha256>.safetensors", "sha256": "...", "bytes": 123,
                  "retired": false, "centroid": <row in the centroid matrix> | null,
                  "meta": {<the ExpertMeta JSON (mixie_expert/1) without its centroid>}}, ...],
     "extra": {...}}   (what the expert lifecycle keeps with a generation: `mixie.lifecycle`)

Reading the current generation costs three files whatever the number of experts (CURRENT, the
manifest, and the centroid matrix only when a centroid is asked for). A generation lists every expert,
so generations share the blobs of unchanged experts: an expert nobody retrained keeps its file and hash.

Commit (`commit_generation`), under an exclusive lock on `<store>/.lock` (local disk; `fcntl.flock`,
released by the kernel when the writer dies): the new weight files are already written (blobs and
staging records, each to a temporary name, fsync'd, renamed); the manifest of generation N+1 is written
the same way (overwriting an orphan N+1 a killed commit may have left: no reader ever saw it, since
readers follow CURRENT and history stops at it); then CURRENT is written to a temporary name, fsync'd,
renamed over CURRENT, and the directory fsync'd. A process killed anywhere before the rename leaves
generation N current and whole. The environment variable `PAUSE_ENV` (tests) names a file that a commit
creates right before the switch and then waits while it exists.

On `gs://`: there is no lock (run one writer at a time) and no fsync; the guarantees relied on are that
a GCS object write is atomic (readers see the old CURRENT or the new one, never part of one) and that
reads after a completed write are strongly consistent, so a manifest written before CURRENT is readable
by anyone who reads the new CURRENT.

A store without CURRENT is generation 0: the entries of the layout before generations (each
`topic_NNNNNN/` with `meta.json`, its completion marker), or nothing. The first commit migrates it
without touching those files: generation 1 refers to them where they are, with their hashes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import time
import uuid
from typing import Any, Iterator, Mapping

import numpy as np

from mixie.errors import MixieError, check
from mixie.io import PathLike, atomic_write_bytes, note_write, path as _path, read_json

FORMAT = "mixie_store/1"
CURRENT = "CURRENT"
GENERATIONS = "generations"
BLOBS = "blobs"
STAGING = "staging"
LEGACY_WEIGHTS = "weights.safetensors"
LEGACY_META = "meta.json"
PAUSE_ENV = "MIXIE_STORE_PAUSE_BEFORE_SWITCH"
LOCK_TIMEOUT_S = 120.0
_ENTRY = re.compile(r"^topic_(\d+)$")
_RECORD = re.compile(r"^topic_(\d+)\.json$")
_SESSION = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One expert of a generation: its weight file (relative to the store), hash, size, flags and
  metadata (`meta`: the ExpertMeta JSON; without its centroid when `centroid` is a matrix row)."""

  topic: int
  file: str
  sha256: str | None  # None only in generation 0 of a store written before generations
  bytes: int
  meta: Mapping[str, Any]
  retired: bool = False
  centroid: int | None = None  # row of the generation's centroid matrix


@dataclasses.dataclass
class Generation:
  """One generation of a store (read-only)."""

  dir: Any  # the store directory
  number: int
  parent: int | None
  time: float | None
  message: str
  entries: dict[int, Entry]
  extra: dict[str, Any]
  base_fingerprint: str | None = None
  centroids_file: str | None = None
  _centroids: np.ndarray | None = None

  def centroid_matrix(self) -> np.ndarray | None:
    """The generation's centroid matrix `[m, d]` (float64), read once."""
    if self.centroids_file is None:
      return None
    if self._centroids is None:
      p = self.dir / self.centroids_file
      check(p.exists(), f"{p}: centroid file of generation {self.number} is missing")
      with p.open("rb") as f:
        data = f.read()
      check(hashlib.sha256(data).hexdigest() == _sha_of_name(self.centroids_file),
            f"{p}: corrupt centroid file (its bytes do not match its name's hash)")
      self._centroids = np.load(io.BytesIO(data), allow_pickle=False)
    return self._centroids

  def full_meta(self, topic: int) -> dict[str, Any]:
    """The ExpertMeta JSON of `topic`, centroid included."""
    e = self.entries[topic]
    if e.centroid is None:
      return dict(e.meta)
    return {**e.meta, "centroid": self.centroid_matrix()[e.centroid].tolist()}

  @property
  def retired(self) -> set[int]:
    """Ids of the retired experts."""
    return {t for t, e in self.entries.items() if e.retired}

  def manifest_file(self):
    """The manifest of this generation (None for generation 0)."""
    return manifest_path(self.dir, self.number) if self.number > 0 else None


def _sha_of_name(name: str) -> str:
  return _path(name).name.split(".")[0]


def manifest_path(directory, number: int):
  """Where the manifest of generation `number` lives."""
  return _path(directory) / GENERATIONS / f"{int(number):06d}.json"


def is_local(p) -> bool:
  """Whether `p` is on the local file system (fsync, rename and flock work)."""
  return "://" not in str(p)


# ---------------------------------------------------------------------------------------------------
# Durable writes and the writers' lock.


def durable_write_bytes(p: PathLike, data: bytes) -> None:
  """Writes `data` to `p` atomically and durably: a temporary sibling, fsync, rename, fsync of the
  directory (local disk); one object write on remote stores (atomic there)."""
  p = _path(p)
  if not is_local(p):
    atomic_write_bytes(p, data)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = os.fspath(p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.fspath(p))
  fsync_dir(p.parent)
  note_write(p)  # MIXIE_WRITE_LOG (atomic_write_bytes notes its own)


def fsync_dir(d) -> None:
  """fsync of a local directory (makes renames in it durable); nothing on remote stores."""
  if is_local(d):
    fd = os.open(os.fspath(d), os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def writer_lock(directory) -> Iterator[None]:
  """Exclusive lock of the store's writers (local disk); nothing on remote stores (one writer)."""
  d = _path(directory)
  if not is_local(d):
    yield
    return
  import fcntl  # POSIX only; imported where it is used so that gs:// stores work on any platform

  d.mkdir(parents=True, exist_ok=True)
  fd = os.open(os.fspath(d / ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
  note_write(d / ".lock")
  try:
    t0 = time.time()
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        check(time.time() - t0 < LOCK_TIMEOUT_S, f"{d}: another process has been committing to this "
              f"expert store for {LOCK_TIMEOUT_S:.0f} s ({d / '.lock'}); try again when it is done")
        time.sleep(0.05)
    yield
  finally:
    os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------------------------
# Blobs and staging.


def write_blob(directory, data: bytes, suffix: str) -> tuple[str, str]:
  """Stores `data` content-addressed; returns `(path relative to the store, sha256)`. An existing blob
  of the same hash is kept (blobs are written whole under their final name, so it is complete)."""
  sha = hashlib.sha256(data).hexdigest()
  rel = f"{BLOBS}/{sha}{suffix}"
  p = _path(directory) / rel
  if not (p.exists() and p.stat().length == len(data)):
    durable_write_bytes(p, data)
  return rel, sha


def staging_dir(directory, session: str):
  """The folder of a staging session."""
  check(bool(_SESSION.match(session)), f"expert store: staging session name {session!r} may only hold "
                                       "letters, digits, '_', '-' and '.'")
  return _path(directory) / STAGING / session


def stage(directory, session: str, topic: int, weights: bytes, meta_json: Mapping[str, Any]) -> Entry:
  """Writes an expert's weights as a blob and its staging record (the weights first)."""
  rel, sha = write_blob(directory, weights, ".safetensors")
  entry = Entry(topic=int(topic), file=rel, sha256=sha, bytes=len(weights), meta=dict(meta_json))
  rec = {"topic": entry.topic, "file": rel, "sha256": sha, "bytes": entry.bytes, "meta": entry.meta}
  durable_write_bytes(staging_dir(directory, session) / f"topic_{int(topic):06d}.json",
                      (json.dumps(rec, indent=1, sort_keys=True) + "\n").encode())
  return entry


def staged(directory, session: str) -> dict[int, Entry]:
  """The staged experts of a session, by id (their metas carry their centroids)."""
  d = staging_dir(directory, session)
  if not d.exists():
    return {}
  out = {}
  for child in d.iterdir():
    m = _RECORD.match(child.name)
    if m:
      r = read_json(child)
      check(isinstance(r, dict) and {"file", "sha256", "bytes", "meta"} <= set(r),
            f"{child}: corrupt staging record")
      out[int(m.group(1))] = Entry(topic=int(m.group(1)), file=r["file"], sha256=r["sha256"],
                                   bytes=int(r["bytes"]), meta=r["meta"])
  return dict(sorted(out.items()))


def clear_staging(directory, session: str) -> None:
  """Removes a committed session's records (blobs stay: a generation refers to them)."""
  d = staging_dir(directory, session)
  if d.exists():
    d.rmtree()


# ---------------------------------------------------------------------------------------------------
# Reading.


def read_current(directory) -> int:
  """The current generation's number (0: no generation was ever committed)."""
  p = _path(directory) / CURRENT
  if not p.exists():
    return 0
  text = p.read_text().strip()
  check(text.isdigit(), f"{p}: corrupt generation pointer {text[:40]!r} (a number expected)")
  return int(text)


def legacy_generation(directory) -> Generation:
  """Generation 0: the complete entries of the layout before generations (or none)."""
  d = _path(directory)
  entries = {}
  if d.exists():
    for child in d.iterdir():
      m = _ENTRY.match(child.name)
      if m and (child / LEGACY_META).exists():
        t = int(m.group(1))
        w = child / LEGACY_WEIGHTS
        entries[t] = Entry(topic=t, file=f"{child.name}/{LEGACY_WEIGHTS}", sha256=None,
                           bytes=w.stat().length if w.exists() else 0,
                           meta=read_json(child / LEGACY_META))
  msg = "the layout before generations (implicit)" if entries else "empty store"
  return Generation(dir=d, number=0, parent=None, time=None, message=msg,
                    entries=dict(sorted(entries.items())), extra={})


def read_generation(directory, number: int) -> Generation:
  """Generation `number` of the store (0: `legacy_generation`)."""
  if number == 0:
    return legacy_generation(directory)
  d = _path(directory)
  p = manifest_path(d, number)
  check(p.exists(), f"{p}: generation {number} of the expert store {d} does not exist")
  m = read_json(p)
  check(isinstance(m, dict) and m.get("format") == FORMAT,
        f"{p}: not an expert-store manifest of format {FORMAT!r}")
  check(m.get("generation") == number, f"{p}: holds generation {m.get('generation')}, not {number}")
  entries = {}
  try:
    for r in m["experts"]:
      t = int(r["topic"])
      entries[t] = Entry(topic=t, file=r["file"], sha256=r["sha256"], bytes=int(r["bytes"]),
                         meta=r["meta"], retired=bool(r.get("retired", False)), centroid=r.get("centroid"))
  except (KeyError, TypeError, ValueError) as e:
    raise MixieError(f"{p}: corrupt manifest ({type(e).__name__}: {e})") from None
  return Generation(dir=d, number=number, parent=m.get("parent"), time=m.get("time"),
                    message=m.get("message", ""), entries=entries, extra=dict(m.get("extra") or {}),
                    base_fingerprint=m.get("base_fingerprint"), centroids_file=m.get("centroids"))


def file_sha256(directory, entry: Entry) -> str:
  """The hash of an entry's weight file (recorded, or computed for generation 0's files)."""
  if entry.sha256 is not None:
    return entry.sha256
  p = _path(directory) / entry.file
  check(p.exists(), f"{p}: weight file of expert {entry.topic} is missing")
  return hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Writing a generation.


def _centroid_rows(metas: Mapping[int, Mapping[str, Any]]) -> tuple[np.ndarray | None, dict[int, int]]:
  """The centroids of `metas` as one matrix and each expert's row; (None, {}) when there are none or
  their dimensions differ (then they stay inside the metadata)."""
  cents = {t: m["centroid"] for t, m in metas.items() if m.get("centroid") is not None}
  if not cents or len({len(c) for c in cents.values()}) != 1:
    return None, {}
  rows = {t: i for i, t in enumerate(cents)}
  return np.asarray(list(cents.values()), np.float64), rows


def commit_generation(directory, parent: Generation, entries: Mapping[int, Entry],
                      extra: Mapping[str, Any], message: str) -> Generation:
  """Writes generation `parent.number + 1` with `entries` (metas with their centroids) and makes it
  current (see the module docstring). The caller holds `writer_lock`."""
  d = _path(directory)
  number = parent.number + 1
  metas = {t: dict(e.meta) for t, e in sorted(entries.items())}
  matrix, rows = _centroid_rows(metas)
  cents_rel = None
  if matrix is not None:
    buf = io.BytesIO()
    np.save(buf, matrix, allow_pickle=False)
    cents_rel, _ = write_blob(d, buf.getvalue(), ".npy")
  fps = {m.get("base_fingerprint") for m in metas.values()}
  experts = []
  for t, e in sorted(entries.items()):
    meta = {k: v for k, v in metas[t].items() if not (k == "centroid" and t in rows)}
    sha = file_sha256(d, e)
    experts.append({"topic": t, "file": e.file, "sha256": sha, "bytes": e.bytes, "retired": e.retired,
                    "centroid": rows.get(t), "meta": meta})
  manifest = {"format": FORMAT, "generation": number, "parent": parent.number, "time": time.time(),
              "message": message, "base_fingerprint": fps.pop() if len(fps) == 1 else None,
              "centroids": cents_rel, "experts": experts, "extra": dict(extra)}
  durable_write_bytes(manifest_path(d, number), _manifest_text(manifest).encode())
  _pause_before_switch(number)
  durable_write_bytes(d / CURRENT, f"{number}\n".encode())  # the switch: generation `number` is current
  return read_generation(d, number)


def _manifest_text(manifest: Mapping[str, Any]) -> str:
  """The manifest as JSON with one line per field and per expert (diffable, and compact at scale)."""
  head = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(manifest.items())
          if k != "experts"]
  experts = ",\n".join(json.dumps(e, sort_keys=True) for e in manifest["experts"])
  return "{\n" + ",\n".join(head + [f'"experts": [\n{experts}\n]']) + "\n}\n"


def _pause_before_switch(number: int) -> None:
  """Test hook (`PAUSE_ENV`): announce the pending switch in that file, then wait while it exists."""
  marker = os.environ.get(PAUSE_ENV)
  if not marker:
    return
  p = _path(marker)
  p.write_text(f"{number}\n")
  while p.exists():
    time.sleep(0.05)


def same_content(a: Mapping[int, Entry], b: Mapping[int, Entry]) -> bool:
  """Whether two sets of entries (metas with centroids) hold the same experts, files and flags."""
  if a.keys() != b.keys():
    return False
  for t in a:
    x, y = a[t], b[t]
    if (x.file, x.retired, json.dumps(x.meta, sort_keys=True)) != \
        (y.file, y.retired, json.dumps(y.meta, sort_keys=True)):
      return False
    if x.sha256 is not None and y.sha256 is not None and x.sha256 != y.sha256:
      return False
  return True


def commit(directory, message: str, *, session: str | None = None, retire=(), restore=(), remove=(),
           extra: Mapping[str, Any] | None = None, start: int | None = None) -> int | None:
  """`ExpertStore.commit`: under the writers' lock, the current generation's entries (or generation
  `start`'s), with the session's staged experts, retire / restore flags, `remove`d experts and `extra`
  (None: kept), committed as a new generation unless nothing changed. Returns its number or None."""
  d = _path(directory)
  with writer_lock(d):
    parent = read_generation(d, read_current(d))
    src = parent if start is None else read_generation(d, int(start))
    entries = with_full_metas(src)
    if session is not None:
      for t, e in staged(d, session).items():
        entries[t] = dataclasses.replace(e, retired=entries[t].retired if t in entries else False)
    for flag, ids in ((True, retire), (False, restore), (None, remove)):
      for t in ids:
        check(int(t) in entries, f"expert store {d}: no expert {t} in generation {src.number} "
                                 f"(experts: {sorted(entries)})")
        if flag is None:
          del entries[int(t)]  # its file stays: earlier generations refer to it
        else:
          entries[int(t)] = dataclasses.replace(entries[int(t)], retired=flag)
    new_extra = dict(src.extra if extra is None else extra)
    n = None
    if not (same_content(entries, with_full_metas(parent)) and new_extra == parent.extra):
      n = commit_generation(d, parent, entries, new_extra, message).number
    if session is not None:
      clear_staging(d, session)
  return n


def with_full_metas(gen: Generation) -> dict[int, Entry]:
  """The entries of `gen` with their centroids back inside their metas (what a commit takes)."""
  return {t: dataclasses.replace(e, meta=gen.full_meta(t), centroid=None) for t, e in gen.entries.items()}

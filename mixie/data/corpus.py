"""Corpus sources: the shipped Wikipedia summaries, JSONL, plain-text directories and TFDS datasets, and
`wiki_stdlib` (the summaries mixed with this interpreter's standard library: `mixie.data.stdlib_corpus`).

Documents come in source order (files sorted by name), except the shipped summaries (and wiki_stdlib),
which are ordered by a hash of their title because the file itself is sorted by topic.

Every source streams `Document`s through the same filter:
- the text is Unicode-NFC normalised and stripped of leading/trailing whitespace;
- empty / whitespace-only, non-UTF-8 (undecodable bytes or lone surrogates), malformed (bad JSON,
  non-string text) and exact-duplicate documents are dropped and counted in a stats dict, with where
  the first unusable record is (`corpus_report` prints it all); when more than `data.max_bad_fraction`
  of the records read are unusable (duplicates are not), the corpus is refused with that location;
- the document id is the first 16 hex digits of blake2b(normalised text), so ids do not depend on file
  order, and exact duplicates are exactly the documents whose id was already seen;
- a document is held out when blake2b(f"{heldout_seed}:{id}") / 2**64 < heldout_fraction: stable under
  reordering, adding or removing other documents. No later stage trains on held-out documents.

`iter_documents(data_cfg)` streams (TFDS and big JSONL never sit in memory whole; only the 8-byte ids
seen so far are kept for de-duplication); `load_corpus(data_cfg)` materialises up to `max_docs`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gzip
import hashlib
import json
import unicodedata
from typing import Any, Iterable, Iterator

import numpy as np

from mixie import assets
from mixie.data import stdlib_corpus
from mixie.errors import ConfigError, MixieError, check
from mixie.io import path as _path

SOURCES = ("wiki_summaries", "jsonl", "text", "tfds", "wiki_stdlib")
_BUILTIN = ("wiki_summaries", "wiki_stdlib")  # sources that need no data.path
_GLOB_CHARS = "*?["
_STAT_KEYS = ("read", "kept", "heldout", "empty", "duplicate", "non_utf8", "malformed", "missing_text")
# why a record is dropped; every cause but "duplicate" makes the record unusable ("bad")
DROP_CAUSES = {"empty": "empty text", "duplicate": "exact duplicate", "non_utf8": "not UTF-8",
               "malformed": "bad JSON or non-string text", "missing_text": "no text field"}
BAD_CAUSES = tuple(k for k in DROP_CAUSES if k != "duplicate")


@dataclasses.dataclass(frozen=True)
class Document:
  """One kept document: `id` (16 hex), normalised `text`, optional reference `label`, `title`."""
  id: str
  text: str
  label: str | None
  title: str
  heldout: bool


@dataclasses.dataclass
class Corpus:
  """A materialised corpus; row i of every field is document i (in source order)."""
  ids: list[str]
  texts: list[str]
  labels: list[str] | None  # reference topic labels (for NMI/ARI), None when the source has none
  titles: list[str]
  heldout: np.ndarray  # bool [N]
  stats: dict[str, Any]

  def __len__(self) -> int:
    return len(self.ids)

  def train_indices(self) -> np.ndarray:
    """Row indices of the training documents (int64 [N_train])."""
    return np.flatnonzero(~self.heldout)

  def heldout_indices(self) -> np.ndarray:
    """Row indices of the held-out documents (int64 [N_heldout])."""
    return np.flatnonzero(self.heldout)

  def subset(self, idx: Iterable[int]) -> "Corpus":
    """The documents at row indices `idx`, in that order (stats are kept)."""
    idx = [int(i) for i in idx]
    return Corpus(
        ids=[self.ids[i] for i in idx], texts=[self.texts[i] for i in idx],
        labels=None if self.labels is None else [self.labels[i] for i in idx],
        titles=[self.titles[i] for i in idx], heldout=self.heldout[np.asarray(idx, np.int64)],
        stats=dict(self.stats))

  def split(self) -> tuple["Corpus", "Corpus"]:
    """(train, heldout) views of this corpus."""
    return self.subset(self.train_indices()), self.subset(self.heldout_indices())

  def label_ids(self) -> tuple[np.ndarray, list[str]]:
    """Labels as int ids (int32 [N]) and the sorted label names; `MixieError` when there are none."""
    check(self.labels is not None, "this corpus has no reference labels (set data.label_field)")
    names = sorted(set(self.labels))
    lut = {n: i for i, n in enumerate(names)}
    return np.asarray([lut[l] for l in self.labels], np.int32), names


def normalize_text(text: str) -> str:
  """The normalised form documents are stored, hashed and de-duplicated in: NFC, outer whitespace off."""
  return unicodedata.normalize("NFC", text).strip()


def doc_id(normalized_text: str) -> str:
  """Deterministic document id: first 16 hex digits of blake2b of the normalised text's UTF-8."""
  return hashlib.blake2b(normalized_text.encode("utf-8"), digest_size=8).hexdigest()


def is_heldout(doc_id_: str, fraction: float, seed: int) -> bool:
  """Whether a document id falls in the held-out split (hash of seed and id below `fraction`)."""
  if fraction <= 0.0:
    return False
  h = hashlib.blake2b(f"{seed}:{doc_id_}".encode("ascii"), digest_size=8).digest()
  return int.from_bytes(h, "big") / 2.0**64 < fraction


def validate_data_config(data_cfg) -> None:
  """Checks the `data` config section before any work; raises `ConfigError` naming the field."""
  check(data_cfg.source in SOURCES,
        f"data.source={data_cfg.source!r}: must be one of {', '.join(SOURCES)}", ConfigError)
  if data_cfg.source not in _BUILTIN:
    check(bool(data_cfg.path), f"data.path is required with data.source={data_cfg.source!r}", ConfigError)
  check(0.0 <= float(data_cfg.heldout_fraction) < 1.0,
        f"data.heldout_fraction={data_cfg.heldout_fraction}: must be in [0, 1)", ConfigError)
  check(int(data_cfg.max_docs) >= 0, f"data.max_docs={data_cfg.max_docs}: must be >= 0", ConfigError)
  if data_cfg.source in ("jsonl", "tfds"):
    check(bool(data_cfg.text_field), "data.text_field must name the field holding the text", ConfigError)
  check(0.0 <= _max_bad_fraction(data_cfg) <= 1.0,
        f"data.max_bad_fraction={data_cfg.get('max_bad_fraction')}: must be in [0, 1]", ConfigError)


def _max_bad_fraction(data_cfg) -> float:
  """`data.max_bad_fraction`; a section without the field (built by hand) sets no limit."""
  return float(data_cfg.get("max_bad_fraction", 1.0))


# --- raw sources: yield (text | None, label | None, title, problem, where) --------------------------
# `text` is a str (maybe not yet normalised) or None; `problem` is None or a stats key naming why the
# record is unusable ("non_utf8", "malformed", "missing_text"); `where` locates the record for messages
# (file:line for JSONL).

_Raw = tuple[str | None, str | None, str, str | None, str]


def _decode(b: bytes) -> str | None:
  try:
    return b.decode("utf-8")
  except UnicodeDecodeError:
    return None


def _wiki_raw() -> Iterator[_Raw]:
  p = assets.wiki_summaries_json()
  try:
    data = json.loads(p.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise MixieError(f"{p}: not valid UTF-8 JSON ({e})") from None
  check(isinstance(data, dict), f"{p}: expected a JSON object title -> summary")
  recs = []
  for title, rec in data.items():
    where = f"{p} entry {str(title)!r}"
    if not isinstance(rec, dict) or not isinstance(rec.get("extract"), str):
      recs.append((None, None, str(title), "malformed", where))
    else:
      recs.append((rec["extract"], str(rec.get("topic", "")), str(rec.get("title", title)), None, where))
  # The file is sorted by topic, so "the first max_docs" would be one topic: order by a hash of the
  # title instead (deterministic), so that any prefix is a uniform sample of all topics.
  recs.sort(key=lambda r: hashlib.blake2b(r[2].encode("utf-8", "replace"), digest_size=8).digest())
  yield from recs


def _glob_files(spec: str, patterns: tuple[str, ...], what: str) -> list:
  """Files named by `spec`: a file, a directory (searched recursively for `patterns`) or a glob."""
  if any(c in spec for c in _GLOB_CHARS):
    check("**" not in spec, f"data.path={spec!r}: recursive '**' globs are not supported; give the "
                            "directory instead (it is searched recursively)", ConfigError)
    parts = spec.split("/")
    i = next(i for i, s in enumerate(parts) if any(c in s for c in _GLOB_CHARS))
    base = "/".join(parts[:i]) or ("/" if spec.startswith("/") else ".")
    files = sorted(p for p in _path(base).glob("/".join(parts[i:])) if p.is_file())
    check(bool(files), f"data.path={spec!r}: no {what} file matches this pattern", ConfigError)
    return files
  p = _path(spec)
  check(p.exists(), f"data.path={spec!r}: no such file or directory", ConfigError)
  if p.is_dir():
    files = sorted(root / name for root, _, names in p.walk() for name in names
                   if any(fnmatch.fnmatch(name, pat) for pat in patterns))
    check(bool(files), f"data.path={spec!r}: directory holds no {what} files ({', '.join(patterns)})")
    return files
  return [p]


def _get_field(rec: Any, field: str) -> Any:
  for key in field.split("/"):
    if not isinstance(rec, dict) or key not in rec:
      return None
    rec = rec[key]
  return rec


def _label_str(v: Any) -> str | None:
  if v is None:
    return None
  if isinstance(v, bytes):
    return _decode(v) or v.decode("utf-8", "replace")
  if isinstance(v, np.ndarray) and v.ndim == 0:
    v = v.item()
  return str(v)


def _jsonl_raw(files: list, text_field: str, label_field: str) -> Iterator[_Raw]:
  for f in files:
    with f.open("rb") as fh:
      stream = gzip.GzipFile(fileobj=fh) if f.name.endswith(".gz") else fh
      for line_no, line in enumerate(stream, 1):
        if not line.strip():
          continue
        title, where = f"{f.name}:{line_no}", f"{f}:{line_no}"
        s = _decode(line)
        if s is None:
          yield None, None, title, "non_utf8", where
          continue
        try:
          rec = json.loads(s)
        except json.JSONDecodeError:
          yield None, None, title, "malformed", where
          continue
        text = _get_field(rec, text_field)
        if text is None:
          yield None, None, title, "missing_text", where
          continue
        if not isinstance(text, str):
          yield None, None, title, "malformed", where
          continue
        t = _get_field(rec, "title")
        yield (text, _label_str(_get_field(rec, label_field)) if label_field else None,
               t if isinstance(t, str) else title, None, where)


def _text_raw(files: list, root: str) -> Iterator[_Raw]:
  root_s = str(_path(root))
  for f in files:
    title = str(f)[len(root_s):].lstrip("/") or f.name
    s = _decode(f.read_bytes())
    yield (s, None, title, None if s is not None else "non_utf8", str(f))


def _tfds_raw(name: str, split: str, data_dir: str, text_field: str, label_field: str,
              block: int = 256) -> Iterator[_Raw]:
  import tensorflow_datasets as tfds

  try:
    src = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # TFDS raises many types here; the user fixes name/split/data_dir
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise MixieError(f"data.path={name!r} (tfds, split={split!r}, data_dir={data_dir!r}): "
                     f"cannot open the dataset: {first}") from None
  int2str = None
  if label_field:
    feat = _get_field(dict(src.dataset_info.features), label_field)
    int2str = getattr(feat, "int2str", None)
  n = len(src)
  for start in range(0, n, block):
    recs = src.__getitems__(list(range(start, min(start + block, n))))
    for j, rec in enumerate(recs):
      where = f"{name}/{split}[{start + j}]"
      title = _get_field(rec, "title")
      title = _label_str(title) if title is not None else where
      text = _get_field(rec, text_field)
      if text is None:
        yield None, None, title, "missing_text", where
        continue
      if isinstance(text, np.ndarray) and text.ndim == 0:
        text = text.item()
      if isinstance(text, bytes):
        text = _decode(text)
        if text is None:
          yield None, None, title, "non_utf8", where
          continue
      if not isinstance(text, str):
        yield None, None, title, "malformed", where
        continue
      label = None
      if label_field:
        v = _get_field(rec, label_field)
        label = int2str(int(v)) if (int2str is not None and v is not None) else _label_str(v)
      yield text, label, title, None, where


def _raw_source(data_cfg) -> Iterator[_Raw]:
  """Resolves files (failing now, not at the first `next`) and returns the raw record stream."""
  src = data_cfg.source
  if src in _BUILTIN:
    assets.wiki_summaries_json()  # fails now if the asset package is missing
    return _wiki_raw() if src == "wiki_summaries" else stdlib_corpus.wiki_stdlib_raw(_wiki_raw())
  if src == "jsonl":
    files = _glob_files(data_cfg.path, ("*.jsonl", "*.jsonl.gz"), "JSONL")
    return _jsonl_raw(files, data_cfg.text_field, data_cfg.label_field)
  if src == "text":
    p = _path(data_cfg.path)
    check(p.exists() and p.is_dir(), f"data.path={data_cfg.path!r}: no such directory (data.source=text)",
          ConfigError)
    return _text_raw(_glob_files(data_cfg.path, ("*.txt",), ".txt"), data_cfg.path)
  return _tfds_raw(data_cfg.path, data_cfg.split, data_cfg.data_dir, data_cfg.text_field,
                   data_cfg.label_field)


def check_corpus(data_cfg) -> None:
  """The corpus the `data` section names is there: its files resolve (or its TFDS dataset opens),
  without reading a document. `ConfigError` / `MixieError` naming the field or path."""
  validate_data_config(data_cfg)
  raw = _raw_source(data_cfg)  # files are resolved here
  if data_cfg.source == "tfds":
    next(iter(raw), None)  # opens the dataset (first records only)


def _describe(data_cfg) -> str:
  if data_cfg.source == "wiki_stdlib":
    return "the shipped Wikipedia summaries + this interpreter's standard library"
  return "the shipped Wikipedia summaries" if data_cfg.source == "wiki_summaries" else (
      f"data.path={data_cfg.path!r} ({data_cfg.source})")


def iter_documents(data_cfg, stats: dict[str, Any] | None = None) -> Iterator[Document]:
  """Streams the kept documents of the corpus the `data` config section names.

  Config problems and a missing path raise now; `stats` (if given) is updated in place with counts
  (read, kept, heldout, empty, duplicate, non_utf8, malformed, missing_text) and `first_bad` (where
  and why the first unusable record was dropped, or None). When the stream ends with no document
  kept, or with more than `data.max_bad_fraction` of the records read unusable, it raises
  `MixieError` with those counts and the first unusable record's location.
  """
  validate_data_config(data_cfg)
  raw = _raw_source(data_cfg)
  stats = {} if stats is None else stats
  for k in _STAT_KEYS:
    stats.setdefault(k, 0)
  if data_cfg.source == "wiki_stdlib":  # the interpreter version and sizes the corpus depends on
    stats.update(stdlib_corpus.source_info())
  stats["max_docs_reached"] = False
  stats.setdefault("first_bad", None)
  return _filter(raw, data_cfg, stats)


def _filter(raw: Iterator[_Raw], data_cfg, stats: dict[str, Any]) -> Iterator[Document]:
  max_docs = int(data_cfg.max_docs)
  frac, seed = float(data_cfg.heldout_fraction), int(data_cfg.get("heldout_seed", 0))
  seen: set[int] = set()

  def bad(cause: str, where: str) -> None:
    stats[cause] += 1
    if stats["first_bad"] is None:
      stats["first_bad"] = {"where": where, "cause": cause}

  for text, label, title, problem, where in raw:
    if max_docs and stats["kept"] >= max_docs:
      stats["max_docs_reached"] = True
      break
    stats["read"] += 1
    if problem is not None:
      bad(problem, where)
      continue
    norm = normalize_text(text)
    if not norm:
      bad("empty", where)
      continue
    try:
      i = doc_id(norm)
    except UnicodeEncodeError:  # lone surrogates (e.g. "\ud800" escapes in JSON)
      bad("non_utf8", where)
      continue
    key = int(i, 16)
    if key in seen:
      stats["duplicate"] += 1
      continue
    seen.add(key)
    held = is_heldout(i, frac, seed)
    stats["kept"] += 1
    stats["heldout"] += int(held)
    yield Document(id=i, text=norm, label=label, title=title, heldout=held)
  if stats["kept"] == 0:
    dropped = ", ".join(f"{k}={stats[k]}" for k in _STAT_KEYS[3:] if stats[k])
    raise MixieError(f"empty corpus: {_describe(data_cfg)} has no usable document "
                     f"({stats['read']} read" + (f"; dropped {dropped})" if dropped else ")") +
                     _first_bad(stats))
  n_bad, limit = sum(stats[k] for k in BAD_CAUSES), _max_bad_fraction(data_cfg)
  if n_bad > limit * stats["read"]:
    raise MixieError(
        f"{_describe(data_cfg)}: {n_bad} of {stats['read']} records are unusable ({_causes(stats, BAD_CAUSES)}), "
        f"more than data.max_bad_fraction={limit:g} of them{_first_bad(stats)}. Fix or remove those "
        "records, or raise data.max_bad_fraction")


def _causes(stats: dict[str, Any], keys) -> str:
  return ", ".join(f"{stats[k]} {DROP_CAUSES[k]}" for k in keys if stats.get(k))


def _first_bad(stats: dict[str, Any]) -> str:
  fb = stats.get("first_bad")
  return f"; the first is {fb['where']} ({DROP_CAUSES[fb['cause']]})" if fb else ""


def corpus_report(data_cfg, stats: dict[str, Any]) -> str:
  """One line: records read, kept (held out) and dropped by cause, and the first unusable record."""
  dropped = sum(stats.get(k, 0) for k in DROP_CAUSES)
  line = (f"{_describe(data_cfg)}: {stats['read']} records read, {stats['kept']} kept "
          f"({stats['heldout']} held out"
          f"{', stopped at data.max_docs' if stats.get('max_docs_reached') else ''}), ")
  if not dropped:
    return line + "none dropped"
  return line + f"{dropped} dropped: {_causes(stats, DROP_CAUSES)}{_first_bad(stats)}"


def load_corpus(data_cfg) -> Corpus:
  """Reads the whole corpus (at most `data.max_docs` documents) into memory."""
  stats: dict[str, Any] = {}
  ids, texts, labels, titles, held = [], [], [], [], []
  for d in iter_documents(data_cfg, stats):
    ids.append(d.id)
    texts.append(d.text)
    labels.append(d.label)
    titles.append(d.title)
    held.append(d.heldout)
  has_labels = any(l is not None for l in labels)
  return Corpus(ids=ids, texts=texts,
                labels=[l if l is not None else "" for l in labels] if has_labels else None,
                titles=titles, heldout=np.asarray(held, bool), stats=stats)

"""The clustered dataset: one TFDS dataset in ArrayRecord files, written and read without TensorFlow.

Features per document: `tokens` (int32 [n], the document's token ids without BOS/EOS), `topic`
(int32, its cluster id) and `doc_id` (the corpus id). Splits `train` and `heldout`.

How it is written (tfds 4.9.10, checked with TensorFlow absent): a `GeneratorBasedBuilder` subclass
with `file_format="array_record"` and `disable_shuffling=True`. TFDS serialises examples with its own
protobuf code and writes ArrayRecord through `array_record`; TensorFlow is never imported (a test
asserts it). `tfds.dataset_builders.store_as_tfds_dataset` is not used: its adhoc builder checks
`isinstance(ds, tf.data.Dataset)`, which imports TensorFlow. With shuffling disabled, record i of a
split is the i-th record its generator yielded, so a side index (topic and length of every record)
can be kept next to the TFDS files; the loader uses it to find a topic's documents and count tokens
without reading any record.

On-disk layout of `out_dir`:

    tfds/mixie_clustered/1.0.0/      the TFDS dataset (dataset_info.json, features.json,
        mixie_clustered-{train,heldout}.array_record-NNNNN-of-MMMMM)
    index-{train,heldout}.npz        topic int32 [N], length int32 [N], in record order
    manifest.json                    written last: the completion marker (record/token counts,
                                     byte size of every shard, num_topics, caller metadata)

Atomicity: TFDS writes all shards into `tfds/mixie_clustered/incomplete.*` and renames the folder into
place when every split is done; the indices are written atomically; `manifest.json` comes last. A
rewrite deletes `manifest.json` first. So a killed run leaves a folder without a manifest, which
`open_dataset` reports as partially written; `write_dataset` simply rewrites it. A shard truncated or
replaced later is caught by its byte size on open, and undecodable records by a `MixieError` on read.

Read back with `open_dataset(dir, split)` (a random-access source that also works as
`grain.MapDataset.source(...)`), or with plain TFDS: `tfds.data_source("mixie_clustered",
data_dir=f"{dir}/tfds", split="train")` / `tfds.builder_from_directory(...)`.
"""

from __future__ import annotations

import array
import contextlib
import inspect
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mixie.errors import MixieError, check
from mixie.io import atomic_write_json, load_arrays, path as _path, read_json, save_arrays

FORMAT = "mixie_clustered/1"
BUILDER_NAME = "mixie_clustered"
DATASET_VERSION = "1.0.0"
SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"


def _tfds():
  import tensorflow_datasets as tfds  # slow import; only where needed
  return tfds


def _builder_class():
  tfds = _tfds()

  class MixieClustered(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Documents grouped by topic: token ids, topic id, document id."""
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "tokens (int32 [n]), topic (int32), doc_id (text)."}
    # No checksums file: TFDS 4.9.10 would look for one next to this module, and on Python >= 3.9
    # that lookup needs the `importlib_resources` backport for a builder defined inside a package.
    code_path = None

    def __init__(self, *, split_records: Mapping[str, Iterable[dict]],
                 on_record: Callable[[str, int, int], None], **kwargs):
      self._split_records = split_records
      self._on_record = on_record
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="mixie clustered corpus: each document's token ids, topic id and document id.",
          features=tfds.features.FeaturesDict({
              "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
              "topic": tfds.features.Scalar(dtype=np.int32),
              "doc_id": tfds.features.Text(),
          }),
          disable_shuffling=True)  # record order = generation order (the side index relies on it)

    # tfds announces every preparation ("Downloading and preparing dataset Unknown size...", "...
    # downloaded and prepared to ...") with a print of its own; nothing is downloaded here, and mixie
    # logs the step itself.
    def _log_download_bytes(self):
      pass

    def _log_download_done(self):
      pass

    def _split_generators(self, dl_manager):
      del dl_manager
      return {name: self._generate_examples(name, recs) for name, recs in self._split_records.items()}

    def _generate_examples(self, split, records):
      for i, rec in enumerate(records):
        tokens, topic, did = rec["tokens"], int(rec["topic"]), str(rec["doc_id"])
        tokens = np.asarray(tokens)
        check(tokens.ndim == 1 and (tokens.size == 0 or np.issubdtype(tokens.dtype, np.integer)),
              f"write_dataset: record {i} of split {split!r} (doc {did}): tokens must be a 1-D "
              f"integer array, got {tokens.dtype}{list(tokens.shape)}")
        self._on_record(split, topic, int(tokens.size))
        yield i, {"tokens": tokens.astype(np.int32), "topic": np.int32(topic), "doc_id": did}

  return MixieClustered


@contextlib.contextmanager
def _tfds_bars_off():
  """tfds's own progress bars (generating, shuffling, writing) off while it writes a local dataset, so
  that they do not interleave with mixie's own; the previous setting is restored after."""
  tfds = _tfds()
  was = getattr(tfds.core.utils.tqdm_utils, "_active", True)  # tfds keeps the switch in this module
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(was)


def tfds_dir(out_dir) -> Any:
  """The TFDS dataset folder inside a clustered-dataset directory."""
  return _path(out_dir) / "tfds" / BUILDER_NAME / DATASET_VERSION


def dataset_status(out_dir) -> str:
  """"complete" (manifest present), "partial" (files but no manifest: a killed run) or "missing"."""
  d = _path(out_dir)
  if (d / MANIFEST).exists():
    return "complete"
  if d.exists() and any(d.iterdir()):
    return "partial"
  return "missing"


def _clear(out_dir) -> None:
  d = _path(out_dir)
  if (d / MANIFEST).exists():
    (d / MANIFEST).unlink()  # first: from here on a kill leaves a "partial" dataset
  if (d / "tfds").exists():
    (d / "tfds").rmtree()
  for s in SPLITS:
    if (d / f"index-{s}.npz").exists():
      (d / f"index-{s}.npz").unlink()


def write_dataset(out_dir, split_records: Mapping[str, Iterable[dict]], *, num_topics: int,
                  max_shard_mb: float = 1024.0, num_shards: int | None = None,
                  metadata: Mapping[str, Any] | None = None) -> dict:
  """Writes the clustered dataset into `out_dir`, replacing whatever is there; returns the manifest.

  `split_records` maps a split name ("train", "heldout") to an iterable of records
  `{"tokens": int [n], "topic": int in [0, num_topics), "doc_id": str}`; the iterables are consumed
  one after the other, lazily. Shards hold at most `max_shard_mb` MiB (or exactly `num_shards`
  shards per split). `metadata` (JSON-able) is stored in the manifest.
  """
  tfds = _tfds()
  check(num_topics > 0, f"write_dataset: num_topics={num_topics} must be > 0")
  unknown = set(split_records) - set(SPLITS)
  check(not unknown, f"write_dataset: unknown split(s) {sorted(unknown)}; use {SPLITS}")
  _clear(out_dir)
  d = _path(out_dir)
  d.mkdir(parents=True, exist_ok=True)
  idx = {s: (array.array("i"), array.array("i")) for s in split_records}
  # TFDS refuses a split without examples: peek at each split and leave empty ones out of TFDS.
  nonempty = {}
  for s, recs in split_records.items():
    it = iter(recs)
    first = next(it, None)
    if first is not None:
      nonempty[s] = itertools.chain([first], it)
  check(bool(nonempty), f"write_dataset: no records to write to {d} (every split is empty)")

  def on_record(split: str, topic: int, n: int) -> None:
    check(0 <= topic < num_topics,
          f"write_dataset: split {split!r} record {len(idx[split][0])}: topic {topic} is not in "
          f"[0, {num_topics})")
    idx[split][0].append(topic)
    idx[split][1].append(n)

  max_bytes = int(max_shard_mb * 2**20)
  dl_cfg = tfds.download.DownloadConfig(
      num_shards=num_shards, max_shard_size=max_bytes, min_shard_size=min(max_bytes, 64 * 2**20))
  builder = _builder_class()(split_records=nonempty, on_record=on_record,
                             data_dir=str(d / "tfds"), file_format="array_record")
  try:
    with _tfds_bars_off():
      builder.download_and_prepare(download_dir=str(d / "tfds" / "downloads"), download_config=dl_cfg)
  except BaseException:
    if (d / "tfds").exists():
      (d / "tfds").rmtree()
    raise
  if (d / "tfds" / "downloads").exists():
    (d / "tfds" / "downloads").rmtree()
  splits = {}
  tdir = tfds_dir(d)
  for s, (topics, lengths) in idx.items():
    topic_n = np.frombuffer(topics, np.int32) if len(topics) else np.zeros(0, np.int32)
    length_n = np.frombuffer(lengths, np.int32) if len(lengths) else np.zeros(0, np.int32)
    save_arrays(d / f"index-{s}.npz", {"topic": topic_n, "length": length_n})
    shards = []
    if s in nonempty:
      info = builder.info.splits[s]
      shards = [f.name for f in info.filepaths]
      check(int(info.num_examples) == topic_n.size,
            f"{tdir}: TFDS wrote {info.num_examples} records for split {s!r}, expected {topic_n.size}")
    splits[s] = {"num_records": int(topic_n.size), "num_tokens": int(length_n.sum(dtype=np.int64)),
                 "shards": {n: (tdir / n).stat().length for n in shards}}
  manifest = {"format": FORMAT, "num_topics": int(num_topics),
              "tfds_dir": f"tfds/{BUILDER_NAME}/{DATASET_VERSION}", "splits": splits,
              "metadata": dict(metadata or {})}
  atomic_write_json(d / MANIFEST, manifest)  # last: marks the dataset complete
  return manifest


def read_manifest(out_dir) -> dict:
  """The manifest of a complete dataset; `MixieError` when missing, partial or not ours."""
  d = _path(out_dir)
  status = dataset_status(d)
  check(status != "missing", f"{d}: no clustered dataset here (run `python -m mixie.cluster` first)")
  check(status != "partial",
        f"{d}: the clustered dataset is incomplete (partially written by a killed run, no "
        f"{MANIFEST}); rerun `python -m mixie.cluster` to rewrite it")
  m = read_json(d / MANIFEST)
  check(isinstance(m, dict) and m.get("format") == FORMAT,
        f"{d / MANIFEST}: not a mixie clustered-dataset manifest (format {FORMAT!r} expected)")
  return m


def _check_shards(d, m: dict, split: str) -> None:
  tdir = d / m["tfds_dir"]
  for name, size in m["splits"][split]["shards"].items():
    f = tdir / name
    check(f.exists(), f"{f}: shard missing: the clustered dataset is corrupt; rerun "
                      "`python -m mixie.cluster` to rewrite it")
    got = f.stat().length
    check(got == size, f"{f}: shard has {got} bytes, {size} expected: the clustered dataset is "
                       "corrupt (truncated?); rerun `python -m mixie.cluster` to rewrite it")


class ClusteredSource:
  """Random access to one split: `src[i] -> {"tokens": int32 [n], "topic": int, "doc_id": str}`.

  Implements grain's `RandomAccessDataSource` protocol (`__len__`, `__getitem__`, `__getitems__`).
  `topics` (int32 [N]) and `lengths` (int32 [N]) come from the side index, without reading records.
  """

  def __init__(self, out_dir, split: str = "train"):
    d = _path(out_dir)
    m = read_manifest(d)
    check(split in m["splits"], f"{d}: the clustered dataset has no split {split!r} "
                                f"(it has {sorted(m['splits'])})")
    _check_shards(d, m, split)
    ix = load_arrays(d / f"index-{split}.npz")
    n = m["splits"][split]["num_records"]
    check(set(ix) >= {"topic", "length"} and ix["topic"].shape == (n,) and ix["length"].shape == (n,),
          f"{d / f'index-{split}.npz'}: index does not match the manifest ({n} records): the "
          "clustered dataset is corrupt; rerun `python -m mixie.cluster` to rewrite it")
    self.path, self.split, self.manifest = d, split, m
    self.num_topics: int = int(m["num_topics"])
    self.topics: np.ndarray = ix["topic"].astype(np.int32)
    self.lengths: np.ndarray = ix["length"].astype(np.int32)
    self._src = None
    if n:
      try:
        self._src = _tfds().builder_from_directory(str(d / m["tfds_dir"])).as_data_source(split=split)
      except Exception as e:  # TFDS/ArrayRecord raise many types for an unreadable dataset
        raise MixieError(f"{d / m['tfds_dir']}: cannot open split {split!r} of the clustered "
                         f"dataset ({type(e).__name__}: {e}); rerun `python -m mixie.cluster`") from None
      check(len(self._src) == n, f"{d}: split {split!r} has {len(self._src)} records, manifest "
                                 f"says {n}: the clustered dataset is corrupt")

  def __len__(self) -> int:
    return int(self.topics.size)

  def _convert(self, i: int, rec: dict) -> dict:
    out = {"tokens": np.asarray(rec["tokens"], np.int32), "topic": int(rec["topic"]),
           "doc_id": rec["doc_id"].decode("utf-8") if isinstance(rec["doc_id"], bytes)
           else str(rec["doc_id"])}
    check(out["topic"] == int(self.topics[i]) and out["tokens"].size == int(self.lengths[i]),
          f"{self.path}: record {i} of split {self.split!r} disagrees with the index: the "
          "clustered dataset is corrupt; rerun `python -m mixie.cluster` to rewrite it")
    return out

  def _read(self, idx: Sequence[int]) -> list[dict]:
    for i in idx:
      if not 0 <= i < len(self):
        raise IndexError(f"record {i} out of range [0, {len(self)}) in split {self.split!r}")
    try:
      recs = self._src.__getitems__(list(idx))
    except (IndexError, MixieError):
      raise
    except Exception as e:  # a corrupt chunk surfaces as a decode/IO error from ArrayRecord/protobuf
      raise MixieError(f"{self.path}: cannot read records of split {self.split!r} "
                       f"({type(e).__name__}: {e}): the clustered dataset is corrupt; rerun "
                       "`python -m mixie.cluster` to rewrite it") from None
    return [self._convert(i, r) for i, r in zip(idx, recs)]

  def __getitem__(self, i: int) -> dict:
    return self._read([int(i)])[0]

  def __getitems__(self, idx: Sequence[int]) -> list[dict]:
    return self._read([int(i) for i in idx])

  def __repr__(self) -> str:
    return f"ClusteredSource({str(self.path)!r}, split={self.split!r}, n={len(self)})"


def open_dataset(out_dir, split: str = "train") -> ClusteredSource:
  """Opens one split of a complete clustered dataset; `MixieError` if missing, partial or corrupt."""
  return ClusteredSource(out_dir, split)


def topic_token_counts(out_dir, split: str = "train") -> np.ndarray:
  """Tokens per topic (int64 [num_topics]) of a split, from the side index (no record is read)."""
  d = _path(out_dir)
  m = read_manifest(d)
  check(split in m["splits"], f"{d}: the clustered dataset has no split {split!r}")
  ix = load_arrays(d / f"index-{split}.npz")
  return np.bincount(ix["topic"], weights=ix["length"].astype(np.float64),
                     minlength=int(m["num_topics"])).astype(np.int64)


def tokenize_records(docs: Iterable[tuple[str, str, int]], tokenizer, *,
                     batch: int = 256) -> Iterator[dict]:
  """Tokenizes `(doc_id, text, topic)` triples in batches into records for `write_dataset`.

  `tokenizer.encode_batch(list[str]) -> list[list[int]]`; records hold no special tokens (the loader
  adds BOS/EOS when it packs documents), so a tokenizer whose `encode_batch` takes `add_bos` (as
  `mixie.model.tokenizer.Tokenizer`) is called with `add_bos=False`.
  """
  buf: list[tuple[str, str, int]] = []
  kw = {"add_bos": False} if "add_bos" in inspect.signature(tokenizer.encode_batch).parameters else {}

  def flush():
    ids = tokenizer.encode_batch([t for _, t, _ in buf], **kw)
    for (did, _, topic), toks in zip(buf, ids):
      yield {"tokens": np.asarray(toks, np.int32), "topic": int(topic), "doc_id": did}
    buf.clear()

  for doc in docs:
    buf.append(doc)
    if len(buf) >= batch:
      yield from flush()
  if buf:
    yield from flush()


def build_dataset(out_dir, corpus, topic_n: np.ndarray, tokenizer, *, num_topics: int,
                  max_shard_mb: float = 1024.0, batch: int = 256,
                  metadata: Mapping[str, Any] | None = None) -> dict:
  """Tokenizes a `Corpus` and writes it with its topic per document (int [N], held-out rows too)."""
  topic_n = np.asarray(topic_n)
  check(topic_n.shape == (len(corpus),),
        f"build_dataset: {topic_n.shape[0] if topic_n.ndim else 0} topics for {len(corpus)} documents")

  def docs(rows):
    return ((corpus.ids[i], corpus.texts[i], int(topic_n[i])) for i in rows)

  return write_dataset(
      out_dir, {"train": tokenize_records(docs(corpus.train_indices()), tokenizer, batch=batch),
                "heldout": tokenize_records(docs(corpus.heldout_indices()), tokenizer, batch=batch)},
      num_topics=num_topics, max_shard_mb=max_shard_mb, metadata=metadata)

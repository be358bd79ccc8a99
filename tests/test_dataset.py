"""The clustered TFDS/ArrayRecord dataset: exact round trip, no TensorFlow, killed and corrupt writes."""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs.common import base_config
from mixie.data import corpus as corpus_lib
from mixie.data import dataset as ds_lib
from mixie.errors import MixieError

REPO = pathlib.Path(__file__).resolve().parents[1]


class ByteTokenizer:
  """Invertible stand-in tokenizer: UTF-8 bytes shifted past three special ids."""
  pad_id, bos_id, eos_ids = 0, 1, (2,)

  def encode_batch(self, texts):
    return [[b + 3 for b in t.encode("utf-8")] for t in texts]

  def decode(self, ids):
    return bytes(int(i) - 3 for i in ids).decode("utf-8")


def _records(n, num_topics, seed=0, prefix="d"):
  rng = np.random.default_rng(seed)
  return [{"tokens": rng.integers(3, 50000, int(rng.integers(0, 40))).astype(np.int32),
           "topic": int(rng.integers(0, num_topics)), "doc_id": f"{prefix}{i:05d}"} for i in range(n)]


@pytest.fixture(scope="module")
def wiki_small():
  cfg = base_config().data
  cfg.max_docs = 240
  cfg.heldout_fraction = 0.1
  return corpus_lib.load_corpus(cfg)


def test_round_trip_wiki_documents_come_back_identical(tmp_path, wiki_small, capfd):
  c = wiki_small
  topic_n = c.label_ids()[0] % 5  # any topic per document will do
  tok = ByteTokenizer()
  capfd.readouterr()
  m = ds_lib.build_dataset(tmp_path, c, topic_n, tok, num_topics=5, batch=17,
                           metadata={"tokenizer": "bytes"})
  assert capfd.readouterr() == ("", "")  # tfds's "Downloading and preparing..." and its bars stay quiet
  assert ds_lib._tfds().core.utils.tqdm_utils._active  # and tfds's own setting is back as it was
  assert ds_lib.dataset_status(tmp_path) == "complete" and m["metadata"] == {"tokenizer": "bytes"}
  for split, rows in (("train", c.train_indices()), ("heldout", c.heldout_indices())):
    src = ds_lib.open_dataset(tmp_path, split)
    assert len(src) == len(rows) > 0
    recs = src.__getitems__(range(len(src)))
    assert [r["doc_id"] for r in recs] == [c.ids[i] for i in rows]
    assert [tok.decode(r["tokens"]) for r in recs] == [c.texts[i] for i in rows]
    assert [r["topic"] for r in recs] == topic_n[rows].tolist()
    assert all(r["tokens"].dtype == np.int32 for r in recs)
    np.testing.assert_array_equal(src.topics, topic_n[rows])
    np.testing.assert_array_equal(src.lengths, [len(c.texts[i].encode()) for i in rows])
  counts = ds_lib.topic_token_counts(tmp_path)
  train = c.train_indices()
  want = np.bincount(topic_n[train], weights=[len(c.texts[i].encode()) for i in train], minlength=5)
  np.testing.assert_array_equal(counts, want.astype(np.int64))
  assert "tensorflow" not in sys.modules  # written and read without TensorFlow


def test_read_with_plain_tfds_and_grain(tmp_path):
  import grain
  import tensorflow_datasets as tfds

  recs = _records(120, 4)
  ds_lib.write_dataset(tmp_path, {"train": recs, "heldout": _records(7, 4, 1, "h")}, num_topics=4,
                       num_shards=3)
  shards = ds_lib.read_manifest(tmp_path)["splits"]["train"]["shards"]
  assert len(shards) == 3
  src = ds_lib.open_dataset(tmp_path)
  via_tfds = tfds.data_source(ds_lib.BUILDER_NAME, data_dir=str(tmp_path / "tfds"), split="train",
                              download=False)
  via_grain = grain.MapDataset.source(src).map(lambda r: r["doc_id"])
  assert len(via_tfds) == len(src) == 120
  for i in (0, 1, 41, 80, 119):
    assert via_tfds[i]["doc_id"].decode() == recs[i]["doc_id"] == src[i]["doc_id"] == via_grain[i]
    np.testing.assert_array_equal(via_tfds[i]["tokens"], recs[i]["tokens"])
    np.testing.assert_array_equal(src[i]["tokens"], recs[i]["tokens"])
  b = tfds.builder_from_directory(str(ds_lib.tfds_dir(tmp_path)))
  assert set(b.info.splits) == {"train", "heldout"} and b.info.splits["heldout"].num_examples == 7


def test_empty_split_and_bad_records(tmp_path):
  ds_lib.write_dataset(tmp_path, {"train": iter(_records(10, 2)), "heldout": iter([])}, num_topics=2)
  assert len(ds_lib.open_dataset(tmp_path, "heldout")) == 0
  assert len(ds_lib.open_dataset(tmp_path, "train")) == 10
  with pytest.raises(MixieError, match="no split 'test'"):
    ds_lib.open_dataset(tmp_path, "test")
  bad = _records(5, 2)
  bad[3]["topic"] = 2
  with pytest.raises(MixieError, match=r"record 3: topic 2 is not in \[0, 2\)"):
    ds_lib.write_dataset(tmp_path / "bad", {"train": bad}, num_topics=2)
  assert ds_lib.dataset_status(tmp_path / "bad") == "missing"  # nothing half-written left behind
  with pytest.raises(MixieError, match="every split is empty"):
    ds_lib.write_dataset(tmp_path / "none", {"train": []}, num_topics=2)


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from mixie.data import dataset as ds_lib

    def recs():
      for i in range(400):
        if i == 300:
          os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of the train split
        yield {"tokens": np.arange(i % 17, dtype=np.int32), "topic": i % 3, "doc_id": f"k{i}"}

    ds_lib.write_dataset(sys.argv[1], {"train": recs(), "heldout": recs()}, num_topics=3)
""")


def test_killed_write_is_detected_and_rewritten(tmp_path):
  ds_lib.write_dataset(tmp_path, {"train": _records(30, 3)}, num_topics=3)  # a complete old dataset
  assert ds_lib.dataset_status(tmp_path) == "complete"
  r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], cwd=REPO,
                     env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=120)
  assert r.returncode == -9, r.stderr.decode()[-2000:]
  assert ds_lib.dataset_status(tmp_path) == "partial"
  for fn in (lambda: ds_lib.open_dataset(tmp_path), lambda: ds_lib.topic_token_counts(tmp_path)):
    with pytest.raises(MixieError, match="incomplete.*killed run.*rerun"):
      fn()
  recs = _records(50, 3, seed=5)
  ds_lib.write_dataset(tmp_path, {"train": recs}, num_topics=3)  # the rerun rewrites it
  src = ds_lib.open_dataset(tmp_path)
  assert [src[i]["doc_id"] for i in range(50)] == [r["doc_id"] for r in recs]
  assert not list((tmp_path / "tfds" / ds_lib.BUILDER_NAME).glob("incomplete*"))


def test_missing_truncated_and_corrupt_dataset(tmp_path):
  with pytest.raises(MixieError, match="no clustered dataset here"):
    ds_lib.open_dataset(tmp_path / "nothing")
  ds_lib.write_dataset(tmp_path, {"train": _records(300, 3)}, num_topics=3)
  shard = next(iter(ds_lib.read_manifest(tmp_path)["splits"]["train"]["shards"]))
  f = ds_lib.tfds_dir(tmp_path) / shard
  data = bytearray(f.read_bytes())
  # flip bytes inside the records (same size): caught on read
  nz = np.flatnonzero(np.frombuffer(bytes(data), np.uint8))
  for i in nz[len(nz) // 4: len(nz) // 2]:
    data[i] ^= 0x5A
  f.write_bytes(bytes(data))
  src = ds_lib.open_dataset(tmp_path)
  with pytest.raises(MixieError, match="corrupt"):
    for i in range(len(src)):
      src[i]
  # truncated: caught on open, by size
  f.write_bytes(bytes(data[: len(data) // 2]))
  with pytest.raises(MixieError, match=f"{shard}: shard has .* bytes.*truncated"):
    ds_lib.open_dataset(tmp_path)
  f.unlink()
  with pytest.raises(MixieError, match="shard missing"):
    ds_lib.open_dataset(tmp_path)
  (tmp_path / "manifest.json").write_text("{not json")
  with pytest.raises(MixieError, match="manifest.json: not valid JSON"):
    ds_lib.open_dataset(tmp_path)


def test_tokenize_records_stores_no_bos():
  class BosByDefault(ByteTokenizer):
    def encode_batch(self, texts, add_bos=None):
      return [([self.bos_id] if add_bos in (None, True) else []) + ids
              for ids in super().encode_batch(texts)]

  docs = [(f"id{i}", f"text {i}", i % 2) for i in range(5)]
  for tok in (ByteTokenizer(), BosByDefault()):
    recs = list(ds_lib.tokenize_records(iter(docs), tok, batch=2))
    assert [r["doc_id"] for r in recs] == [d[0] for d in docs]
    assert [tok.decode(r["tokens"]) for r in recs] == [d[1] for d in docs]
    assert [r["topic"] for r in recs] == [0, 1, 0, 1, 0]

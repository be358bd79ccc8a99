"""Packed per-topic loader: topic purity, boundary masks, exact resume, slot refills, small topics."""

import json

import numpy as np
import pytest

from mixie.data import dataset as ds_lib
from mixie.data.loader import PackedLoader, resolve_small_topics
from mixie.errors import ConfigError, MixieError

PAD, BOS, EOS = 0, 1, 2
K = 4
DOCS_PER_TOPIC = (30, 12, 3, 25)  # topic 2 is small


def _doc_tokens(topic, j, rng):
  # token = 1000 * (topic + 1) + 10 + j: a document's topic and identity can be read off any token
  return np.full(int(rng.integers(1, 60)), 1000 * (topic + 1) + 10 + j, np.int32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  rng = np.random.default_rng(0)
  recs = []
  for topic, n in enumerate(DOCS_PER_TOPIC):
    recs += [{"tokens": _doc_tokens(topic, j, rng), "topic": topic, "doc_id": f"t{topic}d{j}"}
             for j in range(n)]
  order = rng.permutation(len(recs))  # topics interleaved in the file
  recs = [recs[i] for i in order]
  d = tmp_path_factory.mktemp("clustered")
  ds_lib.write_dataset(d, {"train": recs}, num_topics=K, num_shards=2)
  return ds_lib.open_dataset(d), recs


def _loader(src, slots, **kw):
  kw = {"batch_per_slot": 3, "seq_len": 16, "eos_id": EOS, "bos_id": BOS, "pad_id": PAD, "seed": 3, **kw}
  return PackedLoader(src, slots, **kw)


def _topic_of(tok):
  return tok // 1000 - 1


def test_rows_are_topic_pure_and_masked_at_boundaries(data):
  src, _ = data
  loader = _loader(src, [0, 3, -1, 1])
  for _ in range(12):
    b = loader.next_batch()
    assert b["inputs"].shape == b["targets"].shape == b["loss_mask"].shape == (4, 3, 16)
    assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    for e, topic in enumerate([0, 3, -1, 1]):
      x, y, m = b["inputs"][e], b["targets"][e], b["loss_mask"][e]
      if topic < 0:
        assert (x == PAD).all() and (y == PAD).all() and not m.any() and b["slot_tokens"][e] == 0
        continue
      content = x[x > EOS]
      assert content.size and (_topic_of(content) == topic).all()
      assert (_topic_of(y[y > EOS]) == topic).all()
      # inputs and targets are the same stream shifted by one
      np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
      # no loss exactly where the input is a document's EOS (its target is the next doc's BOS)
      np.testing.assert_array_equal(m == 0, x == EOS)
      assert (y[x == EOS] == BOS).all()
      assert b["slot_tokens"][e] == m.sum()
      # positions restart at each BOS; segment ids count documents within a row
      assert (b["positions"][e][x == BOS] == 0).all()
      seg = b["segment_ids"][e]
      assert (seg[:, 0] == 1).all() and (np.diff(seg, axis=1) == (x[:, 1:] == BOS)).all()


def test_stream_covers_each_document_once_per_epoch(data):
  src, recs = data
  topic = 1
  loader = _loader(src, [topic], batch_per_slot=2, seq_len=8)
  docs = [r for r in recs if r["topic"] == topic]
  total = sum(len(r["tokens"]) + 2 for r in docs)  # [BOS] doc [EOS]
  stream = []
  while len(stream) < 2 * total + 1:
    b = loader.next_batch()
    for row in b["inputs"][0]:
      stream.extend(row.tolist())
  stream = np.asarray(stream[:2 * total])
  for epoch in range(2):  # each epoch: every document of the topic exactly once, whole
    s = stream[epoch * total:(epoch + 1) * total]
    assert s[0] == BOS and s[-1] == EOS
    starts = np.flatnonzero(s == BOS)
    got = sorted(tuple(s[a + 1:b - 1]) for a, b in zip(starts, list(starts[1:]) + [len(s)]))
    assert got == sorted(tuple(r["tokens"].tolist()) for r in docs)
  assert loader.state()["slots"][0]["epoch"] == 2
  # the two epochs are shuffled differently
  ep = [stream[i * total:(i + 1) * total] for i in range(2)]
  assert not np.array_equal(ep[0], ep[1])


def test_no_bos_masks_first_token_of_next_document(data):
  src, _ = data
  b = _loader(src, [0], bos_id=None).next_batch()
  x, y, m = b["inputs"][0], b["targets"][0], b["loss_mask"][0]
  np.testing.assert_array_equal(m == 0, x == EOS)
  assert (y[x == EOS] > EOS).all() and not (x == BOS).any()


def test_deterministic_and_seeded(data):
  src, _ = data
  l1, l2, l3 = _loader(src, [0, 1]), _loader(src, [0, 1]), _loader(src, [0, 1], seed=4)
  for _ in range(5):
    b1, b2, b3 = l1.next_batch(), l2.next_batch(), l3.next_batch()
    for k in b1:
      np.testing.assert_array_equal(b1[k], b2[k])
  assert not np.array_equal(b1["inputs"], b3["inputs"])


def _run(loader, n):
  return [loader.next_batch() for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_restore_mid_epoch_continues_exactly(data):
  src, _ = data
  ref = _loader(src, [0, 2, -1, 3])
  _run(ref, 4)
  ref.set_slot(2, 1)  # a refill before the checkpoint
  _run(ref, 3)
  state = json.loads(json.dumps(ref.state()))  # JSON round trip, as a checkpoint would store it
  assert any(s["offset"] > 0 for s in state["slots"])  # mid-document
  assert any(s["epoch"] > 0 for s in state["slots"]) and any(s["doc"] > 0 for s in state["slots"])
  expect = _run(ref, 6)
  ref.set_slot(0, 2)  # a refill after the checkpoint
  expect += _run(ref, 4)

  restored = _loader(src, [-1, -1, -1, -1])
  restored.restore(state)
  assert restored.slot_topics == [0, 2, 1, 3]
  got = _run(restored, 6)
  restored.set_slot(0, 2)
  got += _run(restored, 4)
  _assert_same(expect, got)


def test_set_slot_switches_topic(data):
  src, _ = data
  loader = _loader(src, [0, 1])
  _run(loader, 2)
  loader.set_slot(1, 3)
  b = loader.next_batch()
  x = b["inputs"][1]
  assert (_topic_of(x[x > EOS]) == 3).all()
  # a refilled slot starts its topic from the beginning: same as a fresh loader on that topic
  fresh = _loader(src, [3]).next_batch()
  np.testing.assert_array_equal(b["inputs"][1], fresh["inputs"][0])


def test_bad_restore_and_slots(data):
  src, _ = data
  loader = _loader(src, [0, 1])
  st = loader.state()
  with pytest.raises(MixieError, match="2 slots but this loader has 3"):
    _loader(src, [0, 1, 2]).restore(st)
  with pytest.raises(MixieError, match="seq_len=16 but this loader has 32"):
    _loader(src, [0, 1], seq_len=32).restore(st)
  with pytest.raises(MixieError, match=r"topic 7 is not in \[0, 4\)"):
    loader.set_slot(0, 7)
  merged = np.asarray([0, 1, 0, 3])
  with pytest.raises(MixieError, match="topic 2 has no documents"):
    _loader(src, [2], topic_map=merged)
  with pytest.raises(MixieError, match="had 30 documents, the dataset now has 33"):
    _loader(src, [0, 1], topic_map=merged).restore(st)


def test_resolve_small_topics_merge_and_skip():
  counts = np.asarray([500, 40, 300, 0, 90, 1000])
  cent = np.asarray([[0, 0], [9, 9], [10, 0], [0, 10], [1, 1], [10, 10]], np.float32)
  m, rep = resolve_small_topics(counts, cent, 100, "merge")
  # brute force: each small topic goes to the nearest topic with >= 100 tokens
  big = [t for t in range(6) if counts[t] >= 100]
  want = [t if counts[t] >= 100 else min(big, key=lambda b: ((cent[t] - cent[b]) ** 2).sum())
          for t in range(6)]
  assert m.tolist() == want == [0, 5, 2, 0, 0, 5]
  assert [s["topic"] for s in rep["small"]] == [1, 3, 4] and rep["num_trained_topics"] == 3
  assert rep["merged"] == [[1, 5], [3, 0], [4, 0]]
  json.dumps(rep)
  m, rep = resolve_small_topics(counts, None, 100, "skip")
  assert m.tolist() == [0, -1, 2, -1, -1, 5] and rep["tokens_dropped"] == 130
  with pytest.raises(ConfigError, match="dataset.small_topics='drop'"):
    resolve_small_topics(counts, cent, 100, "drop")
  with pytest.raises(MixieError, match="no topic has enough tokens for one batch"):
    resolve_small_topics(counts, cent, 5000, "merge")


def test_small_topic_merged_into_nearest_feeds_its_slot(data):
  src, recs = data
  counts = ds_lib.topic_token_counts(src.path)
  lens = np.bincount([r["topic"] for r in recs], weights=[len(r["tokens"]) for r in recs], minlength=K)
  np.testing.assert_array_equal(counts, lens.astype(np.int64))
  cent = np.eye(K, dtype=np.float32)
  cent[2] = [0.1, 0.9, 0.0, 0.0]  # topic 2 lies next to topic 1
  min_tokens = int(counts[2]) + 1  # only topic 2 is too small
  topic_map, rep = resolve_small_topics(counts, cent, min_tokens, "merge")
  assert topic_map.tolist() == [0, 1, 1, 3] and rep["merged"] == [[2, 1]]
  loader = _loader(src, [1], topic_map=topic_map)
  assert len(loader.topic_docs(1)) == DOCS_PER_TOPIC[1] + DOCS_PER_TOPIC[2]
  seen = set()
  for _ in range(20):
    x = loader.next_batch()["inputs"][0]
    seen |= set(_topic_of(x[x > EOS]).tolist())
  assert seen == {1, 2}


def test_loader_from_config(data):
  from configs.common import base_config
  from mixie.data.loader import loader_from_config

  class Tok:
    bos_id, eos_ids, pad_id, add_bos = BOS, (EOS, 99), PAD, False

  cfg = base_config()
  cfg.dataset.seq_len, cfg.train.batch_per_slot = 24, 2
  src, _ = data
  loader = loader_from_config(cfg, src, [0, 3], Tok())
  b = loader.next_batch()
  assert b["inputs"].shape == (2, 2, 24) and not (b["inputs"] == BOS).any()
  Tok.add_bos = True
  assert (loader_from_config(cfg, src, [0], Tok()).next_batch()["inputs"][0, 0, 0]) == BOS


def test_local_slots_read_only_their_documents(data):
  """A process that holds slots 0 and 2 reads only their topics' records; its rows of those slots, and
  every slot's token counts and cursors, equal a loader that reads everything."""
  src, _ = data

  class Counting:
    def __init__(self, inner):
      self.inner, self.read = inner, set()

    def __getattr__(self, name):
      return getattr(self.inner, name)

    def __getitems__(self, idx):
      self.read.update(int(i) for i in idx)
      return self.inner.__getitems__(idx)

  counting = Counting(src)
  full, part = _loader(src, [0, 3, 1, -1]), _loader(counting, [0, 3, 1, -1])
  part.set_local_slots([0, 2])
  for step in range(8):
    a, b = full.next_batch(), part.next_batch()
    np.testing.assert_array_equal(a["slot_tokens"], b["slot_tokens"])
    np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
    for k in ("inputs", "targets"):
      np.testing.assert_array_equal(a[k][[0, 2]], b[k][[0, 2]])
      assert (b[k][[1, 3]] == PAD).all()
    if step == 3:  # a refill keeps both in step
      full.set_slot(1, 2)
      part.set_slot(1, 2)
  assert full.state() == part.state()
  assert counting.read and set(src.topics[sorted(counting.read)]) <= {0, 1}

"""Corpus sources: filtering counts, deterministic ids, a held-out split stable under reordering."""

import gzip
import json
import random

import numpy as np
import pytest

from configs.common import base_config
from mixie.data import corpus as corpus_lib
from mixie.errors import ConfigError, MixieError


def _cfg(**kw):
  c = base_config().data
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _write_jsonl(p, lines):
  with open(p, "wb") as f:
    for line in lines:
      f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")


GOOD = [f"Document number {i} talks about topic {i % 3} at some length." for i in range(40)]


def _messy_lines():
  """40 good documents plus one of every kind of bad record (counts checked below)."""
  lines = [{"text": t, "label": f"L{i % 3}"} for i, t in enumerate(GOOD)]
  lines += [
      {"text": ""},  # empty
      {"text": "   \n\t "},  # whitespace-only
      {"text": GOOD[3], "label": "L0"},  # exact duplicate
      {"text": "  " + GOOD[5] + "\n"},  # duplicate after stripping outer whitespace
      b'{"text": "caf\xe9 latin-1 bytes"}',  # not UTF-8
      b'{"text": "lone surrogate \\ud800 here"}',  # valid JSON, not encodable as UTF-8
      b'{"text": "unterminated',  # malformed JSON
      {"text": 12345},  # text is not a string
      {"body": "no text field"},  # missing text field
  ]
  return lines


def test_jsonl_filtering_is_counted(tmp_path):
  _write_jsonl(tmp_path / "a.jsonl", _messy_lines())
  c = corpus_lib.load_corpus(_cfg(source="jsonl", path=str(tmp_path / "a.jsonl"), label_field="label",
                                  max_bad_fraction=1.0))
  assert c.texts == GOOD
  s = c.stats
  assert (s["read"], s["kept"], s["empty"], s["duplicate"], s["non_utf8"], s["malformed"],
          s["missing_text"]) == (49, 40, 2, 2, 2, 2, 1)
  assert c.labels == [f"L{i % 3}" for i in range(40)]
  assert c.ids == [corpus_lib.doc_id(t) for t in GOOD]
  assert all(len(i) == 16 and int(i, 16) >= 0 for i in c.ids)
  assert c.heldout.dtype == bool and c.heldout.shape == (40,)
  assert s["heldout"] == int(c.heldout.sum())


def test_ids_and_split_stable_under_reordering_and_across_sources(tmp_path):
  lines = [{"text": t} for t in GOOD]
  _write_jsonl(tmp_path / "a.jsonl", lines)
  random.Random(1).shuffle(lines)
  (tmp_path / "shuffled").mkdir()
  _write_jsonl(tmp_path / "shuffled" / "b.jsonl", lines[:25])
  with gzip.open(tmp_path / "shuffled" / "c.jsonl.gz", "wb") as f:  # a gzipped part too
    f.write(b"".join(json.dumps(l).encode() + b"\n" for l in lines[25:]))
  txt = tmp_path / "txt"
  for i, t in enumerate(reversed(GOOD)):
    (txt / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
    (txt / f"sub{i % 2}" / f"{i:03d}.txt").write_text(t + "\n")
  kw = dict(heldout_fraction=0.3, heldout_seed=7)
  a = corpus_lib.load_corpus(_cfg(source="jsonl", path=str(tmp_path / "a.jsonl"), **kw))
  b = corpus_lib.load_corpus(_cfg(source="jsonl", path=str(tmp_path / "shuffled"), **kw))
  g = corpus_lib.load_corpus(_cfg(source="jsonl", path=str(tmp_path / "shuffled" / "*.jsonl*"), **kw))
  t = corpus_lib.load_corpus(_cfg(source="text", path=str(txt), **kw))
  ref = dict(zip(a.ids, a.heldout.tolist()))
  assert len(ref) == 40 and 0 < sum(ref.values()) < 40
  for other in (b, g, t):
    assert dict(zip(other.ids, other.heldout.tolist())) == ref
    assert sorted(other.texts) == sorted(GOOD)
  assert a.ids != b.ids  # same ids, different order: ids come from the text, not the position
  assert t.titles[0].startswith("sub0/") and t.labels is None
  # a different seed gives a different split
  c = corpus_lib.load_corpus(_cfg(source="jsonl", path=str(tmp_path / "a.jsonl"), heldout_fraction=0.3,
                                  heldout_seed=8))
  assert c.ids == a.ids and not np.array_equal(c.heldout, a.heldout)


def test_text_dir_non_utf8_and_empty_files(tmp_path):
  (tmp_path / "a.txt").write_text("Alpha document.")
  (tmp_path / "b.txt").write_bytes(b"\xff\xfe not utf8 \x80")
  (tmp_path / "c.txt").write_text("  \n ")
  (tmp_path / "d.txt").write_text("Alpha document.\n")
  (tmp_path / "e.md").write_text("not a .txt file")
  c = corpus_lib.load_corpus(_cfg(source="text", path=str(tmp_path), heldout_fraction=0.0,
                                  max_bad_fraction=1.0))
  assert c.texts == ["Alpha document."] and c.titles == ["a.txt"]
  assert (c.stats["read"], c.stats["non_utf8"], c.stats["empty"], c.stats["duplicate"]) == (4, 1, 1, 1)
  assert not c.heldout.any()


def test_bad_records_are_reported_and_too_many_refused(tmp_path):
  """Counts by cause and the first bad line in the report; past data.max_bad_fraction, one message
  naming the first bad line's file and line number."""
  lines = [{"text": t} for t in GOOD[:30]] + [{"text": GOOD[0]}]  # line 31: a duplicate (not bad)
  lines += [b'{"text": "unterminated', {"body": "no text"}, {"text": "  "}]  # lines 32, 33, 34
  _write_jsonl(tmp_path / "a.jsonl", lines)
  f = tmp_path / "a.jsonl"
  # 3 bad of 34 read = 8.8%: accepted at 0.1, refused at the default 0.01 and at 0.08
  c = corpus_lib.load_corpus(_cfg(source="jsonl", path=str(f), heldout_fraction=0.0, max_bad_fraction=0.1))
  assert len(c) == 30 and c.stats["first_bad"] == {"where": f"{f}:32", "cause": "malformed"}
  assert corpus_lib.corpus_report(_cfg(source="jsonl", path=str(f)), c.stats) == (
      f"data.path={str(f)!r} (jsonl): 34 records read, 30 kept (0 held out), 4 dropped: "
      f"1 empty text, 1 exact duplicate, 1 bad JSON or non-string text, 1 no text field; the first is "
      f"{f}:32 (bad JSON or non-string text)")
  for frac in (None, 0.08):
    cfg = _cfg(source="jsonl", path=str(f)) if frac is None else _cfg(source="jsonl", path=str(f),
                                                                       max_bad_fraction=frac)
    with pytest.raises(MixieError) as e:
      corpus_lib.load_corpus(cfg)
    assert str(e.value) == (
        f"data.path={str(f)!r} (jsonl): 3 of 34 records are unusable (1 empty text, 1 bad JSON or "
        f"non-string text, 1 no text field), more than data.max_bad_fraction={cfg.max_bad_fraction:g} "
        f"of them; the first is {f}:32 (bad JSON or non-string text). Fix or remove those records, "
        "or raise data.max_bad_fraction")
  good = corpus_lib.load_corpus(_cfg(source="wiki_summaries", max_docs=50))
  assert corpus_lib.corpus_report(_cfg(), good.stats) == (
      f"the shipped Wikipedia summaries: 50 records read, 50 kept ({good.stats['heldout']} held out, stopped at data.max_docs), none dropped")
  with pytest.raises(ConfigError, match="data.max_bad_fraction=1.5"):
    corpus_lib.load_corpus(_cfg(max_bad_fraction=1.5))


def test_wiki_summaries_split_and_max_docs():
  full = corpus_lib.load_corpus(_cfg(source="wiki_summaries"))
  assert len(full) == 10033 and len(set(full.ids)) == len(full)
  assert full.labels is not None and len(set(full.labels)) == 12
  assert all(full.titles) and all(full.texts)
  # held-out fraction 0.05: binomial sd over 10k docs is 0.0022
  assert abs(full.heldout.mean() - 0.05) < 0.01
  train, held = full.split()
  assert len(train) + len(held) == len(full) and not set(train.ids) & set(held.ids)
  assert not train.heldout.any() and held.heldout.all()
  ids, names = full.label_ids()
  assert ids.shape == (10033,) and len(names) == 12
  # max_docs keeps a prefix that spans the topics (the file itself is sorted by topic)
  small = corpus_lib.load_corpus(_cfg(source="wiki_summaries", max_docs=300))
  assert len(small) == 300 and small.stats["max_docs_reached"]
  assert small.ids == full.ids[:300] and len(set(small.labels)) >= 10
  assert np.array_equal(small.heldout, full.heldout[:300])


def test_iter_documents_streams_lazily(tmp_path):
  _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in GOOD])
  stats = {}
  it = corpus_lib.iter_documents(_cfg(source="jsonl", path=str(tmp_path / "a.jsonl")), stats)
  first = next(it)
  assert first.text == GOOD[0] and stats["read"] == 1 and stats["kept"] == 1
  assert len(list(it)) == 39 and stats["kept"] == 40


def test_tfds_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class MixieTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["x", "y"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      items = [(t, i % 2) for i, t in enumerate(GOOD[:20])] + [("", 1), (GOOD[0], 0)]
      for i, (t, label) in enumerate(items):
        yield i, {"text": t, "label": label}

  MixieTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
      download_dir=str(tmp_path / "dl"))
  cfg = _cfg(source="tfds", path="mixie_tiny_text", data_dir=str(tmp_path), label_field="label",
             heldout_fraction=0.0, max_bad_fraction=0.05)  # 1 of 22 records is empty
  c = corpus_lib.load_corpus(cfg)
  assert sorted(c.texts) == sorted(GOOD[:20])  # TFDS shuffles record order
  assert (c.stats["empty"], c.stats["duplicate"]) == (1, 1)
  assert {t: l for t, l in zip(c.texts, c.labels)} == {t: "xy"[i % 2] for i, t in enumerate(GOOD[:20])}
  cfg.path = "no_such_dataset_xyz"
  with pytest.raises(MixieError, match="no_such_dataset_xyz.*cannot open"):
    corpus_lib.load_corpus(cfg)


def test_bad_input_gives_one_clear_message(tmp_path):
  with pytest.raises(MixieError, match="no such file or directory"):
    corpus_lib.load_corpus(_cfg(source="jsonl", path=str(tmp_path / "missing.jsonl")))
  with pytest.raises(MixieError, match="no such directory"):
    corpus_lib.load_corpus(_cfg(source="text", path=str(tmp_path / "missing")))
  with pytest.raises(MixieError, match="no JSONL file matches"):
    corpus_lib.load_corpus(_cfg(source="jsonl", path=str(tmp_path / "*.jsonl")))
  with pytest.raises(ConfigError, match="recursive"):
    corpus_lib.load_corpus(_cfg(source="jsonl", path=str(tmp_path / "**" / "*.jsonl")))
  _write_jsonl(tmp_path / "e.jsonl", [{"text": " "}, {"text": ""}, {"other": "x"}])
  with pytest.raises(MixieError, match=r"empty corpus.*3 read; dropped empty=2, missing_text=1\); the first "
                                      r"is .*e.jsonl:1 \(empty text\)"):
    corpus_lib.load_corpus(_cfg(source="jsonl", path=str(tmp_path / "e.jsonl")))
  with pytest.raises(ConfigError, match="data.source"):
    corpus_lib.load_corpus(_cfg(source="csv", path="x"))
  with pytest.raises(ConfigError, match="data.path is required"):
    corpus_lib.load_corpus(_cfg(source="jsonl", path=""))
  with pytest.raises(ConfigError, match="data.heldout_fraction"):
    corpus_lib.load_corpus(_cfg(heldout_fraction=1.0))

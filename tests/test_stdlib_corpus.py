"""The `wiki_stdlib` corpus: deterministic, labelled by origin, balanced in every prefix, code without
docstrings, and its interpreter version recorded with the topics."""

import collections
import platform

import pytest

from configs.common import base_config
from mixie.data import corpus as corpus_lib
from mixie.data import stdlib_corpus as sc


def _cfg(**kw):
  c = base_config().data
  c.source = "wiki_stdlib"
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _origin(label):
  return "wiki" if label.startswith("wiki/") else label


@pytest.fixture(scope="module")
def whole():
  return corpus_lib.load_corpus(_cfg())


def test_whole_corpus_sizes_labels_and_version(whole):
  counts = collections.Counter(_origin(l) for l in whole.labels)
  info = sc.source_info()
  assert counts["wiki"] == 10033
  for k in sc.KINDS:  # PER_KIND of each kind (this interpreter has more), less exact duplicates
    assert info["stdlib_kept"][k] == min(sc.PER_KIND, info["stdlib_available"][k])
    assert info["stdlib_kept"][k] - 5 <= counts[f"stdlib/{k}"] <= info["stdlib_kept"][k]
  assert len(set(whole.labels)) == 12 + 2 and whole.stats["duplicate"] <= 5
  assert whole.stats["python_version"] == platform.python_version() == info["python_version"]
  assert all(len(t) <= sc.MAX_CHARS for t, l in zip(whole.texts, whole.labels) if l.startswith("stdlib/"))


def test_every_prefix_keeps_the_mix(whole):
  share = lambda labels: {o: n / len(labels) for o, n in collections.Counter(map(_origin, labels)).items()}
  ref = share(whole.labels)
  part = corpus_lib.load_corpus(_cfg(max_docs=3000))
  assert part.ids == whole.ids[:3000]  # a prefix of the same order
  for origin, p in share(part.labels).items():
    assert abs(p - ref[origin]) < 0.04, (origin, p, ref[origin])


def test_deterministic(whole):
  sc.stdlib_documents.cache_clear()
  again = corpus_lib.load_corpus(_cfg())
  assert again.ids == whole.ids and again.labels == whole.labels and again.texts == whole.texts


def test_code_loses_its_docstrings_and_keeps_the_rest():
  src = ('"""Module doc.\n\nMore."""\nimport os\n\n\nclass A:\n  """Class doc."""\n  x = 1\n\n'
         '  def f(self):\n    """Method\n    doc."""\n    return os.sep  # a comment stays\n')
  code, docs = sc.split_source(src)
  assert docs == ["Module doc.\n\nMore.", "Class doc.", "Method\ndoc."]
  assert "doc" not in code and "import os" in code and "# a comment stays" in code and "x = 1" in code


def test_chunks_pack_blocks_within_the_limits():
  blocks = ["a" * 100] * 7 + ["b" * 2500, "c" * 10]
  out = sc.chunks(blocks, target=350, cap=900)
  assert all(len(c) <= 900 for c in out)
  assert "".join(out).replace("\n", "") == "".join(blocks)  # nothing lost
  assert out[0] == "\n".join(["a" * 100] * 3)  # as many blocks as fit the target


def test_a_fake_standard_library(tmp_path):
  (tmp_path / "pkg").mkdir()
  (tmp_path / "test").mkdir()
  (tmp_path / "site-packages").mkdir()
  (tmp_path / "mod.py").write_text('"""A module about parsing things."""\n\ndef g():\n  return 1\n')
  (tmp_path / "pkg" / "sub.py").write_text("def h(x):\n  '''Doubles x.'''\n  return 2 * x\n")
  (tmp_path / "test" / "test_mod.py").write_text("def test(): pass\n")
  (tmp_path / "site-packages" / "other.py").write_text("x = 1\n")
  (tmp_path / "broken.py").write_text("def (:\n")
  docs, info = sc.stdlib_documents(str(tmp_path))
  assert info["stdlib_files"] == 3 and info["stdlib_files_skipped"] == 1
  assert info["stdlib_available"] == {"code": 2, "doc": 2}
  assert sorted((l, t) for _, l, t in docs) == [("stdlib/code", "mod.py (code 0)"),
                                                 ("stdlib/code", "pkg/sub.py (code 0)"),
                                                 ("stdlib/doc", "mod.py (doc 0)"), ("stdlib/doc", "pkg/sub.py (doc 0)")]


def test_no_path_needed_and_the_version_is_recorded_with_the_topics(tmp_path):
  from mixie.cluster.topics import run_cluster, topics_dir
  from mixie.io import read_json

  c = base_config()
  c.workdir = str(tmp_path)
  c.data.source, c.data.max_docs = "wiki_stdlib", 300
  c.cluster.embedder, c.cluster.tfidf_dim, c.cluster.k, c.cluster.embed_tokens = "tfidf", 16, 3, 24
  corpus_lib.validate_data_config(c.data)  # data.path is not needed
  run_cluster(c, log=lambda *_: None)
  marker = read_json(topics_dir(tmp_path) / "done" / "embed.json")
  assert marker["corpus_stats"]["python_version"] == platform.python_version()
  assert marker["settings"]["data.source"] == "wiki_stdlib"
  labels = read_json(topics_dir(tmp_path) / "labels.json")
  assert "stdlib/code" in labels and "stdlib/doc" in labels and any(l.startswith("wiki/") for l in labels)

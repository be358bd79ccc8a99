"""all-MiniLM-L6-v2 in JAX against sentence-transformers (torch, CPU), on real summaries."""

import json

import numpy as np
import pytest

from mixie.assets import minilm_dir, wiki_summaries_json
from mixie.cluster.minilm import MiniLM, MiniLMEncoder
from mixie.errors import MixieError
from mixie.sharding import make_mesh

MAX_TOKENS = 64  # both sides truncate to this many word pieces ([CLS] and [SEP] included)


@pytest.fixture(scope="module")
def texts():
  d = json.loads(wiki_summaries_json().read_text())
  return [v["extract"] for v in list(d.values())[::50][:200]]  # 200 summaries across all topics


@pytest.fixture(scope="module")
def encoder():
  return MiniLMEncoder(max_tokens=MAX_TOKENS, batch=32)


def test_matches_sentence_transformers(texts, encoder):
  from sentence_transformers import SentenceTransformer

  st = SentenceTransformer(str(minilm_dir()), device="cpu")
  st.max_seq_length = MAX_TOKENS
  ref = st.encode(texts, batch_size=32, convert_to_numpy=True)
  ours = encoder(texts)
  assert ours.shape == ref.shape == (200, 384)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
  cos = (ours * ref).sum(1) / np.linalg.norm(ref, axis=1)
  assert cos.min() >= 0.9999, cos.min()
  # the truncation really bit: most summaries are longer than MAX_TOKENS word pieces
  assert np.mean([len(e) >= MAX_TOKENS for e in encoder.tokenize(texts)]) > 0.5


def test_sharded_batches_and_padding_do_not_change_embeddings(texts, encoder):
  """8-way sharded rows, other batch sizes and other padding buckets give the same vectors."""
  sub = texts[:13]
  want = encoder(sub)
  sharded = MiniLMEncoder(max_tokens=MAX_TOKENS, batch=8, mesh=make_mesh((8,), ("data",)))
  np.testing.assert_allclose(sharded(sub), want, atol=2e-5)
  short = ["a cat", "Paris is the capital of France."]
  alone = np.stack([encoder([t])[0] for t in short])  # bucket 16, one row
  np.testing.assert_allclose(encoder(short + sub)[:2], alone, atol=2e-5)  # padded to 64 with long docs


def test_sees_only_the_first_max_tokens(texts, encoder):
  long = [t for t in texts if len(encoder.tokenize([t])[0]) >= MAX_TOKENS][:4]
  np.testing.assert_allclose(encoder([t + " Completely different words appended." for t in long]),
                             encoder(long), atol=1e-6)


def test_nnx_module_calls_the_same_function(texts, encoder):
  model = MiniLM.from_pretrained()
  ids = encoder.tokenize(texts[:3])
  t = max(len(s) for s in ids)
  tokens = np.zeros((3, t), np.int32)
  mask = np.zeros((3, t), np.int32)
  for i, s in enumerate(ids):
    tokens[i, :len(s)], mask[i, :len(s)] = s, 1
  np.testing.assert_allclose(np.asarray(model(tokens, mask)), encoder(texts[:3]), atol=2e-5)


def test_missing_or_corrupt_weights(tmp_path):
  with pytest.raises(MixieError, match="config.json"):
    MiniLMEncoder(tmp_path)
  (tmp_path / "config.json").write_text((minilm_dir() / "config.json").read_text())
  (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(MixieError, match="model.safetensors"):
    MiniLMEncoder(tmp_path)

"""Tokenizer parity with transformers' tokenizer built from the same GGUF, on real Wikipedia text."""

import json

import pytest
import transformers

from mixie import assets
from mixie.errors import MixieError
from mixie.model.tokenizer import Tokenizer, pad_right


@pytest.fixture(scope="module")
def pair():
  path = assets.smollm2_gguf()
  ours = Tokenizer.from_gguf(path)
  ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  return ours, ref


@pytest.fixture(scope="module")
def texts():
  docs = json.loads(assets.wiki_summaries_json().read_text())
  extracts = [d["extract"] for d in docs.values()]
  special = ["<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n", "  two leading spaces\n\n\ttab",
             "naïve café — 東京 🤗 ½ 1,000,000", "<|endoftext|>x<repo_name>"]
  return extracts[::33] + special  # 305 real summaries spread over all topics, plus edge cases


def test_ids_equal_transformers(pair, texts):
  ours, ref = pair
  assert len(texts) > 300
  got = ours.encode_batch(texts)
  want = ref(texts, add_special_tokens=True)["input_ids"]
  mismatched = [t[:60] for t, a, b in zip(texts, got, want) if a != b]
  assert not mismatched, mismatched[:3]
  assert [ours.encode(t) for t in texts[:5]] == want[:5]


def test_special_ids_and_decode(pair, texts):
  ours, ref = pair
  assert ours.bos_id == ref.bos_token_id == 1
  assert ours.eos_ids == (ref.eos_token_id,) == (2,)
  assert ours.pad_id == ref.pad_token_id
  assert ours.vocab_size == len(ref) == 49152
  assert ours.encode("<|im_start|>") == [1]  # control tokens stay whole
  for t in texts[:50] + texts[-4:]:
    ids = ours.encode(t)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
  assert ours.decode(ours.encode(texts[0])) == texts[0]
  assert ours.encode("Hi", add_bos=True) == [1] + ours.encode("Hi")


def test_from_file_matches_gguf(pair, texts, tmp_path):
  """A tokenizer.json + tokenizer_config.json directory, as HF checkpoints ship."""
  ours, _ = pair
  ours.tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": True}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
  loaded = Tokenizer.from_file(tmp_path)
  assert (loaded.bos_id, loaded.eos_ids, loaded.add_bos) == (1, (2, 0), True)
  assert loaded.encode_batch(texts[:40], add_bos=False) == ours.encode_batch(texts[:40])
  assert loaded.encode(texts[0])[0] == 1


def test_pad_right():
  tokens, lengths = pad_right([[5, 6, 7], [8]], pad_id=0)
  assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]] and lengths.tolist() == [3, 1]
  tokens, lengths = pad_right([[5, 6, 7], [8]], pad_id=9, length=2)
  assert tokens.tolist() == [[5, 6], [8, 9]] and lengths.tolist() == [2, 1]


def test_bad_tokenizer_files(tmp_path):
  with pytest.raises(MixieError, match="tokenizer file not found"):
    Tokenizer.from_file(tmp_path / "nope.json")
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(MixieError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
    Tokenizer.from_file(tmp_path)

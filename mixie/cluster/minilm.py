"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) in JAX: the default document embedder.

The core is a pure function over a plain pytree, as in `mixie.model.llama`:
`encode(params, tokens_bt, mask_bt, cfg) -> hidden_btd` (post-LN BERT encoder, exact-erf GELU) and
`embed(...) -> [b, d]`: mean of the hidden states over the attention mask, then L2 normalisation, as the
sentence-transformers model (Transformer -> Pooling(mean) -> Normalize) computes it.

Parameters are read from the HF `model.safetensors` and stored per layer stacked on a leading `l` axis,
projection weights `[in, out]`, the query/key/value projections fused into one `qkv` `[d, 3d]`. `MiniLM` is the Flax NNX container; `MiniLMEncoder` adds the tokenizer
(truncation to `max_tokens` including [CLS] and [SEP]) and runs batched, jitted, sharded encoding.

Shapes: b batch, t tokens, d width, n heads, h head dim, f MLP width, l layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mixie.assets import minilm_dir
from mixie.cluster.batching import run_batched
from mixie.errors import MixieError
from mixie.sharding import replicated

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder (defaults: all-MiniLM-L6-v2)."""

  vocab_size: int = 30522
  d_model: int = 384
  n_layers: int = 6
  n_heads: int = 12
  d_ff: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  ln_eps: float = 1e-12
  dtype: str = "float32"  # compute dtype

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.d_model // self.n_heads

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "BertConfig":
    """From an HF BERT `config.json` dict."""
    if hf.get("model_type", "bert") != "bert" or hf.get("hidden_act", "gelu") != "gelu":
      raise MixieError(f"unsupported encoder config (need a BERT with exact GELU): "
                       f"model_type={hf.get('model_type')!r} hidden_act={hf.get('hidden_act')!r}")
    return cls(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
               n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
               d_ff=hf["intermediate_size"], max_positions=hf["max_position_embeddings"],
               type_vocab_size=hf.get("type_vocab_size", 2), ln_eps=hf.get("layer_norm_eps", 1e-12),
               **overrides)


# ---------------------------------------------------------------------------------------------------
# Weights.

_LAYER_KEYS = {  # our name -> HF name inside encoder.layer.{i}.
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "o": "attention.output.dense", "attn_ln": "attention.output.LayerNorm",
    "ff_in": "intermediate.dense", "ff_out": "output.dense", "ff_ln": "output.LayerNorm",
}


def params_from_hf(tensors: dict[str, np.ndarray], cfg: BertConfig) -> Params:
  """Our parameter tree from HF BERT tensors (optionally prefixed `bert.`); weights made `[in, out]`."""
  t = {k.removeprefix("bert."): v for k, v in tensors.items()}

  def get(name):
    if name not in t:
      raise MixieError(f"MiniLM checkpoint: tensor {name!r} is missing")
    return np.asarray(t[name], np.float32)

  def ln(prefix):
    return {"scale": get(f"{prefix}.weight"), "bias": get(f"{prefix}.bias")}

  layers: dict[str, Any] = {}
  for ours, hf in _LAYER_KEYS.items():
    per = [f"encoder.layer.{i}.{hf}" for i in range(cfg.n_layers)]
    if ours.endswith("_ln"):
      layers[ours] = {"scale": np.stack([get(p + ".weight") for p in per]),
                      "bias": np.stack([get(p + ".bias") for p in per])}
    else:  # torch Linear stores [out, in]
      layers[ours] = {"w": np.stack([get(p + ".weight").T for p in per]),
                      "b": np.stack([get(p + ".bias") for p in per])}
  # q, k, v as one [d, 3d] projection: one matmul instead of three
  qkv = [layers.pop(n) for n in ("q", "k", "v")]
  layers["qkv"] = {"w": np.concatenate([p["w"] for p in qkv], -1),
                   "b": np.concatenate([p["b"] for p in qkv], -1)}
  params = {
      "word": get("embeddings.word_embeddings.weight"),
      "pos": get("embeddings.position_embeddings.weight"),
      "type": get("embeddings.token_type_embeddings.weight"),
      "emb_ln": ln("embeddings.LayerNorm"),
      "layers": layers,
  }
  want = {"word": (cfg.vocab_size, cfg.d_model), "pos": (cfg.max_positions, cfg.d_model)}
  for k, shape in want.items():
    if params[k].shape != shape:
      raise MixieError(f"MiniLM checkpoint: {k} has shape {params[k].shape}, config says {shape}")
  return params


def load_params(model_dir: str | pathlib.Path, dtype: str = "float32") -> tuple[BertConfig, Params]:
  """`(cfg, params)` from a directory holding `config.json` and `model.safetensors`."""
  from safetensors.numpy import load_file

  d = pathlib.Path(model_dir)
  for f in ("config.json", "model.safetensors"):
    if not (d / f).exists():
      raise MixieError(f"{d / f}: file not found (the MiniLM embedder needs config.json and "
                       "model.safetensors)")
  try:
    cfg = BertConfig.from_hf(json.loads((d / "config.json").read_text()), dtype=dtype)
    tensors = load_file(str(d / "model.safetensors"))
  except (json.JSONDecodeError, OSError, KeyError) as e:
    raise MixieError(f"{d}: unreadable MiniLM checkpoint ({e})") from None
  except Exception as e:  # safetensors raises its own error type on a corrupt header
    raise MixieError(f"{d / 'model.safetensors'}: corrupt safetensors file ({e})") from None
  return cfg, params_from_hf(tensors, cfg)


# ---------------------------------------------------------------------------------------------------
# The forward pass.


def layer_norm(x, p, eps):
  """LayerNorm in f32, returned in x's dtype."""
  xf = x.astype(jnp.float32)
  mu = jnp.mean(xf, -1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
  y = (xf - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]
  return y.astype(x.dtype)


def dense(x, p):
  """`x @ w + b` in x's dtype with f32 accumulation."""
  y = jnp.einsum("...i,io->...o", x, p["w"].astype(x.dtype), preferred_element_type=jnp.float32)
  return (y + p["b"]).astype(x.dtype)


def encode(params: Params, tokens_bt: jax.Array, mask_bt: jax.Array, cfg: BertConfig) -> jax.Array:
  """Final hidden states `[b, t, d]` of the BERT encoder (padding keys masked out, token type 0)."""
  b, t = tokens_bt.shape
  dt = jnp.dtype(cfg.dtype)
  x = (jnp.take(params["word"], tokens_bt, axis=0) + params["pos"][:t][None] + params["type"][0])
  x_btd = layer_norm(x.astype(dt), params["emb_ln"], cfg.ln_eps)
  attn_mask = mask_bt.astype(bool)[:, None, None, :]  # [b, 1(heads), 1(queries), t(keys)]
  n, h = cfg.n_heads, cfg.head_dim

  def body(x_btd, lp):
    q, k, v = jnp.split(dense(x_btd, lp["qkv"]).reshape(b, t, 3, n, h), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    a = jax.nn.dot_product_attention(q, k, v, mask=attn_mask).reshape(b, t, n * h)
    x_btd = layer_norm(x_btd + dense(a, lp["o"]), lp["attn_ln"], cfg.ln_eps)
    f = jax.nn.gelu(dense(x_btd, lp["ff_in"]), approximate=False)
    x_btd = layer_norm(x_btd + dense(f, lp["ff_out"]), lp["ff_ln"], cfg.ln_eps)
    return x_btd, None

  x_btd, _ = jax.lax.scan(body, x_btd, params["layers"])
  return x_btd


def mean_pool_normalize(hidden_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """Mean over the masked positions, then L2 normalisation (f32 `[b, d]`); all-padding rows give 0."""
  m = mask_bt.astype(jnp.float32)[..., None]
  s = jnp.sum(hidden_btd.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  return s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), 1e-12)


def embed(params: Params, tokens_bt: jax.Array, mask_bt: jax.Array, cfg: BertConfig) -> jax.Array:
  """Sentence embeddings `[b, d]`: mean-pooled, L2-normalised final hidden states."""
  return mean_pool_normalize(encode(params, tokens_bt, mask_bt, cfg), mask_bt)


# ---------------------------------------------------------------------------------------------------
# The NNX container and the text-level encoder.


class MiniLM(nnx.Module):
  """Flax NNX container of the encoder parameters; calling it returns sentence embeddings `[b, d]`."""

  def __init__(self, cfg: BertConfig, params: Params):
    self.cfg = cfg
    self.params = nnx.data(jax.tree.map(nnx.Param, params))

  @classmethod
  def from_pretrained(cls, model_dir: str | pathlib.Path | None = None,
                      dtype: str = "float32") -> "MiniLM":
    """Loads `model_dir` (default: the shipped all-MiniLM-L6-v2)."""
    if model_dir is None:
      model_dir = minilm_dir()
    return cls(*load_params(model_dir, dtype))

  def param_tree(self) -> Params:
    """The plain parameter pytree `embed` takes."""
    return jax.tree.map(lambda p: p[...], self.params, is_leaf=lambda x: isinstance(x, nnx.Param))

  def __call__(self, tokens_bt, mask_bt):
    return embed(self.param_tree(), tokens_bt, mask_bt, self.cfg)


def load_tokenizer(model_dir: str | pathlib.Path, max_tokens: int):
  """The model's `tokenizers.Tokenizer`, truncating to `max_tokens` (including [CLS]/[SEP]), no padding."""
  from tokenizers import Tokenizer

  p = pathlib.Path(model_dir) / "tokenizer.json"
  if not p.exists():
    raise MixieError(f"{p}: file not found")
  try:
    tok = Tokenizer.from_file(str(p))
  except Exception as e:  # tokenizers raises a plain Exception on malformed JSON
    raise MixieError(f"{p}: unreadable tokenizer ({e})") from None
  tok.enable_truncation(max_length=max_tokens)
  tok.no_padding()
  return tok


class MiniLMEncoder:
  """Texts -> L2-normalised MiniLM embeddings, each text truncated to `max_tokens` tokens.

  Batched and jitted (one compile per length bucket); with a `mesh` the rows of a batch are sharded
  over its `data` axis and the parameters replicated.
  """

  def __init__(self, model_dir: str | pathlib.Path | None = None, *, max_tokens: int = 128,
               batch: int = 64, mesh: Mesh | None = None, dtype: str = "float32"):
    if model_dir is None:
      model_dir = minilm_dir()
    self.model_dir = pathlib.Path(model_dir)
    self.cfg, params = load_params(self.model_dir, dtype)
    if not 2 <= max_tokens <= self.cfg.max_positions:
      raise MixieError(f"MiniLM max_tokens must be in [2, {self.cfg.max_positions}], got {max_tokens}")
    self.max_tokens, self.batch, self.mesh = max_tokens, batch, mesh
    self.tokenizer = load_tokenizer(self.model_dir, max_tokens)
    self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
    self.params = jax.device_put(params, replicated(mesh)) if mesh is not None else jax.device_put(params)
    self._fn = jax.jit(functools.partial(_embed_jit, cfg=self.cfg))

  @property
  def dim(self) -> int:
    """Embedding width (the model's hidden size)."""
    return self.cfg.d_model

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text ([CLS] ... [SEP], at most `max_tokens`)."""
    return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

  def __call__(self, texts: Sequence[str], progress: bool | None = None) -> np.ndarray:
    """`[n, d]` float32 unit vectors."""
    return run_batched(lambda t, m: self._fn(self.params, t, m), self.tokenize(texts), dim=self.dim,
                       max_len=self.max_tokens, batch=self.batch, pad_id=self.pad_id, mesh=self.mesh,
                       desc="embed (minilm)", progress=progress)


def _embed_jit(params, tokens_bt, mask_bt, *, cfg):
  return embed(params, tokens_bt, mask_bt, cfg)

"""Shared helpers of the tests over a work directory: random host pytrees, a random base with the shipped
tokenizer, the tiny tf-idf run config and a tiny random Llama in HF format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from configs.common import base_config


class NumberTokenizer:
  """Ids <-> space-separated numbers (a stand-in tokenizer with the interface the server uses)."""

  eos_ids = (0,)

  def encode(self, text):
    """Token ids of "3 1 4" -> [3, 1, 4]."""
    return [int(w) for w in text.split()]

  def decode(self, ids):
    """[3, 1, 4] -> "3 1 4"."""
    return " ".join(str(i) for i in ids)


def random_tree(shapes, rng, scale, ones=()):
  """Arrays of `shapes` (a nested dict of shape tuples) drawn on the host, no compile; leaves named in
  `ones` are 1."""
  return {k: random_tree(v, rng, scale, ones) if isinstance(v, dict) else
          (np.ones(v, np.float32) if k in ones else (scale * rng.normal(size=v)).astype(np.float32))
          for k, v in shapes.items()}


def random_base(cfg, rng, scale=0.05):
  """A random base of `cfg` on device (norms 1), the shipped SmolLM2 tokenizer, and the base's
  fingerprint."""
  import jax
  import jax.numpy as jnp

  from mixie import assets
  from mixie.model.checkpoint import fingerprint
  from mixie.model.llama import param_shapes
  from mixie.model.tokenizer import Tokenizer

  params = jax.tree.map(jnp.asarray, random_tree(param_shapes(cfg), rng, scale,
                                                  ones=("attn_norm", "mlp_norm", "final_norm")))
  return params, Tokenizer.from_gguf(assets.smollm2_gguf()), fingerprint(cfg, params)


def clustered_run(tmp_path_factory, name: str, make_config, cfg, seed: int = 0):
  """A tf-idf topics work directory and a random base for tests over a run: `make_config(workdir)` of a
  fresh `workdir`, clustered (`run_cluster`), then `random_base(cfg, rng)`.

  Returns `(workdir, config, rng, params, tokenizer, fingerprint)`; `rng` (seeded `seed`) goes on to draw
  the test's experts."""
  # deferred: conftest imports this module, and mixie.cluster.topics takes ~0.6 s to import
  from mixie.cluster.topics import run_cluster

  wd = tmp_path_factory.mktemp(name) / "w"
  config = make_config(wd)
  run_cluster(config, log=lambda *_: None)
  rng = np.random.default_rng(seed)
  params, tok, fp = random_base(cfg, rng)
  return wd, config, rng, params, tok, fp


def tfidf_run_config(workdir):
  """A config for a tiny, fast run in `workdir`: 300 documents, 3 tf-idf topics, rows of 64 tokens."""
  c = base_config()
  c.workdir = str(workdir)
  c.data.max_docs, c.data.heldout_fraction = 300, 0.1
  c.cluster.embedder, c.cluster.tfidf_dim, c.cluster.k, c.cluster.embed_tokens = "tfidf", 32, 3, 24
  c.dataset.seq_len = 64
  return c


def write_tiny_hf_llama(out: Path, seed: int = 0) -> Path:
  """A random 2-layer Llama (d=32, vocab 49152) as an HF checkpoint directory: config.json,
  model.safetensors (HF tensor names, [out, in] weights) and the shipped SmolLM2 tokenizer. No torch."""
  import safetensors.numpy

  from mixie import assets
  from mixie.model.tokenizer import Tokenizer

  V, D, F, L, N, K = 49152, 32, 64, 2, 4, 2
  H = D // N
  rng = np.random.default_rng(seed)
  w = lambda *s: (0.05 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
  t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": np.ones(D, np.float32)}
  for i in range(L):
    p = f"model.layers.{i}."
    t.update({p + "input_layernorm.weight": np.ones(D, np.float32),
              p + "post_attention_layernorm.weight": np.ones(D, np.float32),
              p + "self_attn.q_proj.weight": w(N * H, D), p + "self_attn.k_proj.weight": w(K * H, D),
              p + "self_attn.v_proj.weight": w(K * H, D), p + "self_attn.o_proj.weight": w(D, N * H),
              p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
              p + "mlp.down_proj.weight": w(D, F)})
  out.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(t, str(out / "model.safetensors"))
  (out / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
      "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": N, "num_key_value_heads": K,
      "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
      "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}))
  Tokenizer.from_gguf(assets.smollm2_gguf()).tok.save(str(out / "tokenizer.json"))
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "add_bos_token": False}))
  return out

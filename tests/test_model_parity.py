"""Logits and generation parity with HF transformers' LlamaForCausalLM, through the NNX modules.

(a) tiny random Llamas (GQA, untied; sharded index; Llama-3 rope scaling) saved with `save_pretrained`;
    20 greedy tokens with and without the KV cache;
(b) the shipped SmolLM2-135M GGUF (30 layers), loaded by transformers' own GGUF support: logits and 20
    greedy tokens with the cache (the recompute-everything path is checked on the tiny model: on
    SmolLM2 it cost prompt + 20 full 30-layer forwards).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding

from mixie import assets
from mixie.model import checkpoint, generate as gen
from mixie.model.llama import bind, forward, init_cache, param_at, param_axes
from mixie.model.load import load_gguf
from mixie.model.lora import LoraConfig, expert_shapes
from mixie.model.tokenizer import pad_right
from mixie.sharding import make_mesh, tree_shardings
from hf_parity import assert_greedy_matches_hf

TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)


def _save_tiny(path, seed=0, max_shard_size=None, **overrides):
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).eval()
  kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, safe_serialization=True, **kw)
  return model


def _hf_logits(model, tokens_bt):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens_bt), dtype=torch.long)).logits.float().numpy()


TOKENS = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 24))


# --- (a) tiny random checkpoints ----------------------------------------------------------------------


def test_tiny_gqa_untied_logits_match_transformers(tmp_path):
  model = _save_tiny(tmp_path)
  cfg, params = checkpoint.load_hf(tmp_path)
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (4, 2, False)
  ours = np.asarray(forward(params, None, TOKENS, cfg)[0])
  np.testing.assert_array_less(np.abs(ours - _hf_logits(model, TOKENS)).max(), 1e-4)


def test_sharded_index_into_sharded_params(tmp_path, monkeypatch):
  """A multi-file checkpoint read straight into parameters split over a 2x4 (data, model) mesh;
  each device's block is read from the file alone (never the whole tensor)."""
  model = _save_tiny(tmp_path, seed=1, max_shard_size="40KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  mesh = make_mesh((2, 4), ("data", "model"))
  rules = (("heads", "model"), ("kv_heads", "model"), ("mlp", "model"), ("vocab", "data"))
  reads = []
  real_read = checkpoint.SafetensorsSource.read
  monkeypatch.setattr(checkpoint.SafetensorsSource, "read",
                      lambda self, name, idx: reads.append(name) or real_read(self, name, idx))
  monkeypatch.setattr(checkpoint, "_read_block", _quarter_blocks(checkpoint._read_block))
  cfg, params = checkpoint.load_hf(
      tmp_path, shardings=lambda c: tree_shardings(param_axes(c), mesh, rules))
  # q has 4 distinct column blocks on 8 devices: layer 0's tensor is read once per block, not per device
  assert reads.count("model.layers.0.self_attn.q_proj.weight") == 4
  q = param_at(params, "q")
  assert isinstance(q.sharding, NamedSharding) and q.sharding.spec[2] == "model"
  assert len({str(s.index) for s in q.addressable_shards}) == 4  # really split, not replicated
  ours = np.asarray(jax.jit(lambda p, t: forward(p, None, t, cfg)[0])(params, TOKENS))
  np.testing.assert_array_less(np.abs(ours - _hf_logits(model, TOKENS)).max(), 1e-4)


def _quarter_blocks(read_block):
  """Wraps `checkpoint._read_block`: every block of a model-sharded matrix is a quarter of its leaf."""

  def wrapped(source, leaf, idx, dt):
    block = read_block(source, leaf, idx, dt)
    if leaf.names[0].endswith(("q_proj.weight", "gate_proj.weight")):
      assert block.shape[-1] * 4 == (64 if "q_proj" in leaf.names[0] else 96), block.shape
    return block

  return wrapped


def test_llama3_rope_scaling_matches_transformers(tmp_path):
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 16, "rope_theta": 10000.0}
  model = _save_tiny(tmp_path, seed=2, rope_scaling=scaling)
  cfg, params = checkpoint.load_hf(tmp_path)
  assert cfg.rope_scaling is not None
  tokens = np.random.default_rng(1).integers(0, TINY["vocab_size"], (1, 64))  # beyond 16 positions
  ours = np.asarray(forward(params, None, tokens, cfg)[0])
  np.testing.assert_array_less(np.abs(ours - _hf_logits(model, tokens)).max(), 1e-4)


def test_param_dtype_casts_per_tensor(tmp_path):
  _save_tiny(tmp_path)
  _, p32 = checkpoint.load_hf(tmp_path)
  cfg, p16 = checkpoint.load_hf(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
  assert cfg.compute_dtype == jnp.bfloat16
  for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
  assert checkpoint.fingerprint(cfg, p16) == checkpoint.fingerprint(cfg, p32)


def test_fingerprint_tells_bases_apart(tmp_path):
  _save_tiny(tmp_path / "a", seed=0)
  _save_tiny(tmp_path / "b", seed=3)
  fa = checkpoint.fingerprint(*checkpoint.load_hf(tmp_path / "a"))
  fb = checkpoint.fingerprint(*checkpoint.load_hf(tmp_path / "b"))
  assert fa != fb and len(fa) == 16
  assert fa == checkpoint.fingerprint(*checkpoint.load_hf(tmp_path / "a"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny")
  model = _save_tiny(path, seed=4)
  cfg, params = checkpoint.load_hf(path)
  return model, cfg, params


def test_prefill_and_decode_steps_match_full_forward(tiny):
  """Right-padded prompts of different lengths, then 3 donated decode steps, against one forward."""
  _, cfg, params = tiny
  full = TOKENS[:, :12]
  ref = np.asarray(forward(params, None, full, cfg)[0])  # causal: position p sees only tokens <= p
  lengths = np.array([9, 6], np.int32)
  prompt = np.where(np.arange(9)[None] < lengths[:, None], full[:, :9], 0)
  cache = init_cache(cfg, 2, 16)
  logits, cache = gen.prefill_jit(params, None, prompt, lengths, cache, cfg)
  for step in range(3):
    pos = lengths + step
    np.testing.assert_allclose(np.asarray(logits), ref[np.arange(2), pos - 1], atol=1e-4)
    logits, cache = gen.decode_step_jit(params, None, full[np.arange(2), pos], cache, cfg)


def test_decode_step_vmaps_over_rows_with_per_row_experts(tiny):
  """Serving's shape: vmap prefill/decode over rows, each row with its own expert."""
  _, cfg, params = tiny
  lora = LoraConfig(rank=4, alpha=8.0)

  rng = np.random.default_rng(0)  # nonzero B (fresh experts have B = 0), so the experts really differ
  experts = [jax.tree.map(lambda s: (0.1 * rng.standard_normal(s)).astype(np.float32),
                          expert_shapes(cfg, lora), is_leaf=lambda x: isinstance(x, tuple))
             for _ in range(2)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *experts)
  prompt, lengths = TOKENS[:, None, :8], np.array([[8], [5]], np.int32)

  def row(expert, prompt_1t, len_1, tok_1):
    logits, cache = gen.prefill(params, expert, prompt_1t, len_1, init_cache(cfg, 1, 12), cfg,
                                lora_scale=lora.scale)
    nxt, _ = gen.decode_step(params, expert, tok_1, cache, cfg, lora_scale=lora.scale)
    return logits, nxt

  toks = TOKENS[:, None, 20]
  got = jax.jit(jax.vmap(row))(stacked, prompt, lengths, toks)
  # Reference: one plain forward per row over prompt + next token (causal, so padding after is inert).
  ref_fn = jax.jit(lambda e, t: forward(params, e, t, cfg, lora_scale=lora.scale)[0])
  for i in range(2):
    n = int(lengths[i, 0])
    seq = np.zeros((1, 9), np.int32)
    seq[0, :n], seq[0, n] = prompt[i, 0, :n], toks[i, 0]
    ref = np.asarray(ref_fn(experts[i], seq))[0]
    np.testing.assert_allclose(np.asarray(got[0][i, 0]), ref[n - 1], atol=1e-4)
    np.testing.assert_allclose(np.asarray(got[1][i, 0]), ref[n], atol=1e-4)
  assert np.abs(np.asarray(got[1][0] - got[1][1])).max() > 1e-3


def test_tiny_greedy_20_tokens_match_transformers_with_and_without_cache(tiny):
  model, cfg, params = tiny
  variants = [{"use_cache": c, "unstack": u} for c, u in ((True, True), (True, False), (False, False))]
  assert_greedy_matches_hf(model, params, cfg, TOKENS[:1, :10], variants)


def test_unstacked_layers_match_stacked(tiny):
  """`Llama.unstacked` (a Python loop over per-layer blocks) computes the same as the scan."""
  _, cfg, params = tiny
  lora = LoraConfig(rank=2, alpha=4.0)
  rng = np.random.default_rng(1)
  expert = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s)).astype(np.float32),
                        expert_shapes(cfg, lora), is_leaf=lambda x: isinstance(x, tuple))
  cache = dict(init_cache(cfg, 2, 12), length=jnp.array([3, 5], jnp.int32))
  cache["k"] = jnp.asarray(rng.standard_normal(cache["k"].shape), jnp.float32)

  def run(p, c, unstack):
    model = bind(cfg, p, expert, lora_scale=2.0)
    model = model.unstacked() if unstack else model
    h, c = model(TOKENS[:, :4], cache=c)
    return model.logits(h), c

  (a, ca), (b, cb) = [jax.jit(run, static_argnums=2)(params, cache, u) for u in (False, True)]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  for n in ("k", "v", "length"):
    np.testing.assert_allclose(np.asarray(ca[n]), np.asarray(cb[n]), atol=1e-5)


def test_stop_tokens_end_rows_and_pad(tiny):
  _, cfg, params = tiny
  prompt = TOKENS[:, :6]
  free, _ = gen.generate(params, None, prompt, np.array([6, 6]), cfg, max_new=6)
  stop = int(np.asarray(free)[0, 2])
  out, n = gen.generate(params, None, prompt, np.array([6, 6]), cfg, max_new=6, stop_tokens=[stop],
                        pad_id=-7)
  out, n = np.asarray(out), np.asarray(n)
  first = int(np.argmax(np.asarray(free)[0] == stop))
  assert n[0] == first + 1 and out[0, first] == stop and (out[0, first + 1:] == -7).all()
  np.testing.assert_array_equal(out[0, :first + 1], np.asarray(free)[0, :first + 1])


def test_sampling_filters_and_frequencies():
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.15, 0.1, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 20000)

  def freqs(**kw):
    toks = jax.vmap(lambda k: gen.sample_logits(logits, k, **kw)[0])(keys)
    return np.bincount(np.asarray(toks), minlength=5) / len(keys)

  np.testing.assert_allclose(freqs(temperature=1.0), [0.4, 0.3, 0.15, 0.1, 0.05], atol=0.015)
  np.testing.assert_allclose(freqs(temperature=1.0, top_k=2), [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0],
                             atol=0.015)
  # top_p=0.8: the smallest set reaching 0.8 is {0, 1, 2} (0.4 + 0.3 < 0.8 <= 0.85)
  np.testing.assert_allclose(freqs(temperature=1.0, top_p=0.8), [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0],
                             atol=0.015)
  assert (freqs(temperature=1.0, top_k=1) == [1, 0, 0, 0, 0]).all()
  assert int(gen.sample_logits(logits, None)[0]) == 0


# --- (b) the shipped SmolLM2 GGUF -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
  """Ours and transformers' SmolLM2 from the same GGUF, two real prompts, and HF's greedy outputs."""
  path = assets.smollm2_gguf()
  cfg, params, tok = load_gguf(path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32).eval()
  docs = json.loads(assets.wiki_summaries_json().read_text())
  texts = [d["extract"] for d in docs.values()]
  prompts = [tok.encode(texts[i])[:n] for i, n in ((0, 40), (1000, 28))]
  greedy = []
  for p in prompts:
    with torch.no_grad():
      greedy.append(hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.pad_id)[0, len(p):].numpy())
  return cfg, params, tok, hf, prompts, greedy


def test_smollm2_logits_match_transformers_gguf(smollm2):
  cfg, params, _, hf, prompts, _ = smollm2
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (30, 576, 9, 3,
                                                                                          True)
  tokens = np.array([prompts[0]])
  ours = np.asarray(forward(params, None, tokens, cfg)[0])
  ref = _hf_logits(hf, tokens)
  assert np.abs(ours - ref).max() <= 1e-3
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_greedy_20_tokens_match_transformers_with_cache(smollm2):
  """Two right-padded prompts of different lengths in one batch; each row against HF alone."""
  cfg, params, tok, _, prompts, greedy = smollm2
  tokens, lengths = pad_right(prompts, tok.pad_id)
  # unstack=False: the scanned decode (the unstacked one, CPU's default, compiles 30 layers one by one,
  # several times slower to compile; the tiny-model tests check that it computes the same).
  out, n = gen.generate(params, None, tokens, lengths, cfg, max_new=20, use_cache=True, unstack=False)
  np.testing.assert_array_equal(np.asarray(out), np.stack(greedy))
  assert (np.asarray(n) == 20).all()


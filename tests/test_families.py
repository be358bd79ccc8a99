"""The architecture table: loaders read names from the family's row; a checkpoint field or tensor the
row does not support fails with one message naming it; the base round-trips through HF names."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mixie.errors import MixieError
from mixie.model import checkpoint, families
from mixie.model.llama import param_at, param_shapes
from mixie.model.lora import PROJECTION_MODULE
from hf_parity import BASE, ROWS, assert_greedy_matches_hf, hf_family_model, write_gguf
from run_utils import write_tiny_hf_llama


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  """A 2-layer Llama checkpoint (max_position_embeddings 512, tied embeddings)."""
  return write_tiny_hf_llama(tmp_path_factory.mktemp("good"))


def _copy(good, d):
  d.mkdir()
  for f in good.iterdir():
    (d / f.name).write_bytes(f.read_bytes())
  return d


def _edit_config(d, **kw):
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(kw)
  (d / "config.json").write_text(json.dumps(cfg))


def test_llama_row_names_every_parameter_and_projection():
  row = families.get("llama")
  cfg_keys = {"embed", "final_norm", "lm_head", "attn_norm", "mlp_norm", *PROJECTION_MODULE}
  assert set(row.hf_tensors) == set(row.gguf_tensors) == cfg_keys
  assert set(row.peft_modules) == set(PROJECTION_MODULE)
  assert (row.norm_offset, row.activation, row.qkv_bias, row.embed_scale) == (0.0, "silu", False, False)


@pytest.mark.parametrize("field, value", [
    ("attention_bias", True), ("mlp_bias", True), ("sliding_window", 16),
    ("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0), ("hidden_act", "gelu"),
    ("query_pre_attn_scalar", 256), ("use_bidirectional_attention", True),
    ("layer_types", ["chunked_attention", "full_attention"]),
])
def test_unsupported_config_field_is_named(good, tmp_path, field, value):
  d = _copy(good, tmp_path / "ckpt")
  _edit_config(d, **{field: value})
  with pytest.raises(MixieError, match=f"{field}=") as e:
    checkpoint.load_hf(d)
  assert str(d / "config.json") in str(e.value) and "llama family" in str(e.value)


def test_a_window_as_long_as_the_positions_is_plain_attention(good, tmp_path):
  """Mistral's config with a window no shorter than max_position_embeddings has no window."""
  d = _copy(good, tmp_path / "ckpt")
  _edit_config(d, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=512)
  cfg, _ = checkpoint.load_hf(d)
  assert (cfg.family, cfg.sliding_window, cfg.layer_windows()) == ("mistral", 0, None)


def test_tensor_the_family_lacks_is_named(good, tmp_path):
  d = _copy(good, tmp_path / "ckpt")
  tensors = load_file(d / "model.safetensors")
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
  save_file(tensors, d / "model.safetensors")
  with pytest.raises(MixieError, match="'model.layers.0.self_attn.q_proj.bias' is not supported"):
    checkpoint.load_hf(d)


def test_unknown_family_and_gguf_architecture():
  from mixie.errors import ConfigError
  with pytest.raises(ConfigError, match="model family 'gpt2'"):
    families.get("gpt2")
  for arch in ("gpt2", "phi3", "gemma3"):
    with pytest.raises(MixieError, match=f"GGUF architecture '{arch}' is not supported"):
      families.for_gguf_architecture(arch, "x.gguf")


def test_hf_tensors_round_trip(good, tmp_path):
  """`hf_tensors` writes the loaded base back under the row's names; loading that gives the same."""
  cfg, params = checkpoint.load_hf(good)
  d = tmp_path / "again"
  d.mkdir()
  (d / "config.json").write_bytes((good / "config.json").read_bytes())
  save_file(checkpoint.hf_tensors(cfg, params), d / "model.safetensors")
  cfg2, params2 = checkpoint.load_hf(d)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.map(np.shape, params) == param_shapes(cfg)
  assert param_at(params, "q").shape == (2, 32, 32)


# --- Each family's row against transformers: a tiny random model, saved by transformers, loaded by us ---


def _zero_biases(cfg, params):
  return cfg, jax.tree_util.tree_map_with_path(
      lambda p, x: np.zeros_like(x) if "bias" in jax.tree_util.keystr(p) else x, params)


def _without(**change):
  return lambda cfg, params: (cfg.replace(**change), params)


# family -> ways to drop its feature (`(cfg, params) -> (cfg, params)`): each must change the logits by
# more than 1e-3, so the parity test can fail (window ignored, caps ignored, Llama's norm/MLP/embedding...)
ABLATIONS = {
    "qwen2": [_zero_biases],
    "mistral": [_without(sliding_window=0)],
    "gemma": [_without(family="llama")],
    "gemma2": [_without(sliding_window=0), _without(local_layers=()), _without(attn_softcap=0.0),
               _without(final_softcap=0.0), _without(query_scale=0.0)],
}


@pytest.fixture(scope="module", params=list(ROWS))
def family_model(request, tmp_path_factory):
  return (request.param,) + hf_family_model(request.param, tmp_path_factory.mktemp(request.param))


TOKENS = np.random.default_rng(1).integers(0, 256, (2, 24))


def test_family_logits_match_transformers(family_model):
  import torch

  from mixie.model.llama import forward
  family, hf, cfg, params = family_model
  assert cfg.family == family
  with torch.no_grad():
    ref = hf(torch.as_tensor(TOKENS)).logits.float().numpy()
  ours = np.asarray(forward(params, None, TOKENS, cfg)[0])
  np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)
  for i, drop in enumerate(ABLATIONS.get(family, ())):  # without the family's feature the logits differ
    cfg2, params2 = drop(cfg, params)
    other = np.asarray(forward(params2, None, TOKENS, cfg2)[0])
    assert np.abs(other - ref).max() > 1e-3, (family, i)


def test_family_greedy_20_tokens_match_transformers_with_and_without_cache(family_model):
  _, hf, cfg, params = family_model
  assert_greedy_matches_hf(hf, params, cfg, TOKENS[:1, :10],
                           ({"use_cache": True}, {"use_cache": True, "unstack": False}, {"use_cache": False}))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  """The tiny random Qwen2 (GQA, untied, non-zero q/k/v biases) of `ROWS`, and its load."""
  return hf_family_model("qwen2", tmp_path_factory.mktemp("qwen2_row"))


def test_qwen2_row_round_trips_through_its_hf_names(qwen2, tmp_path):
  """The row names every parameter of its model (the HF round trip, biases included)."""
  _, cfg, params = qwen2
  assert param_at(params, "q_bias").shape == (2, 64)
  d = tmp_path / "again"
  d.mkdir()
  save_file(checkpoint.hf_tensors(cfg, params), d / "model.safetensors")
  (d / "config.json").write_text(json.dumps({
      "architectures": ["Qwen2ForCausalLM"], "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
      "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}))
  cfg2, params2 = checkpoint.load_hf(d)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_qwen2_gguf_loads_as_transformers_reads_it(qwen2, tmp_path, monkeypatch):
  """A Qwen2 GGUF (llama.cpp's tensor names, Q/K rows unpermuted, biases): transformers' GGUF reader and
  mixie's give the original model's logits; reading it with Llama's Q/K un-permutation would not."""
  import torch
  import transformers

  from mixie.model.llama import forward
  hf, _, _ = qwen2
  write_gguf(hf, tmp_path / "q.gguf", "qwen2")
  with torch.no_grad():
    ref = hf(torch.as_tensor(TOKENS)).logits.float().numpy()
    peer = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf").eval()
    np.testing.assert_allclose(peer(torch.as_tensor(TOKENS)).logits.float().numpy(), ref, atol=1e-5)
  cfg, params = checkpoint.load_gguf(tmp_path / "q.gguf")
  assert cfg.family == "qwen2" and not cfg.tie_embeddings
  np.testing.assert_array_less(np.abs(np.asarray(forward(params, None, TOKENS, cfg)[0]) - ref).max(), 1e-4)
  monkeypatch.setitem(families.FAMILIES, "qwen2", dataclasses.replace(families.QWEN2, gguf_qk_permuted=True))
  cfg, params = checkpoint.load_gguf(tmp_path / "q.gguf")
  assert np.abs(np.asarray(forward(params, None, TOKENS, cfg)[0]) - ref).max() > 1e-3


def test_gemma2_experts_stacked_with_remat_equal_each_alone():
  """Every Gemma 2 switch on (a mixed local/global stack scans its per-layer windows): the gradients of
  3 experts `nnx.vmap`ped with remat "minimal" equal each expert's alone without remat (and with "full")."""
  import jax.numpy as jnp

  from mixie.model.llama import LlamaConfig, bind, forward, init_params, vmap_adapters
  from mixie.model.lora import LoraConfig, init_experts
  cfg = LlamaConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, head_dim=12,
                    family="gemma2", sliding_window=4, local_layers=(True, False, True), query_scale=10.0,
                    attn_softcap=2.0, final_softcap=5.0, tie_embeddings=True)
  base = init_params(cfg, jax.random.PRNGKey(0))
  lora = LoraConfig(rank=4, alpha=8.0)
  experts = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                         init_experts(cfg, lora, jax.random.PRNGKey(1), 3))
  tok = jax.random.randint(jax.random.PRNGKey(3), (3, 2, 12), 0, 97)

  def alone(e, t, remat):
    return forward(base, e, t, cfg, lora_scale=lora.scale, remat=remat)[0].std()

  def stacked(e, t):
    model = bind(cfg, base, e, lora_scale=lora.scale)
    return vmap_adapters(lambda m, t: m.logits(m(t, remat="minimal")[0]).std(), in_axes=(0,))(model, t).sum()

  got = jax.jit(jax.grad(stacked))(experts, tok)
  for i in range(3):
    one = jax.tree.map(lambda x: x[i], experts)
    for remat in (False, True):
      want = jax.grad(alone)(one, tok[i], remat)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(got)) > 1e-2


def test_gemma_embedding_scale_is_rounded_to_the_compute_dtype_as_in_transformers(tmp_path):
  """In bf16, sqrt(48) rounds to 6.9375 before it multiplies the embeddings (HF casts it to the
  activations' dtype): ours equals transformers' scaled embeddings bit for bit."""
  import torch
  import transformers

  from mixie.model.llama import bind
  torch.manual_seed(0)
  hf = transformers.GemmaForCausalLM(transformers.GemmaConfig(**{
      **BASE, "hidden_size": 48, "head_dim": 12})).to(torch.bfloat16).eval()
  hf.save_pretrained(tmp_path)
  cfg, params = checkpoint.load_hf(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
  with torch.no_grad():
    want = hf.model.embed_tokens(torch.as_tensor(TOKENS)).float().numpy()
  got = np.asarray(bind(cfg, params).embed(TOKENS).astype(np.float32))
  np.testing.assert_array_equal(got, want)
  # scaling by the exact sqrt(48), then rounding to bf16, differs: the test can fail
  unrounded = (np.asarray(params["embed"]["embedding"].astype(np.float32))[TOKENS] * np.sqrt(48))
  assert np.abs(np.asarray(jax.numpy.asarray(unrounded, "bfloat16").astype(np.float32)) - want).max() > 0

"""Expert store (round trip, completion marker, base fingerprint) and PEFT export/import (parity with
peft)."""

import json

import jax
import numpy as np
import pytest

from mixie.errors import MixieError
from mixie.model.llama import forward
from mixie.model.lora import LoraConfig, init_expert
from mixie.interop.peft import from_peft_tensors, read_adapter, to_peft_tensors, write_adapter
from mixie.store import ExpertStore
from train_utils import TINY


def _expert(lora, seed=0, cfg=TINY):
  """An expert with random A and non-zero B (as after training)."""
  e = init_expert(cfg, lora, jax.random.PRNGKey(seed))
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), len(e)))
  return {p: {"a": np.asarray(ab["a"]), "b": np.asarray(0.05 * jax.random.normal(next(keys), ab["b"].shape))}
          for p, ab in e.items()}


def _meta(lora, fp="fp-a"):
  return {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets), "base_fingerprint": fp,
          "centroid": [0.1, 0.2], "tokens_seen": 123, "final_loss": 2.5}


def test_store_round_trip_and_listing(tmp_path):
  lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
  store = ExpertStore(tmp_path / "s")
  experts = {t: _expert(lora, t) for t in (3, 11)}
  for t, e in experts.items():
    store.write(t, e, _meta(lora))
  assert store.topics() == [3, 11] and 3 in store and 4 not in store
  params, meta = store.load(11, "fp-a")
  assert meta["topic"] == 11 and meta["centroid"] == [0.1, 0.2] and meta["targets"] == ["q", "v", "down"]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(experts[11])):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  stack, metas = store.load_stack([3, 11], "fp-a")
  assert stack["q"]["a"].shape == (2,) + experts[3]["q"]["a"].shape and [m["topic"] for m in metas] == [3, 11]
  # an entry whose meta.json was never written (killed mid-write) is not listed, and loading it says so
  (store.entry_dir(5)).mkdir()
  (store.entry_dir(5) / "weights.safetensors").write_bytes(b"partial")
  assert store.topics() == [3, 11]
  with pytest.raises(MixieError, match="no expert for topic 5"):
    store.load(5, "fp-a")


def test_store_refuses_another_base_and_corrupt_files(tmp_path):
  lora = LoraConfig(rank=2, alpha=4.0, targets=("q",))
  store = ExpertStore(tmp_path / "s")
  store.write(0, _expert(lora), _meta(lora, fp="aaaa"))
  with pytest.raises(MixieError, match="trained on base aaaa, but the loaded base is bbbb"):
    store.load(0, "bbbb")
  (store.entry_dir(0) / "weights.safetensors").write_bytes(b"\x00" * 20)
  with pytest.raises(MixieError, match="corrupt or truncated safetensors"):
    store.load(0, "aaaa")
  bad = _expert(lora)
  bad["q"]["a"] = bad["q"]["a"][..., :1]  # rank 1 tensors under a rank-2 meta
  with pytest.raises(MixieError, match="do not fit rank 2"):
    store.write(1, bad, _meta(lora))


def test_peft_tensors_round_trip_bit_exact(tmp_path):
  lora = LoraConfig(rank=4, alpha=8.0, dropout=0.05)
  e = _expert(lora)
  t = to_peft_tensors(e)
  assert t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, TINY.d_model)
  assert t["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (TINY.d_model, 4)
  back = from_peft_tensors(t)
  write_adapter(tmp_path / "ad", e, lora)
  back2, lora2 = read_adapter(tmp_path / "ad")
  assert lora2 == lora
  for x in (back, back2):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(e)):
      assert a.dtype == b.dtype and np.array_equal(a, b)
  t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
  with pytest.raises(MixieError, match="missing tensor .*layers.1.mlp.up_proj.lora_B"):
    from_peft_tensors(t)


def test_exported_expert_in_peft_gives_the_same_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from mixie.model.checkpoint import load_hf

  hf_cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                                    rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=128)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  cfg, base = load_hf(tmp_path / "hf")
  lora = LoraConfig(rank=4, alpha=8.0)
  expert = _expert(lora, cfg=cfg)
  write_adapter(tmp_path / "adapter", expert, lora)
  assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
  model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
  tokens = np.random.default_rng(0).integers(0, 97, (2, 16))
  with torch.no_grad():
    want = model(torch.as_tensor(tokens)).logits.numpy()
  got = np.asarray(forward(base, expert, tokens, cfg, lora_scale=lora.scale)[0])
  assert np.abs(got - want).max() <= 1e-4
  # the expert really changes the logits (the comparison is not base vs base)
  assert np.abs(got - np.asarray(forward(base, None, tokens, cfg)[0])).max() > 1e-2

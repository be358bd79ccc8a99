"""Expert store (round trip, completion marker, base fingerprint, the metadata schema and stores written
by earlier versions) and the PEFT adapter format (writer and the one reader; parity with peft)."""

import hashlib
import json

import jax
import numpy as np
import pytest

from mixie.errors import MixieError
from mixie.interop.peft import from_peft_tensors, read_adapter, to_peft_tensors, write_adapter
from mixie.model.llama import forward
from mixie.model.lora import LoraConfig, init_expert
from mixie.store import ExpertMeta, ExpertStore, check_fits, save_tree
from train_utils import TINY


def _expert(lora, seed=0, cfg=TINY):
  """An expert with random A and non-zero B (as after training)."""
  e = init_expert(cfg, lora, jax.random.PRNGKey(seed))
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), len(e)))
  return {p: {"a": np.asarray(ab["a"]), "b": np.asarray(0.05 * jax.random.normal(next(keys), ab["b"].shape))}
          for p, ab in e.items()}


def _meta(lora, fp="fp-a"):
  return ExpertMeta.new(lora, fp, centroid=[0.1, 0.2], tokens_seen=123, final_loss=2.5)


def test_store_round_trip_and_listing(tmp_path):
  lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
  store = ExpertStore(tmp_path / "s")
  experts = {t: _expert(lora, t) for t in (3, 11)}
  for t, e in experts.items():
    store.write(t, e, _meta(lora))
  assert store.topics() == [3, 11] and 3 in store and 4 not in store
  params, meta = store.load(11, "fp-a")
  assert meta.topic == 11 and meta.centroid == (0.1, 0.2) and meta.targets == ("q", "v", "down")
  assert meta.lora == lora and store.lora() == lora and store.metas() == {3: store.meta(3), 11: meta}
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(experts[11])):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  stack, metas = store.load_stack([3, 11], "fp-a")
  assert stack["q"]["a"].shape == (2,) + experts[3]["q"]["a"].shape and [m.topic for m in metas] == [3, 11]
  # an expert written but never committed (a run killed before its commit) is not listed, and loading it
  # says so
  store.staging("killed").write(5, _expert(lora, 5), _meta(lora))
  assert store.topics() == [3, 11]
  with pytest.raises(MixieError, match="no expert for topic 5"):
    store.load(5, "fp-a")


def test_store_refuses_another_base_and_corrupt_files(tmp_path):
  lora = LoraConfig(rank=2, alpha=4.0, targets=("q",))
  store = ExpertStore(tmp_path / "s")
  store.write(0, _expert(lora), _meta(lora, fp="aaaa"))
  with pytest.raises(MixieError, match="trained on base aaaa, but the loaded base is bbbb"):
    store.load(0, "bbbb")
  store.weights_file(0).write_bytes(b"\x00" * 20)
  with pytest.raises(MixieError, match="corrupt weights file of expert 0: its bytes do not match the hash"):
    store.load(0, "aaaa")
  legacy = tmp_path / "legacy" / "topic_000000"  # a store of the layout before generations: no hashes
  legacy.mkdir(parents=True)
  (legacy / "weights.safetensors").write_bytes(b"\x00" * 20)
  (legacy / "meta.json").write_text(json.dumps(_meta(lora, fp="aaaa").to_json()))
  with pytest.raises(MixieError, match="corrupt or truncated safetensors"):
    ExpertStore(tmp_path / "legacy").load(0, "aaaa")
  bad = _expert(lora)
  bad["q"]["a"] = bad["q"]["a"][..., :1]  # rank 1 tensors under a rank-2 meta
  with pytest.raises(MixieError, match="do not fit rank 2"):
    store.write(1, bad, _meta(lora))
  with pytest.raises(MixieError, match="must be an ExpertMeta"):
    store.write(1, _expert(lora), _meta(lora).to_json())  # a hand-made dict: one writer only


# meta.json of an expert and of the all-data LoRA exactly as the stores of earlier versions hold them
# (copied from a run of 2026-11, the centroid shortened): they still load, unchanged, from the layout
# before generations (generation 0), and the first commit keeps them as they were.
OLD_EXPERT_META = {
    "alpha": 16.0, "base_fingerprint": "33e4eabff8214f7e", "budget": 2048, "centroid": [0.25, -0.5, 0.125],
    "final_loss": 2.637050151824951, "format": "mixie_expert/1", "kind": "expert", "merged_topics": [],
    "mode": "experts", "rank": 8, "steps": 9, "targets": ["q", "k", "v", "o", "gate", "up", "down"],
    "tokens_seen": 2278, "topic": 2, "topic_tokens": 211908}
OLD_LORA_ALL_META = {
    "alpha": 16.0, "base_fingerprint": "33e4eabff8214f7e", "final_loss": 2.9672508239746094,
    "format": "mixie_expert/1", "kind": "lora_all", "mode": "lora_all", "rank": 8, "steps": 9,
    "targets": ["q", "k", "v", "o", "gate", "up", "down"], "tokens_seen": 13691, "topic": 0, "topics": 6}


def test_metadata_of_earlier_stores_loads_and_writes_back_byte_for_byte(tmp_path):
  lora = LoraConfig(rank=8, alpha=16.0)
  for topic, old in ((2, OLD_EXPERT_META), (0, OLD_LORA_ALL_META)):
    store = ExpertStore(tmp_path / old["kind"])
    store.entry_dir(topic).mkdir(parents=True)
    save_tree(store.entry_dir(topic) / "weights.safetensors", _expert(lora), {"format": "mixie_expert/1"})
    text = json.dumps(old, indent=2, sort_keys=True) + "\n"  # how mixie.io.atomic_write_json writes
    (store.entry_dir(topic) / "meta.json").write_text(text)
    assert store.generation == 0 and store.meta_file(topic) == store.entry_dir(topic) / "meta.json"
    params, meta = store.load(topic, "33e4eabff8214f7e", lora)
    assert meta.lora == lora and meta.kind == old["kind"] and meta.tokens_seen == old["tokens_seen"]
    assert meta.to_json() == old
    weights = (store.entry_dir(topic) / "weights.safetensors").read_bytes()
    store.write(topic, params, meta)  # rewritten by this version: the same bytes, the same metadata
    assert store.generation == 1 and store.weights_file(topic).read_bytes() == weights
    assert store.meta(topic).to_json() == old and store.sha256(topic) == hashlib.sha256(weights).hexdigest()
    assert (store.entry_dir(topic) / "meta.json").read_text() == text  # the old files are untouched
  m = ExpertStore(tmp_path / "lora_all").meta(0)
  assert m.extra == {"topics": 6} and m.centroid is None and m.merged_topics is None
  assert ExpertStore(tmp_path / "expert").meta(2).centroid == (0.25, -0.5, 0.125)


def test_metadata_is_validated_field_by_field(tmp_path):
  good = dict(OLD_EXPERT_META)
  for change, pattern in (({"rank": "8"}, "field 'rank' has the invalid value '8'"),
                          ({"targets": ["q", "lm_head"]}, "unknown target module"),
                          ({"centroid": [0.1, None]}, "field 'centroid'"),
                          ({"merged_topics": [1.5]}, "field 'merged_topics'"),
                          ({"format": "mixie_expert/2"}, "format 'mixie_expert/2'; this mixie reads"),
                          ({"base_fingerprint": None}, "field 'base_fingerprint'")):
    with pytest.raises(MixieError, match=pattern):
      ExpertMeta.from_json({**good, **change}, where="m.json")
  with pytest.raises(MixieError, match=r"m.json: corrupt expert metadata, missing \['alpha'\]"):
    ExpertMeta.from_json({k: v for k, v in good.items() if k != "alpha"}, where="m.json")
  store = ExpertStore(tmp_path / "s")
  lora = LoraConfig(rank=2, alpha=4.0, targets=("q",))
  store.entry_dir(0).mkdir(parents=True)
  save_tree(store.entry_dir(0) / "weights.safetensors", _expert(lora))
  (store.entry_dir(0) / "meta.json").write_text(json.dumps({**ExpertMeta.new(lora, "fp").to_json(),
                                                            "alpha": "big"}))
  with pytest.raises(MixieError, match=r"topic_000000/meta.json: field 'alpha'"):
    store.load(0, "fp")


def test_an_expert_fits_only_its_base_and_lora_shape():
  lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"))
  meta = ExpertMeta.new(lora, "fp-a", topic=3)
  check_fits(meta, "here", fingerprint="fp-a", lora=LoraConfig(rank=4, alpha=8, targets=("q", "v")))
  check_fits(meta, "here")  # nothing to check
  with pytest.raises(MixieError, match="here: the expert of topic 3 was trained on base fp-a, but the"):
    check_fits(meta, "here", fingerprint="fp-b")
  for other in (LoraConfig(rank=8, alpha=8.0, targets=("q", "v")),
                LoraConfig(rank=4, alpha=4.0, targets=("q", "v")),
                LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v"))):
    want = r"here: expert of topic 3 has rank 4, alpha 8.0, targets \['q', 'v'\]; the other experts have"
    with pytest.raises(MixieError, match=want):
      check_fits(meta, "here", lora=other)


def test_peft_tensors_round_trip_bit_exact(tmp_path):
  lora = LoraConfig(rank=4, alpha=8.0, dropout=0.05)
  e = _expert(lora)
  t = to_peft_tensors(e)
  assert t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, TINY.d_model)
  assert t["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (TINY.d_model, 4)
  back = from_peft_tensors(t)
  write_adapter(tmp_path / "ad", e, lora)
  ad = read_adapter(tmp_path / "ad")
  assert (ad.rank, ad.alpha, ad.dropout, ad.targets, ad.scale) == (4, 8.0, 0.05, lora.targets, lora.scale)
  for x in (back, ad.expert):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(e)):
      assert a.dtype == b.dtype and np.array_equal(a, b)
  t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
  with pytest.raises(MixieError, match="missing tensor .*layers.1.mlp.up_proj.lora_B"):
    from_peft_tensors(t)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gemma2"])
def test_exported_expert_in_peft_gives_the_same_logits(tmp_path, family):
  """An expert exported to PEFT and applied by peft on the transformers model of each family's base
  (Qwen2: q/k/v biases; Mistral: a window; Gemma: (1 + w) norms, GELU-tanh, scaled tied embeddings,
  head_dim != d / n; Gemma 2: caps, local/global layers, post-norms)
  gives mixie's logits."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from hf_parity import hf_family_model

  hf, cfg, base = hf_family_model(family, tmp_path / "hf")
  lora = LoraConfig(rank=4, alpha=8.0)
  expert = _expert(lora, cfg=cfg)
  write_adapter(tmp_path / "adapter", expert, lora)
  assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
  model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
  with torch.no_grad():
    want = model(torch.as_tensor(tokens)).logits.numpy()
  got = np.asarray(forward(base, expert, tokens, cfg, lora_scale=lora.scale)[0])
  assert np.abs(got - want).max() <= 1e-4
  # the expert really changes the logits (the comparison is not base vs base)
  assert np.abs(got - np.asarray(forward(base, None, tokens, cfg)[0])).max() > 1e-2


def test_the_peft_reader_takes_rslora_and_bfloat16_and_refuses_other_adapters_by_name(tmp_path):
  lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"))
  e = _expert(lora)
  write_adapter(tmp_path / "rs", e, lora, extra_config={"use_rslora": True})
  ad = read_adapter(tmp_path / "rs")
  assert ad.use_rslora and ad.scale == pytest.approx(8.0 / 2.0) and ad.targets == ("q", "v")
  for name, change, pattern in (("dora", {"use_dora": True}, "use_dora=true"),
                                ("ia3", {"peft_type": "IA3"}, "peft_type='IA3'"),
                                ("loha", {"peft_type": "LOHA"}, "peft_type='LOHA'"),
                                ("bias", {"bias": "lora_only"}, "LoRA biases"),
                                ("pattern", {"alpha_pattern": {"q_proj": 4}}, "alpha_pattern")):
    write_adapter(tmp_path / name, e, lora, extra_config=change)
    with pytest.raises(MixieError, match=f"{name}: not a PEFT adapter mixie can read: .*{pattern}"):
      read_adapter(tmp_path / name)
  # bfloat16 tensors, as torch saves them (safetensors' numpy API cannot read them)
  torch = pytest.importorskip("torch")
  import safetensors.torch

  t = to_peft_tensors(e)
  write_adapter(tmp_path / "bf16", e, lora)
  safetensors.torch.save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in t.items()},
                              str(tmp_path / "bf16" / "adapter_model.safetensors"))
  ad = read_adapter(tmp_path / "bf16")
  for p in ("q", "v"):
    want = torch.from_numpy(np.array(e[p]["b"])).to(torch.bfloat16).float().numpy()
    assert str(ad.expert[p]["b"].dtype) == "bfloat16"
    np.testing.assert_array_equal(ad.expert[p]["b"].astype(np.float32), want)

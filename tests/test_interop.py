"""PEFT interoperability: export (adapters load in peft and match mixie's logits; the router reads back
and routes like the run's), export -> import round trip bit-exact, foreign adapters (rsLoRA, fewer
targets, lower rank) conformed exactly, bad adapters refused with one clear message, and the CLIs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from configs.common import base_config
from mixie.cluster.embed import TfidfEmbedder, load_embedder
from mixie.errors import MixieError
from mixie.interop import export as interop_export
from mixie.interop import importer
from mixie.interop.peft import write_adapter
from mixie.model.checkpoint import fingerprint, load_hf
from mixie.model.llama import forward
from mixie.model.lora import LoraConfig, expert_shapes
from mixie.route.run import build_router, load_router
from mixie.route.search import l2_normalize
from mixie.store import ExpertMeta, ExpertStore

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
HF = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
          max_position_embeddings=128)
LORA = LoraConfig(rank=4, alpha=8.0)
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 12))
WORDS = [  # four vocabularies; topics 0-2 get trained experts, an expert for the 4th is imported
    "goal match striker league referee stadium coach season penalty tackle keeper cup".split(),
    "oven recipe flour butter simmer garlic sauce bake knead dough pepper onion".split(),
    "galaxy orbit telescope nebula planet comet quasar redshift stellar lunar eclipse asteroid".split(),
    "violin sonata orchestra tempo chord melody concerto rhythm harmony octave pianist cello".split(),
]


def _docs(topic, n, seed):
  rng = np.random.default_rng([topic, seed])
  return [" ".join(rng.choice(WORDS[topic], 10)) + " the of and" for _ in range(n)]


def _trained_expert(cfg, seed, lora=LORA):
  """A LoRA expert with random A and non-zero B (as after training); numpy, nothing to compile."""
  rng = np.random.default_rng(seed)
  return {p: {"a": (rng.uniform(-1, 1, s["a"]) / np.sqrt(s["a"][1])).astype(np.float32),
              "b": (0.05 * rng.standard_normal(s["b"])).astype(np.float32)}
          for p, s in expert_shapes(cfg, lora).items()}


def _write_topics(wd, embedder, centroids, metric="cosine"):
  """The files `mixie.cluster.topics.load_topics` reads, as the cluster stage writes them."""
  d = wd / "topics"
  (d / "done").mkdir(parents=True)
  (d / "done" / "embed.json").write_text(json.dumps({"settings": {}}))
  (d / "done" / "cluster.json").write_text(json.dumps({"settings": {"cluster.metric": metric}}))
  np.save(d / "centroids.npy", centroids.astype(np.float32))
  np.savez(d / "assignment.npz", doc_id=np.asarray(["a"], "U16"), topic=np.zeros(1, np.int32),
           heldout=np.zeros(1, bool))
  (d / "sizes.json").write_text(json.dumps([1] * len(centroids)))
  (d / "quality.json").write_text("{}")
  embedder.save(d / "embedder")


def _config(wd, hf_dir):
  c = base_config()
  c.workdir = str(wd)
  c.model.source, c.model.path = "hf", str(hf_dir)
  c.cluster.embedder = "tfidf"
  c.lora.rank, c.lora.alpha = LORA.rank, LORA.alpha
  c.route.search = "numpy"
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A run's work directory: 4 clustered topics (3 merged into 0), experts for topics 0, 1, 2."""
  tmp = tmp_path_factory.mktemp("interop")
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF)).save_pretrained(tmp / "hf",
                                                                              safe_serialization=True)
  cfg, base = load_hf(tmp / "hf")
  fp = fingerprint(cfg, base)
  train = [d for t in range(4) for d in _docs(t, 12, 0)]  # the corpus also holds topic 3's words
  emb = TfidfEmbedder.fit(train, dim=8)
  cents = np.stack([l2_normalize(l2_normalize(emb.embed(_docs(t, 12, 0))).mean(0)) for t in range(3)])
  cents = np.concatenate([cents, l2_normalize(cents[:1] + 0.3 * cents[1:2])])  # topic 3, merged into 0
  wd = tmp / "wd"
  _write_topics(wd, emb, cents)
  store = ExpertStore(wd / "experts")
  experts = {t: _trained_expert(cfg, t) for t in range(3)}
  for t, e in experts.items():
    store.write(t, e, ExpertMeta.new(LORA, fp, tokens_seen=1000 + t, final_loss=2.5 - t / 10, mode="experts",
                                     steps=7, kind="expert", centroid=cents[t].tolist(), topic_tokens=4000,
                                     budget=1024, merged_topics=[3] if t == 0 else []))
  return dict(tmp=tmp, hf=tmp / "hf", cfg=cfg, base=base, fp=fp, wd=wd, config=_config(wd, tmp / "hf"),
              experts=experts, store=store, embedder=emb)


@pytest.fixture(scope="module")
def exported(run):
  out = run["tmp"] / "export"
  spec = interop_export.export_run(run["config"], out, topics=[0, 2], log=lambda *_: None)
  return out, spec


def _copy_run(run, tmp_path):
  wd = tmp_path / "wd"
  shutil.copytree(run["wd"], wd)
  return _config(wd, run["hf"]), ExpertStore(wd / "experts")


def _hf_model(run):
  return transformers.LlamaForCausalLM.from_pretrained(run["hf"]).eval()


def _logits_torch(model):
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS)).logits.numpy()


_forward = jax.jit(lambda base, expert, tokens, cfg: forward(base, expert, tokens, cfg,
                                                            lora_scale=LORA.scale)[0], static_argnums=3)


def _logits_mixie(run, expert):
  return np.asarray(_forward(run["base"], expert, TOKENS, run["cfg"]))


# --- export ----------------------------------------------------------------------------------------


def test_exported_experts_load_in_peft_and_match_logits(run, exported):
  out, spec = exported
  assert spec["adapters"] == {"0": "expert_0", "2": "expert_2"} and (out / "README.md").exists()
  ac = json.loads((out / "expert_2" / "adapter_config.json").read_text())
  assert (ac["r"], ac["lora_alpha"], ac["peft_type"]) == (4, 8.0, "LORA")
  assert sorted(ac["target_modules"]) == sorted(f"{p}_proj" for p in ("q", "k", "v", "o", "gate", "up", "down"))
  model = peft.PeftModel.from_pretrained(_hf_model(run), out / "expert_0", adapter_name="expert_0").eval()
  model.load_adapter(out / "expert_2", adapter_name="expert_2")  # multi-LoRA, as a server holds them
  base_logits = _logits_mixie(run, None)
  for t in (0, 2):
    model.set_adapter(f"expert_{t}")
    got = _logits_mixie(run, run["experts"][t])
    assert np.abs(got - _logits_torch(model)).max() <= 1e-4
    assert np.abs(got - base_logits).max() > 1e-2  # the expert really changes the logits


def test_exported_router_reads_back_and_routes_like_the_run(run, exported):
  out, spec = exported
  router, spec2 = interop_export.load_exported_router(out)
  assert spec2 == spec
  r = spec["router"]
  assert (r["metric"], r["mode"], r["route_tokens"], spec["embedder"]["kind"]) == ("cosine", "centroid", 32,
                                                                                   "tfidf")
  orig = build_router(run["config"], run["store"])
  assert orig.expert_of_topic.tolist() == [0, 1, 2, 0]  # topic 3 was merged into 0
  assert router.expert_of_topic.tolist() == [0, -1, 2, 0]  # expert 1 not exported: the base
  # the exported embedder files embed exactly as the run's embedder
  texts = [d for t in range(4) for d in _docs(t, 6, 1)]
  q = load_embedder(out / "embedder").embed(texts)
  np.testing.assert_array_equal(q, run["embedder"].embed(texts))
  q = np.concatenate([q, np.random.default_rng(0).standard_normal((50, q.shape[1])).astype(np.float32)])
  want = orig.route(q).expert_ids
  assert len(np.unique(want)) == 3
  np.testing.assert_array_equal(router.route(q).expert_ids, np.where(np.isin(want, [0, 2]), want, -1))
  # and the rule router.json spells out, in plain numpy
  arr = safetensors.numpy.load_file(str(out / "router_centroids.safetensors"))
  rows = np.argmax(l2_normalize(q) @ arr["centroids_kd"].T, axis=1)
  np.testing.assert_array_equal(arr["expert_k"][rows], router.route(q).expert_ids[:, 0])


# --- import ----------------------------------------------------------------------------------------


def test_export_import_round_trip_is_bit_exact(run, exported, tmp_path):
  out, _ = exported
  config = _config(tmp_path / "wd2", run["hf"])  # a fresh run on the same base
  metas = importer.import_run(config, [str(out / "expert_2")], base=(run["cfg"], run["base"], None),
                              log=lambda *_: None)
  store = ExpertStore(tmp_path / "wd2" / "experts")
  assert store.topics() == [0] and metas[0].topic == 0
  params, meta = store.load(0, run["fp"])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(run["experts"][2])):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  old = run["store"].meta(2).to_json()
  drop = ("topic", "imported_from")
  new = meta.to_json()
  assert {k: v for k, v in new.items() if k not in drop} == {k: v for k, v in old.items() if k not in drop}
  assert meta.extra["imported_from"]["topic"] == 2 and meta.extra["imported_from"]["rescale_b"] is None
  # exporting the imported expert again gives the same adapter file, byte for byte
  interop_export.export_run(config, tmp_path / "again", log=lambda *_: None)
  assert (tmp_path / "again" / "expert_0" / "adapter_model.safetensors").read_bytes() == \
      (out / "expert_2" / "adapter_model.safetensors").read_bytes()
  # a store-only run (no clustered topics) routes by the imported centroid
  r = build_router(config)
  assert r.route(np.asarray([old["centroid"]])).expert_ids.tolist() == [[0]]


def test_foreign_rslora_adapter_is_conformed_and_routed(run, tmp_path):
  """A PEFT adapter made elsewhere: rank 2 < 4, three of seven projections, rsLoRA scale."""
  model = peft.get_peft_model(_hf_model(run), peft.LoraConfig(
      r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
      init_lora_weights=False)).eval()
  model.save_pretrained(tmp_path / "foreign")
  want = _logits_torch(model)
  config, store = _copy_run(run, tmp_path)
  before = load_router(config, store)  # saved in the work directory, as `mixie.generate` does
  docs = _docs(3, 10, 5)
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  meta, = importer.import_run(config, [str(tmp_path / "foreign")], [str(tmp_path / "docs.jsonl")],
                              base=(run["cfg"], run["base"], None), log=lambda *_: None)
  assert meta.topic == 4 and meta.kind == "imported"  # after the 4 clustered topics
  info = meta.extra["imported_from"]
  assert info["padded_rank"] and sorted(info["zero_targets"]) == ["gate", "k", "o", "up"]
  assert info["rescale_b"] == pytest.approx((6 / np.sqrt(2)) / (8 / 4))
  expert, _ = store.load(4, run["fp"])
  assert expert["q"]["a"].shape[-1] == 4 and not expert["k"]["b"].any()
  assert np.abs(_logits_mixie(run, expert) - want).max() <= 1e-4
  # centroid: mean of the L2-normalised document embeddings, renormalised (cosine)
  emb = run["embedder"].embed(sorted(set(docs)))
  c = emb.mean(0) / np.linalg.norm(emb.mean(0))
  np.testing.assert_allclose(meta.centroid, c, atol=1e-6)
  # the run's router now reaches it, and still routes the trained topics to their experts
  router = build_router(config, store)
  assert router.n_topics == 5
  q = run["embedder"].embed(_docs(3, 8, 9) + _docs(1, 8, 9))
  assert router.route(q).expert_ids[:, 0].tolist() == [4] * 8 + [1] * 8
  # so does the router `mixie.generate` loads: the one saved before the import is rebuilt
  assert before.n_topics == 4
  after = load_router(config, store)
  assert after.n_topics == 5 and after.route(q).expert_ids[:, 0].tolist() == [4] * 8 + [1] * 8


def _valid_adapter(run, d, **cfg_changes):
  write_adapter(d, run["experts"][1], LORA)
  p = d / "adapter_config.json"
  p.write_text(json.dumps({**json.loads(p.read_text()), **cfg_changes}))
  return d


def _retensor(d, fn):
  t = safetensors.numpy.load_file(str(d / "adapter_model.safetensors"))
  safetensors.numpy.save_file(fn(t), str(d / "adapter_model.safetensors"))


def _bad_adapters(run, tmp):
  """(adapter dir, expected message pattern) for each way an adapter can be unusable."""
  pre = "base_model.model.model.layers"
  cases = [
      (_valid_adapter(run, tmp / "dora", use_dora=True), "use_dora=true"),
      (_valid_adapter(run, tmp / "ia3", peft_type="IA3"), "peft_type='IA3'"),
      (_valid_adapter(run, tmp / "lm_head", modules_to_save=["lm_head"],
                      target_modules=["q_proj", "lm_head"]),
       r"modules_to_save=\['lm_head'\].*target_modules \['lm_head'\] outside the seven"),
      (_valid_adapter(run, tmp / "partial", layers_to_transform=[0]), "layers_to_transform"),
      (_valid_adapter(run, tmp / "pattern", rank_pattern={"q_proj": 2}), "rank_pattern"),
  ]
  d = _valid_adapter(run, tmp / "embed_tensor")
  embed_a = "base_model.model.model.embed_tokens.lora_embedding_A"
  _retensor(d, lambda t: {**t, embed_a: np.zeros((4, 97), np.float32)})
  cases.append((d, "not a LoRA weight of a Llama projection"))
  d = _valid_adapter(run, tmp / "layers")  # 3 layers on a 2-layer base
  _retensor(d, lambda t: {**t, **{k.replace(".1.", ".2."): v for k, v in t.items() if f"{pre}.1." in k}})
  cases.append((d, "the adapter has 3 layers, the base 2"))
  d = _valid_adapter(run, tmp / "width")
  _retensor(d, lambda t: {k: np.zeros((4, 48), np.float32) if "q_proj.lora_A" in k else v
                          for k, v in t.items()})
  cases.append((d, r"self_attn.q_proj.lora_A.weight has shape \(4, 48\), the base needs \(4, 32\)"))
  wide = LoraConfig(rank=8, alpha=16.0)
  d = tmp / "rank8"
  write_adapter(d, _trained_expert(run["cfg"], 0, wide), wide)
  cases.append((d, "rank 8 exceeds the run's expert rank 4"))
  d = _valid_adapter(run, tmp / "other_base")
  (d / interop_export.EXPERT_JSON).write_text(json.dumps({"format": interop_export.FORMAT, "topic": 1,
                                                   "meta": {"base_fingerprint": "0123456789abcdef"}}))
  cases.append((d, "trained on base 0123456789abcdef"))
  cases.append((_valid_adapter(run, tmp / "no_docs"), "no documents given"))
  d = _valid_adapter(run, tmp / "torn")
  (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
  cases.append((d, "not a valid safetensors file"))
  return cases


def test_import_refuses_bad_adapters_with_one_clear_message(run, exported, tmp_path):
  config, store = _copy_run(run, tmp_path)
  before = store.topics()
  good = str(exported[0] / "expert_2")  # importable (it carries its centroid), but not with a bad one
  for d, pattern in _bad_adapters(run, tmp_path):
    with pytest.raises(MixieError, match=pattern) as e:
      importer.import_run(config, [good, str(d)], base=(run["cfg"], run["base"], None), log=lambda *_: None)
    assert str(d) in str(e.value) and "\n" not in str(e.value), (d.name, str(e.value))
  assert store.topics() == before  # nothing was written, not even the good adapter


# --- the CLIs --------------------------------------------------------------------------------------


def test_cli_export_import_refusal_and_list(run, tmp_path):
  flags = [f"--config={ROOT / 'configs' / 'demo.py'}", f"--config.workdir={run['wd']}",
           "--config.model.source=hf", f"--config.model.path={run['hf']}", "--config.cluster.embedder=tfidf",
           "--config.route.search=numpy"]
  p = subprocess.run([sys.executable, "-m", "mixie.export", *flags, f"--out={tmp_path / 'x'}", "--topics=1"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  assert json.loads((tmp_path / "x" / "router.json").read_text())["adapters"] == {"1": "expert_1"}
  assert (tmp_path / "x" / "expert_1" / "adapter_model.safetensors").exists()
  bad = _valid_adapter(run, tmp_path / "dora", use_dora=True)
  p = subprocess.run([sys.executable, "-m", "mixie.experts", "import", *flags, f"--adapter={bad}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert p.stderr.strip().splitlines()[-1].startswith("mixie: error: ") and "use_dora=true" in p.stderr
  p = subprocess.run([sys.executable, "-m", "mixie.experts", "list", *flags], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  lines = p.stdout.strip().splitlines()
  assert lines[0].endswith("experts: 3 expert(s)") and len(lines) == 4
  assert lines[1].split()[:4] == ["0", "expert", "rank", "4"] and "merged topics [3]" in lines[1]
  assert "tokens 1002" in lines[3] and "loss 2.3000" in lines[3]

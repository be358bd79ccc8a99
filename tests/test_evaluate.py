"""Evaluation: routes see only the first P tokens, perplexity after P equals a direct computation from
`forward` logits (base, baselines, routed experts, topk mixtures, oracle), oracle = own topic, topk with
one expert = centroid, outputs written; on a tiny random Llama over a real (tf-idf) topics workdir."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixie import figures
from mixie import io as mio
from mixie.errors import ConfigError, MixieError
from mixie.evaluate import plots
from mixie.evaluate import run as R
from mixie.evaluate.ppl import mixture_scores, pair_logprobs, row_sharding_of
from mixie.evaluate.tables import format_table
from mixie.model.checkpoint import fingerprint
from mixie.model.llama import LlamaConfig, forward
from mixie.model.lora import LoraConfig, expert_shapes
from mixie.route.run import build_routers
from mixie.store import ExpertMeta, ExpertStore, save_tree
from run_utils import random_base, random_tree, tfidf_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = LlamaConfig(vocab_size=49152, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=128)  # the shipped SmolLM2 tokenizer's vocabulary
LORA = LoraConfig(rank=4, alpha=8.0)
WITH_EXPERT = (0, 1)  # topic 2 has no expert: its documents are scored by the base


def _config(workdir):
  c = tfidf_run_config(workdir)
  c.lora.rank, c.lora.alpha = LORA.rank, LORA.alpha
  c.route.knn_k, c.route.topk, c.route.temperature = 4, 2, 0.5
  c.eval.prefix_tokens, c.eval.max_docs, c.eval.batch = (8, 16), 14, 8
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir with real topics (tf-idf) and dataset, random experts for topics 0 and 1, an all-data
  LoRA and a 'full' base; evaluated once."""
  from mixie.cluster.topics import run_cluster

  wd = tmp_path_factory.mktemp("eval") / "w"
  config = _config(wd)
  run_cluster(config, log=lambda *_: None)
  rng = np.random.default_rng(0)
  params, tok, fp = random_base(CFG, rng)
  meta = ExpertMeta.new(LORA, fp)
  experts = {t: random_tree(expert_shapes(CFG, LORA), rng, 0.3) for t in WITH_EXPERT}
  for t, e in experts.items():
    ExpertStore(wd / "experts").write(t, e, meta)
  lora_all = random_tree(expert_shapes(CFG, LORA), rng, 0.3)
  ExpertStore(wd / "lora_all").write(0, lora_all, ExpertMeta.new(LORA, fp, kind="lora_all"))
  full = jax.tree.map(lambda x: np.asarray(x) * (1 + 0.1 * rng.normal(size=x.shape)).astype(np.float32),
                      params)
  save_tree(wd / "full" / "params.safetensors", full)
  mio.atomic_write_json(wd / "full" / "meta.json", {"kind": "full", "base_fingerprint": fp})
  res = R.evaluate(config, loaded=(CFG, params, tok), log=lambda *_: None)
  return dict(config=config, wd=wd, params=params, tok=tok, experts=experts, lora_all=lora_all, full=full,
              res=res, per_doc=mio.load_arrays(wd / "eval" / "per_doc.npz"))


def _heldout(config):
  return R.heldout_set(config, max(config.eval.prefix_tokens) + 1)


@jax.jit
def _ref_logprobs(params, expert, tokens_t):
  """Reference: log p(token t | tokens < t) `[t-1]` of one document, from plain `forward` logits."""
  logits = forward(params, expert, tokens_t[None], CFG, lora_scale=LORA.scale)[0][0]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return logp[jnp.arange(tokens_t.size - 1), tokens_t[1:]]


def test_route_depends_on_the_first_P_tokens_only(run):
  from mixie.cluster.embed import load_embedder
  from mixie.cluster.topics import load_topics, topics_dir
  from mixie.route.run import expert_of_topic

  config, tok = run["config"], run["tok"]
  store = ExpertStore(run["wd"] / "experts")
  routers = build_routers(config, store, R.ROUTED_MODES)
  emb = load_embedder(topics_dir(config.workdir) / "embedder")
  held = _heldout(config)
  own = expert_of_topic(store, load_topics(config.workdir).num_topics)[held.topic_n]
  seen = []

  class Spy:
    dim = emb.dim

    def embed(self, texts, progress=None):
      seen.extend(texts)
      return emb.embed(texts)

  rng = np.random.default_rng(1)
  for P in config.eval.prefix_tokens:
    seen.clear()
    a = R.prefix_routes(routers, Spy(), tok, held.tokens, P, own)
    assert seen == [tok.decode(t[:P].tolist()) for t in held.tokens]  # the embedder saw the prefixes only
    # everything after P replaced by other tokens (of other documents, and random ones)
    after = [np.concatenate([t[:P], held.tokens[(i + 1) % len(held.tokens)][P:],
                             rng.integers(0, 49152, 20)]) for i, t in enumerate(held.tokens)]
    b = R.prefix_routes(routers, emb, tok, after, P, own)
    # ...but the first P tokens changed: the routes do change (the test can fail)
    before = [np.concatenate([held.tokens[(i + 1) % len(held.tokens)][:P], t[P:]])
              for i, t in enumerate(held.tokens)]
    c = R.prefix_routes(routers, emb, tok, before, P, own)
    for m in R.ROUTED_MODES:
      np.testing.assert_array_equal(a[m].expert_ids, b[m].expert_ids)
      np.testing.assert_array_equal(a[m].weights, b[m].weights)
    assert any(not np.array_equal(a[m].weights, c[m].weights) or
               not np.array_equal(a[m].expert_ids, c[m].expert_ids) for m in R.ROUTED_MODES)
    np.testing.assert_array_equal(a["oracle"].expert_ids[:, 0], own)


def test_perplexity_after_P_equals_direct_forward_computation(run):
  config, res, pd = run["config"], run["res"], run["per_doc"]
  held = _heldout(config)
  tok = run["tok"]
  assert tok.add_bos is False  # SmolLM2: documents are tokens + EOS
  experts = {-1: None, **{t: jax.tree.map(jnp.asarray, e) for t, e in run["experts"].items()}}
  models = {"base": run["params"], "full": jax.tree.map(jnp.asarray, run["full"])}
  cache = {}

  def logp(model, key, d):  # log p of each next token of document d (padded to 64: causal, no effect)
    if (model, key, d) not in cache:
      seq = (held.tokens[d].tolist() + [tok.eos_ids[0]])[:64]
      toks = np.zeros(64, np.int32)
      toks[:len(seq)] = seq
      e = jax.tree.map(jnp.asarray, run["lora_all"]) if key == "all" else experts[key]
      cache[model, key, d] = (np.asarray(_ref_logprobs(models[model], e, toks), np.float64), seq)
    return cache[model, key, d]

  rows = res["rows"]
  assert rows == ["base", "lora_all", "full", "centroid", "knn", "topk", "oracle"]
  seen_mixture = False
  for P in config.eval.prefix_tokens:
    for row in rows:
      nll_tot = n_tot = 0.0
      for d in range(res["docs"]):
        if row in ("base", "lora_all", "full"):
          keys, w = [{"lora_all": "all"}.get(row, -1)], [1.0]
          model = "full" if row == "full" else "base"
        elif row == "oracle":
          keys, w, model = [int(pd["own_expert"][d])], [1.0], "base"
        else:
          keys, w, model = pd[f"p{P}.{row}.experts"][d].tolist(), pd[f"p{P}.{row}.weights"][d], "base"
        seen_mixture |= len(keys) > 1 and len(set(keys)) > 1
        lps = [logp(model, k, d) for k in keys]
        seq = lps[0][1]
        # p(token) = sum_g w_g p_g(token), then the log; tokens after the prefix only
        p_t = sum(wi * np.exp(lp[P - 1:len(seq) - 1]) for wi, (lp, _) in zip(w, lps))
        want = -np.log(p_t).sum()
        np.testing.assert_allclose(pd[f"p{P}.{row}.nll"][d], want, rtol=2e-5)
        assert pd[f"p{P}.{row}.tokens"][d] == len(seq) - P
        nll_tot, n_tot = nll_tot + want, n_tot + len(seq) - P
      np.testing.assert_allclose(res["by_prefix"][str(P)]["ppl"][row], np.exp(nll_tot / n_tot), rtol=2e-5)
  assert seen_mixture  # a topk row mixed two different experts


def test_oracle_is_the_documents_own_topic(run):
  from mixie.cluster.topics import load_topics

  res, pd = run["res"], run["per_doc"]
  topics = load_topics(run["config"].workdir)
  topic_of = dict(zip(topics.doc_ids.tolist(), topics.topic_n.tolist()))
  want_topic = np.asarray([topic_of[d] for d in pd["doc_id"].tolist()])
  np.testing.assert_array_equal(pd["topic"], want_topic)
  np.testing.assert_array_equal(pd["own_expert"], np.where(np.isin(want_topic, WITH_EXPERT), want_topic, -1))
  assert set(want_topic.tolist()) == {0, 1, 2}  # every kind of document is present
  for P in run["config"].eval.prefix_tokens:
    assert res["by_prefix"][str(P)]["routing_accuracy"]["oracle"] == 1.0
    no_expert = want_topic == 2  # scored by the base
    np.testing.assert_array_equal(pd[f"p{P}.oracle.nll"][no_expert], pd[f"p{P}.base.nll"][no_expert])
    assert not np.allclose(pd[f"p{P}.oracle.nll"][~no_expert], pd[f"p{P}.base.nll"][~no_expert])
    for m in R.ROUTED_MODES:  # accuracy = top-1 routed expert is the own topic's expert
      ids, w = pd[f"p{P}.{m}.experts"], pd[f"p{P}.{m}.weights"]
      top1 = ids[np.arange(len(ids)), np.argmax(w, axis=1)]
      acc = res["by_prefix"][str(P)]["routing_accuracy"][m]
      assert acc == pytest.approx(np.mean(top1 == pd["own_expert"]))


def test_topk_with_one_expert_equals_centroid(run, tmp_path):
  wd = tmp_path / "w"
  shutil.copytree(run["wd"], wd, ignore=shutil.ignore_patterns("eval"))
  c = _config(wd)
  c.route.topk = 1
  c.eval.route_modes = ("centroid", "topk")
  res = R.evaluate(c, loaded=(CFG, run["params"], run["tok"]), log=lambda *_: None)
  assert res["rows"] == ["base", "lora_all", "full", "centroid", "topk", "oracle"]
  for P in c.eval.prefix_tokens:
    tab = res["by_prefix"][str(P)]
    assert tab["ppl"]["topk"] == tab["ppl"]["centroid"]
    assert tab["ppl_per_topic"]["topk"] == tab["ppl_per_topic"]["centroid"]
    assert tab["routing_accuracy"]["topk"] == tab["routing_accuracy"]["centroid"]
  # and equal to the first run's centroid row: the same routes and scores with other rows around them
  for P in c.eval.prefix_tokens:
    assert res["by_prefix"][str(P)]["ppl"]["centroid"] == run["res"]["by_prefix"][str(P)]["ppl"]["centroid"]


def test_imported_expert_is_routed_to_and_scored_with_its_own_weights(run, tmp_path):
  """An expert beyond the clustered topics (as `mixie.experts import` writes) gets a router row and is scored
  with its own weights (the all-data LoRA's key used to be K, the first imported expert's id)."""
  from mixie.cluster.embed import load_embedder
  from mixie.cluster.topics import load_topics, topics_dir

  wd = tmp_path / "w"
  shutil.copytree(run["wd"], wd, ignore=shutil.ignore_patterns("eval", "router"))
  c = _config(wd)
  tok, K, P = run["tok"], load_topics(wd).num_topics, min(c.eval.prefix_tokens)
  held = _heldout(c)
  # its centroid: the embedding of held-out document d's routing prefix, so that document d routes to it
  emb = load_embedder(topics_dir(wd) / "embedder")
  q_nd = R.embed_queries(emb, tok, P, token_ids=[t[:P].tolist() for t in held.tokens])
  d = int(np.flatnonzero(np.linalg.norm(q_nd, axis=1) > 0.5)[0])  # (tf-idf: a prefix of stop words is 0)
  q = q_nd[d]
  expert = random_tree(expert_shapes(CFG, LORA), np.random.default_rng(7), 0.3)
  store = ExpertStore(wd / "experts")
  store.write(K, expert, ExpertMeta.new(LORA, fingerprint(CFG, run["params"]), centroid=q.tolist()))
  router = build_routers(c, store, ("centroid",))["centroid"]
  assert router.n_topics == K + 1 and router.expert_of_topic[-1] == K
  res = R.evaluate(c, loaded=(CFG, run["params"], tok), log=lambda *_: None)
  pd = mio.load_arrays(wd / "eval" / "per_doc.npz")
  assert pd[f"p{P}.centroid.experts"][d, 0] == K
  seq = (held.tokens[d].tolist() + [tok.eos_ids[0]])[:64]
  toks = np.zeros(64, np.int32)
  toks[:len(seq)] = seq
  lp = np.asarray(_ref_logprobs(run["params"], jax.tree.map(jnp.asarray, expert), toks), np.float64)
  np.testing.assert_allclose(pd[f"p{P}.centroid.nll"][d], -lp[P - 1:len(seq) - 1].sum(), rtol=2e-5)
  for row in ("base", "lora_all", "full"):  # untouched by the import
    assert res["by_prefix"][str(P)]["ppl"][row] == run["res"]["by_prefix"][str(P)]["ppl"][row]


def test_mixture_scores_equal_the_serving_engines_mixture(run):
  """Host-side mixing of per-token probabilities == `mixture_token_logprobs` (full distributions mixed
  on device by the serving engine), for two experts and scoring after P."""
  from mixie.serve.batched import mixture_token_logprobs
  from mixie.serve.cache import ExpertCache

  held = _heldout(run["config"])
  tok, params = run["tok"], run["params"]
  seqs = [(t.tolist() + [tok.eos_ids[0]])[:64] for t in held.tokens[:4]]
  stack = {t: e for t, e in run["experts"].items()}
  cache = ExpertCache(CFG, LORA, lambda k: stack[k], 8)
  doc_m, key_m = np.repeat(np.arange(4), 2), np.tile([0, 1], 4)
  lp_mt = pair_logprobs(R._committed(params), cache, seqs, doc_m, key_m, cfg=CFG, lora_scale=LORA.scale,
                        batch=8, length=64)
  w_ng = np.asarray([[0.3, 0.7], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], np.float32)
  P = 8
  nll, cnt = mixture_scores(lp_mt, np.asarray([len(s) for s in seqs]), np.arange(8).reshape(4, 2), w_ng,
                            np.full(4, P))
  toks = np.zeros((4, 64), np.int32)
  for i, s in enumerate(seqs):
    toks[i, :len(s)] = s
  experts_pg = jax.tree.map(lambda a, b: jnp.stack([jnp.stack([a, b])] * 4), stack[0], stack[1])
  ref = np.asarray(mixture_token_logprobs(params, experts_pg, jnp.asarray(w_ng), jnp.asarray(toks), CFG,
                                          LORA.scale), np.float64)
  for i, s in enumerate(seqs):
    np.testing.assert_allclose(nll[i], -ref[i, P - 1:len(s) - 1].sum(), rtol=2e-5)
    assert cnt[i] == len(s) - P


def test_pair_logprobs_on_a_mesh_and_through_cache_evictions(run):
  """The main job's base lives on its training mesh: scoring there (the rows of a batch split over the
  devices, or not) gives the same numbers; so does a cache of two slots that must evict and reload
  experts between batches."""
  from jax.sharding import NamedSharding, PartitionSpec
  from mixie.serve.cache import ExpertCache
  from mixie.sharding import make_mesh

  held = _heldout(run["config"])
  seqs = [t.tolist()[:40] for t in held.tokens[:6]]
  experts = {**run["experts"], 2: run["lora_all"]}
  doc_m, key_m = np.arange(6), np.asarray([0, 1, -1, 2, 1, 0])
  mesh = make_mesh((2, 1, 1), ("expert", "data", "model"), jax.devices()[:2])
  placed = jax.device_put(run["params"], NamedSharding(mesh, PartitionSpec()))
  assert row_sharding_of(run["params"], 8) is None
  rows = row_sharding_of(placed, 8)
  assert rows.spec == PartitionSpec(("expert",)) and row_sharding_of(placed, 7) is None
  out = []
  for p, rs in ((R._committed(run["params"]), None), (placed, None), (placed, rows)):
    cache = ExpertCache(CFG, LORA, lambda k: experts[k], 8, sharding=R._replicated_like(p))
    out.append(pair_logprobs(p, cache, seqs, doc_m, key_m, cfg=CFG, lora_scale=LORA.scale, batch=8,
                             length=64, row_sharding=rs))
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[0], out[2], rtol=1e-5, atol=1e-6)
  assert np.all(out[0][:, 39:] == 0) and np.all(out[0][:, :39] < 0)
  small = ExpertCache(CFG, LORA, lambda k: experts[k], 2)
  for _ in range(2):  # the second pass starts with experts 1 and 2 resident: 0 is reloaded
    got = pair_logprobs(R._committed(run["params"]), small, seqs, np.repeat(doc_m, 2), np.repeat(key_m, 2),
                        cfg=CFG, lora_scale=LORA.scale, batch=2, length=64)
    np.testing.assert_allclose(got[::2], out[0], rtol=1e-5, atol=1e-6)
  assert small.evictions >= 2 and small.loaded.count(0) == 2


def test_outputs_written(run):
  d = run["wd"] / "eval"
  assert sorted(p.name for p in d.iterdir()) == ["coverage.json", "coverage.png", "per_doc.npz",
                                                  "perplexity.png", "prefix_effect.png",
                                                  "results.json"]  # no temp files
  res = json.loads((d / "results.json").read_text())
  assert res == json.loads(json.dumps(run["res"]))
  assert res["prefix_tokens"] == [8, 16] and res["docs"] + res["docs_too_short"] <= 14
  for P in ("8", "16"):
    tab = res["by_prefix"][P]
    assert set(tab["ppl"]) == set(res["rows"]) and all(np.isfinite(v) for v in tab["ppl"].values())
    assert set(tab["ppl_per_topic"]["base"]) == {"0", "1", "2"}
    assert sum(tab["tokens_per_topic"].values()) == tab["tokens"] > 0
  assert res["by_prefix"]["8"]["tokens"] > res["by_prefix"]["16"]["tokens"]
  for name in ("perplexity", "prefix_effect"):  # the figures the notebooks draw (mixie.evaluate.plots)
    png = (d / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert png == figures.png_bytes(getattr(plots, f"plot_{name}")(res))
  text = format_table(res)
  assert "P=8" in text and "P=16" in text and "oracle" in text and "held-out perplexity" in text


def test_bad_settings_fail_clearly(run, tmp_path):
  c = _config(tmp_path / "x")
  for field, value, msg in (("prefix_tokens", (), "eval.prefix_tokens"),
                            ("prefix_tokens", (0, 8), "eval.prefix_tokens"),
                            ("prefix_tokens", (63,), "eval.prefix_tokens: the largest P"),
                            ("route_modes", ("centroid", "nearest"), "eval.route_modes"),
                            ("batch", 0, "eval.batch")):
    bad = _config(tmp_path / "x")
    bad.eval[field] = value
    with pytest.raises(ConfigError, match=msg):
      R.validate_eval_config(bad)
  with pytest.raises(MixieError, match="no trained experts"):
    R.evaluate(c, loaded=(CFG, run["params"], run["tok"]))
  # an expert trained on another base is refused, naming it
  wd = tmp_path / "w"
  shutil.copytree(run["wd"], wd, ignore=shutil.ignore_patterns("eval"))
  store = ExpertStore(wd / "experts")
  params, meta = store.load(1, None)
  store.write(1, params, dataclasses.replace(meta, base_fingerprint="0000000000000000"))
  with pytest.raises(MixieError, match="topic 1 was trained on base 0000000000000000"):
    R.evaluate(_config(wd), loaded=(CFG, run["params"], run["tok"]), log=lambda *_: None)


def test_cli_one_clear_message(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "mixie.evaluate", "--config=configs/demo.py:tiny",
                      f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stdout + r.stderr
  assert "mixie: error:" in r.stderr and "no trained experts" in r.stderr and "Traceback" not in r.stderr

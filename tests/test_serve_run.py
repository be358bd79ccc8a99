"""Serving a run end to end: the run's router (built from its topics and expert store, saved in
`workdir/router`, reloaded), `mixie.serve.run.make_server`, and the CLI's error path; on a tiny random
Llama over a real (tf-idf) topics workdir."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mixie import assets
from mixie.model.generate import generate
from mixie.model.llama import LlamaConfig
from mixie.model.lora import LoraConfig, expert_shapes
from mixie.route.router import ROUTER_JSON, prefix_token_ids
from mixie.route.run import build_router, expert_of_topic, load_router, router_dir
from mixie.serve.run import make_server
from mixie.store import ExpertMeta, ExpertStore
from run_utils import clustered_run, random_tree, tfidf_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = LlamaConfig(vocab_size=49152, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=256)  # the shipped SmolLM2 tokenizer's vocabulary
LORA = LoraConfig(rank=4, alpha=8.0)


def _config(workdir):
  c = tfidf_run_config(workdir)
  c.route.route_tokens = 12
  c.generate.cache_experts = 1  # fewer slots than experts: the batch is split
  c.generate.max_new_tokens = 6
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Topics of 300 documents (k = 3); experts for topics 0 and 2, topic 1 merged into topic 0."""
  wd, config, rng, params, tok, fp = clustered_run(tmp_path_factory, "serve", _config, CFG)
  experts = {t: random_tree(expert_shapes(CFG, LORA), rng, 0.3) for t in (0, 2)}
  store = ExpertStore(wd / "experts")
  store.write(0, experts[0], ExpertMeta.new(LORA, fp, merged_topics=[1]))
  store.write(2, experts[2], ExpertMeta.new(LORA, fp))
  with open(assets.wiki_summaries_json()) as f:
    texts = [d["extract"][:400] for d in list(json.load(f).values())[:5]]
  return dict(config=config, params=params, tok=tok, experts=experts, store=store, texts=texts)


def test_expert_of_topic_follows_merges(run):
  np.testing.assert_array_equal(expert_of_topic(run["store"], 4), [0, 0, 2, -1])


def test_run_router_is_saved_and_reloaded(run, monkeypatch):
  config = run["config"]
  r = load_router(config, run["store"])
  assert (router_dir(config.workdir) / ROUTER_JSON).exists()
  np.testing.assert_array_equal(r.expert_of_topic, [0, 0, 2])
  assert r.n_topics == 3 and r.cfg.search.metric == config.cluster.metric
  import mixie.route.run as run_mod
  monkeypatch.setattr(run_mod, "build_router", lambda *a, **k: pytest.fail("rebuilt a saved router"))
  again = load_router(config, run["store"])
  np.testing.assert_array_equal(again.centroids, r.centroids)
  monkeypatch.undo()
  knn = config.copy_and_resolve_references()
  knn.route.mode, knn.route.knn_k = "knn", 5
  rk = load_router(knn, run["store"])  # other settings: built again, from the training documents
  assert rk.cfg.mode == "knn" and rk.doc_emb.shape[0] == int((~_topics(config).heldout_n).sum())


def _topics(config):
  from mixie.cluster.topics import load_topics
  return load_topics(config.workdir)


def test_make_server_routes_with_the_run_router_and_serves(run):
  from mixie.cluster.embed import load_embedder
  from mixie.cluster.topics import topics_dir

  config, params, tok = run["config"], run["params"], run["tok"]
  server = make_server(config, loaded=(CFG, params, tok))
  assert server.cache.capacity == 1 and server.lora == LORA
  res = server.generate(run["texts"], max_new_tokens=6)
  # the route of each prompt: the run's router over the embedder's view of its first 12 tokens
  embedder = load_embedder(topics_dir(config.workdir) / "embedder")
  want = build_router(config, run["store"]).route_queries(embedder, tok, texts=run["texts"])
  assert [r.expert for r in res] == want.expert_ids[:, 0].tolist()
  assert set(want.expert_ids[:, 0].tolist()) == {0, 2}  # both experts: two batches with one slot
  for r, text in zip(res, run["texts"]):
    assert r.error is None
    ids = tok.encode(text)
    buf = np.zeros((1, 160), np.int32)  # one padded width: one compile for every reference
    buf[0, :len(ids)] = ids
    out, n = generate(params, run["experts"][r.expert], buf, np.asarray([len(ids)]), CFG,
                      max_new=6, lora_scale=LORA.scale, stop_tokens=tok.eos_ids)
    ref = [int(t) for t in np.asarray(out[0, :int(n[0])])]
    ref = ref[:-1] if ref and ref[-1] in tok.eos_ids else ref
    assert r.tokens == ref and r.text == tok.decode(ref)
  assert len(prefix_token_ids(tok, 12, texts=run["texts"])[0]) == 12


def test_cli_errors_are_one_clear_message(run, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "mixie.generate", "--config=configs/demo.py:tiny",
                      f"--workdir={tmp_path}", "--prompt=hello"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 2, p.stderr
  assert p.stderr.strip().splitlines()[-1] == (f"mixie: error: {tmp_path}/experts: no trained experts; "
                                               "run `python -m mixie.train --config=...` first")
  assert "Traceback" not in p.stderr

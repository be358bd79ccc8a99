"""Serving with a fallback and a request log: below the confidence threshold the fallback model (the
base, or the all-data LoRA) serves the prompt, token for token as that model alone; every prompt is
logged as one JSON line (no text), and several processes append to one log without tearing lines."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixie.errors import ConfigError
from mixie.model.checkpoint import fingerprint
from mixie.model.generate import generate
from mixie.model.llama import LlamaConfig, param_shapes
from mixie.model.lora import LoraConfig, expert_shapes
from mixie.route.fallback import Policy
from mixie.route.router import Router, RouterConfig
from mixie.route.search import SearchConfig
from mixie.serve.request_log import RequestLog
from mixie.serve.server import Server
from mixie.store import ExpertMeta, ExpertStore
from run_utils import NumberTokenizer, random_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = LlamaConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=128)
LORA = LoraConfig(rank=4, alpha=8.0)
K = 6
MAX_NEW = 6
THRESHOLD = 0.5  # margin: a prompt "t 0 ..." has margin sqrt(2) ~ 1.41, "t 9 ..." ~0.10 (see _Embedder)


class _Embedder:
  """Prompt "t s ...": e_t + (s / 10) e_{t+1}. Routed to topic t; the larger s, the nearer the next
  topic's centroid and the smaller the margin (cosine: 1.41 at s = 0, 0.10 at s = 9)."""

  def embed(self, texts):
    out = np.zeros((len(texts), K), np.float32)
    for i, t in enumerate(texts):
      w = [int(x) for x in t.split()]
      out[i, w[0] % K] = 1.0
      out[i, (w[0] + 1) % K] += (w[1] if len(w) > 1 else 0) / 10.0
    return out


@pytest.fixture(scope="module")
def model():
  rng = np.random.default_rng(0)
  params = jax.tree.map(jnp.asarray, random_tree(param_shapes(CFG), rng, 0.02,
                                                  ones=("attn_norm", "mlp_norm", "final_norm")))
  experts = [random_tree(expert_shapes(CFG, LORA), rng, 0.2) for _ in range(K + 1)]  # last: lora_all
  return params, experts


@pytest.fixture()
def stores(model, tmp_path):
  params, experts = model
  fp = fingerprint(CFG, params)
  store, lora_all = ExpertStore(tmp_path / "experts"), ExpertStore(tmp_path / "lora_all")
  for t in range(K):
    store.write(t, experts[t], ExpertMeta.new(LORA, fp))
  lora_all.write(0, experts[K], ExpertMeta.new(LORA, fp, kind="lora_all"))
  return store, lora_all


def _server(model, stores, policy, log=None, slots=2):
  params, _ = model
  store, lora_all = stores
  router = Router(np.eye(K, dtype=np.float32), RouterConfig(route_tokens=2,
                                                            search=SearchConfig(backend="brute")))
  return Server(CFG, params, NumberTokenizer(), store, router, _Embedder(), cache_slots=slots,
                length_bucket=16, policy=policy, lora_all_store=lora_all, request_log=log)


def _reference(params, expert, prompt):
  """Greedy tokens of one prompt alone with `expert` (None: the base), cut at the stop token 0."""
  buf = np.zeros((1, 16), np.int32)
  buf[0, :len(prompt)] = prompt
  out, _ = generate(params, None if expert is None else jax.tree.map(jnp.asarray, expert), buf,
                    np.asarray([len(prompt)]), CFG, max_new=MAX_NEW, lora_scale=LORA.scale)
  toks = [int(t) for t in np.asarray(out[0])][:MAX_NEW]
  return toks[:toks.index(0)] if 0 in toks else toks


PROMPTS = ["1 0 5 7 11", "2 9 5 7", "3 0 8 8 8 2", "4 9 3", "5 1 40 41"]
LOW = [False, True, False, True, False]


@pytest.mark.parametrize("fallback", ["base", "lora_all"])
def test_below_min_confidence_the_fallback_serves(model, stores, fallback):
  params, experts = model
  server = _server(model, stores, Policy(fallback, "margin", THRESHOLD))
  res = server.generate(PROMPTS, max_new_tokens=MAX_NEW)
  fb_expert = None if fallback == "base" else experts[K]
  for r, p, low in zip(res, PROMPTS, LOW):
    ids = NumberTokenizer().encode(p)
    assert r.error is None
    assert (r.confidence["margin"] < THRESHOLD) == low, r.confidence
    if low:
      assert r.fallback == fallback and r.expert == -1 and r.experts == ()
      assert r.tokens == _reference(params, fb_expert, ids)
    else:
      assert r.fallback == "" and r.expert == ids[0] % K
      assert r.tokens == _reference(params, experts[ids[0] % K], ids)
  # the fallback's tokens differ from what the routed expert would have said (the test can fail)
  assert res[1].tokens != _reference(params, experts[2], NumberTokenizer().encode(PROMPTS[1]))
  # without a fallback, the same prompts are served by their routed experts
  plain = _server(model, stores, Policy("none", "margin", THRESHOLD)).generate(PROMPTS,
                                                                            max_new_tokens=MAX_NEW)
  assert [r.expert for r in plain] == [int(p.split()[0]) % K for p in PROMPTS]
  assert not any(r.fallback for r in plain)


def test_topk_rows_below_the_threshold_fall_back_whole(model, stores):
  params, experts = model
  server = _server(model, stores, Policy("base", "margin", THRESHOLD), slots=4)
  server.router = server.router.with_config(mode="topk", topk=2)
  res = server.generate(PROMPTS[:2], max_new_tokens=MAX_NEW)
  assert len(res[0].experts) == 2 and res[0].fallback == ""
  assert res[1].fallback == "base"
  assert res[1].tokens == _reference(params, None, NumberTokenizer().encode(PROMPTS[1]))


def test_lora_all_fallback_needs_its_store(model, stores):
  params, _ = model
  with pytest.raises(ConfigError, match="route.fallback='lora_all'"):
    Server(CFG, params, NumberTokenizer(), stores[0], None, _Embedder(),
           policy=Policy("lora_all", "margin", 0.5))


def test_every_prompt_is_logged_as_one_json_line_without_text(model, stores, tmp_path):
  log_file = tmp_path / "logs" / "requests.jsonl"
  server = _server(model, stores, Policy("base", "margin", THRESHOLD), log=RequestLog(str(log_file)))
  res = server.generate(PROMPTS, max_new_tokens=MAX_NEW)
  res2 = server.generate(PROMPTS[:1], max_new_tokens=MAX_NEW)
  lines = log_file.read_text().splitlines()
  assert len(lines) == len(PROMPTS) + 1
  recs = [json.loads(line) for line in lines]
  keys = {"v", "time", "source", "batch", "batch_size", "prefix_sha256", "mode", "routed", "experts",
          "fallback", "distance", "margin", "vote_share", "confidence", "threshold", "tokens_in",
          "tokens_out", "latency_ms", "error"}
  for rec, r, p, low in zip(recs, res + res2, PROMPTS + PROMPTS[:1], LOW + LOW[:1]):
    assert set(rec) == keys
    ids = NumberTokenizer().encode(p)
    assert rec["prefix_sha256"] == hashlib.sha256(np.asarray(ids[:2], "<i4").tobytes()).hexdigest()[:16]
    assert rec["fallback"] == ("base" if low else None) and rec["source"] == "server"
    assert rec["routed"] == [[ids[0] % K, 1.0]]
    assert rec["experts"] == ([] if low else [[ids[0] % K, 1.0]])
    assert rec["margin"] == pytest.approx(r.confidence["margin"]) == pytest.approx(rec["confidence"])
    assert rec["vote_share"] is None and rec["threshold"] == THRESHOLD and rec["mode"] == "centroid"
    assert rec["tokens_in"] == len(ids) and rec["tokens_out"] == len(r.tokens)
    assert set(rec["latency_ms"]) == {"route", "load", "prefill", "decode"}
    assert all(v >= 0 for v in rec["latency_ms"].values())
    assert rec["latency_ms"]["prefill"] > 0 and rec["latency_ms"]["decode"] > 0
  assert len({r["batch"] for r in recs}) == 2 and recs[0]["batch_size"] == len(PROMPTS)
  text = log_file.read_text()
  assert not any(p in text for p in PROMPTS)  # no prompt text (each has 3+ numbers in a row)


_WRITER = """
import sys
from mixie.serve.request_log import RequestLog
log = RequestLog(sys.argv[1])
w = int(sys.argv[2])
for i in range(200):
  log.append([{"writer": w, "seq": i, "pad": "x" * 9000}])  # lines over PIPE_BUF (4096 bytes)
"""


def test_concurrent_writers_never_tear_a_line(tmp_path):
  path = tmp_path / "shared.jsonl"
  env = dict(os.environ, PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(w)], env=env)
           for w in range(4)]
  assert all(p.wait(timeout=300) == 0 for p in procs)
  recs = [json.loads(line) for line in path.read_text().splitlines()]
  assert len(recs) == 800
  for w in range(4):
    assert [r["seq"] for r in recs if r["writer"] == w] == list(range(200))


def test_a_failing_log_never_fails_a_request(model, stores, tmp_path, capsys):
  log = RequestLog(str(tmp_path / "x.jsonl"))
  log.path = str(tmp_path / "missing_dir" / "x.jsonl")  # the directory vanished under the server
  server = _server(model, stores, Policy(), log=log)
  res = server.generate(PROMPTS[:2], max_new_tokens=MAX_NEW)
  assert all(r.error is None and r.tokens for r in res)
  assert log.failed == 2 and "request log" in capsys.readouterr().err

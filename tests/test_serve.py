"""Serving: a mixed-expert batch equals each row run alone with its expert; the expert cache evicts and
reloads correctly; a missing or corrupt expert fails only its own request."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixie.errors import ConfigError, MixieError
from mixie.model.checkpoint import fingerprint
from mixie.model.generate import generate
from mixie.model.llama import LlamaConfig, forward, init_cache, param_shapes
from mixie.model.lora import LoraConfig, expert_shapes
from mixie.route.router import Router, RouterConfig
from mixie.route.search import SearchConfig
from mixie.serve.batched import (decode_rows, gather_experts, generate_rows, mixture_token_logprobs,
                                 prefill_rows, rows_forward, rows_prefill)
from mixie.serve.cache import ExpertCache
from mixie.serve.server import Server
from mixie.store import ExpertMeta, ExpertStore
from run_utils import NumberTokenizer, random_tree

CFG = LlamaConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=128)
LORA = LoraConfig(rank=4, alpha=8.0)
N_EXPERTS = 6
T, MAX_NEW = 16, 8  # one prompt width and one decode length: few compiles
NO_STOP = jnp.asarray([-2], jnp.int32)  # matches no token


def _model():
  """A random base and N_EXPERTS random experts with non-zero b (fresh ones would equal the base)."""
  rng = np.random.default_rng(0)
  params = random_tree(param_shapes(CFG), rng, 0.02, ones=("scale",))  # norms: 1
  shapes = jax.tree.map(lambda s: (N_EXPERTS,) + s, expert_shapes(CFG, LORA),
                        is_leaf=lambda x: isinstance(x, tuple))
  experts = random_tree(shapes, rng, 0.2)
  return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, experts)


def _one(experts, i):
  """Expert i of a stack; -1: the zero expert (exactly the base, see the first test)."""
  return jax.tree.map(lambda x: x[i] * (i >= 0), experts)


@jax.jit
def _ref_logits(params, expert, tokens_bt):
  return forward(params, expert, tokens_bt, CFG, lora_scale=LORA.scale)[0]


def _ref_generate(params, expert, prompt, max_new=MAX_NEW):
  """Reference: `mixie.model.generate.generate`, this row alone with its expert, greedy."""
  tokens, lengths = _padded([prompt])
  out, _ = generate(params, expert, tokens, np.asarray(lengths), CFG, max_new=max_new,
                    lora_scale=LORA.scale)
  return [int(t) for t in np.asarray(out[0])]


@pytest.fixture(scope="module")
def model():
  return _model()


def _prompts(lengths, seed=2):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(1, CFG.vocab_size, n)) for n in lengths]


def _padded(prompts, t=T):
  out = np.zeros((len(prompts), t), np.int32)
  for i, p in enumerate(prompts):
    out[i, :len(p)] = p
  return jnp.asarray(out), jnp.asarray([len(p) for p in prompts], jnp.int32)


def test_gather_experts_and_zero_expert_is_the_base(model):
  params, experts = model
  slots = jnp.array([2, -1, 0])
  got = gather_experts(experts, slots)
  np.testing.assert_array_equal(got["q"]["a"][0], experts["q"]["a"][2])
  assert not np.any(got["down"]["b"][1])
  tokens = jnp.asarray(_prompts([T, T, T]))
  base, _ = jax.jit(forward, static_argnums=3)(params, None, tokens[1:2], CFG)
  np.testing.assert_allclose(rows_forward(params, got, tokens, CFG, lora_scale=LORA.scale)[1], base[0],
                             rtol=1e-6, atol=1e-6)


def test_mixed_batch_logits_equal_each_row_alone(model):
  params, experts = model
  rows = [3, 0, 5, -1, 3, 1]
  prompts = _prompts([11, 4, 9, 7, 1, T])
  tokens_bt, lengths_b = _padded(prompts)
  experts_b = gather_experts(experts, jnp.array(rows))
  logits_btv = jax.jit(rows_forward, static_argnums=3, static_argnames="lora_scale")(
      params, experts_b, tokens_bt, CFG, lora_scale=LORA.scale)
  last_bv, cache = jax.jit(rows_prefill, static_argnums=5, static_argnames="lora_scale")(
      params, experts_b, tokens_bt, lengths_b, init_cache(CFG, 6, T + 4), CFG, lora_scale=LORA.scale)
  np.testing.assert_array_equal(cache["length"], lengths_b)
  for i, (e, p) in enumerate(zip(rows, prompts)):
    ref = _ref_logits(params, _one(experts, e), tokens_bt[i:i + 1])[0]  # padding after p: causal
    np.testing.assert_allclose(logits_btv[i, :len(p)], ref[:len(p)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last_bv[i], ref[len(p) - 1], rtol=1e-5, atol=1e-5)
  # the rows really differ by expert: same prompt, other expert, other logits
  other = _ref_logits(params, _one(experts, 1), tokens_bt[:1])[0]
  assert np.abs(np.asarray(other[:11]) - np.asarray(logits_btv[0, :11])).max() > 1e-2


def test_mixed_batch_greedy_tokens_equal_each_row_alone(model):
  params, experts = model
  rows = [4, -1, 1, 2, 1, 0]
  prompts = _prompts([5, 13, 1, 8, 8, 3], seed=3)
  tokens_bt, lengths_b = _padded(prompts)
  out_pn, n_p = generate_rows(params, gather_experts(experts, jnp.array(rows)), jnp.ones((6, 1)),
                              tokens_bt, lengths_b, NO_STOP, jax.random.key(0),
                              cfg=CFG, lora_scale=LORA.scale, max_new_tokens=MAX_NEW)
  assert np.all(np.asarray(n_p) == MAX_NEW)
  for i, (e, p) in enumerate(zip(rows, prompts)):
    np.testing.assert_array_equal(out_pn[i], _ref_generate(params, _one(experts, e), p), err_msg=f"row {i}")


def test_stop_tokens_and_sampling(model):
  params, experts = model
  prompts = _prompts([6, 6, 6, 3, 9, 1], seed=4)
  tokens_bt, lengths_b = _padded(prompts)
  experts_b = gather_experts(experts, jnp.array([0, 1, 2, 3, 4, 5]))
  args = (params, experts_b, jnp.ones((6, 1)), tokens_bt, lengths_b)
  kw = dict(cfg=CFG, lora_scale=LORA.scale, max_new_tokens=MAX_NEW)
  greedy, _ = generate_rows(*args, NO_STOP, jax.random.key(0), **kw)
  greedy = np.asarray(greedy)
  stop = int(greedy[1, 2])  # row 1 stops at its third token (or earlier if it repeats)
  out, n = generate_rows(*args, jnp.asarray([stop]), jax.random.key(0), **kw)
  out, n = np.asarray(out), np.asarray(n)
  first = int(np.argmax(greedy[1] == stop))
  assert n[1] == first + 1 and out[1, first] == stop and np.all(out[1, first + 1:] == -1)
  np.testing.assert_array_equal(out[1, :first + 1], greedy[1, :first + 1])
  top1, _ = generate_rows(*args, NO_STOP, jax.random.key(5), temperature=1.0, top_k=1, **kw)
  np.testing.assert_array_equal(top1, greedy)  # top-k 1 sampling is greedy
  s1, _ = generate_rows(*args, NO_STOP, jax.random.key(1), temperature=1.0, **kw)
  s2, _ = generate_rows(*args, NO_STOP, jax.random.key(2), temperature=1.0, **kw)
  assert not np.array_equal(s1, s2) and not np.array_equal(s1, greedy)
  # the server's two calls (prefill, then the decode loop from its carry) give the same tokens as the one
  # call above: greedy with a stop token on the scanned layers, sampled on the unstacked ones
  for stops, key, temp, unstack, want in ((jnp.asarray([stop]), jax.random.key(0), 0.0, False, out),
                                          (NO_STOP, jax.random.key(1), 1.0, True, s1)):
    carry = prefill_rows(*args, stops, key, temperature=temp, **kw)
    got, n_got = decode_rows(*args[:3], stops, carry, temperature=temp, unstack=unstack, **kw)
    np.testing.assert_array_equal(got, want)
    if want is out:
      np.testing.assert_array_equal(n_got, n)


def test_topk_mixture_scoring_and_greedy_generation(model):
  params, experts = model
  pairs = np.array([[0, 3], [5, -1]])
  w = np.array([[0.7, 0.3], [0.4, 0.6]], np.float32)
  tokens = jnp.asarray(_prompts([T + 1, T + 1], seed=5))
  experts_pg = jax.tree.map(lambda x: x.reshape((2, 2) + x.shape[1:]),
                            gather_experts(experts, jnp.asarray(pairs.reshape(-1))))
  got = mixture_token_logprobs(params, experts_pg, jnp.asarray(w), tokens, CFG, LORA.scale)
  for i in range(2):
    probs = 0
    for j in range(2):
      p = jax.nn.softmax(_ref_logits(params, _one(experts, pairs[i, j]), tokens[i:i + 1, :-1])[0], -1)
      probs = probs + w[i, j] * np.take_along_axis(np.asarray(p), np.asarray(tokens[i, 1:, None]), 1)[:, 0]
    np.testing.assert_allclose(got[i], np.log(probs), rtol=1e-5, atol=1e-5)

  # generation: each step argmax of the mixed distribution, recomputed here without a cache
  prompts = _prompts([4, 7], seed=6)
  tokens_bt, lengths_b = _padded(prompts)
  out, _ = generate_rows(params, gather_experts(experts, jnp.asarray(pairs.reshape(-1))), jnp.asarray(w),
                         jnp.repeat(tokens_bt, 2, 0), jnp.repeat(lengths_b, 2), NO_STOP,
                         jax.random.key(0), cfg=CFG, lora_scale=LORA.scale, max_new_tokens=5)
  for i, p in enumerate(prompts):
    seq = list(p)
    for step in range(5):
      mix = 0
      buf, _ = _padded([seq])
      for j in range(2):
        mix = mix + w[i, j] * jax.nn.softmax(_ref_logits(params, _one(experts, pairs[i, j]), buf)[0, len(seq) - 1])
      seq.append(int(np.argmax(mix)))
      assert out[i, step] == seq[-1], (i, step)


class _Loader:
  """Loads experts from a stack, recording calls; ids in `broken` fail like a corrupt file."""

  def __init__(self, experts, broken=()):
    self.experts, self.broken, self.calls = experts, set(broken), []

  def __call__(self, e):
    self.calls.append(e)
    if e in self.broken:
      raise MixieError(f"expert {e}: corrupt")
    return jax.tree.map(lambda x: np.asarray(x[e]), self.experts)


def test_cache_evicts_least_recently_used_and_reloads(model):
  _, experts = model
  loader = _Loader(experts)
  cache = ExpertCache(CFG, LORA, loader, slots=3)
  for batch in ([0, 1], [2, 0], [3, 3, -1], [1], [0, 2]):
    slot_n, errors = cache.slots_for(batch)
    assert not errors
    for e, s in zip(batch, slot_n):  # each row's slot holds exactly its expert
      if e < 0:
        assert s == -1
      else:
        np.testing.assert_array_equal(cache.slots_c["v"]["b"][s], experts["v"]["b"][e])
  # [0,1] load 0,1; [2,0] load 2 (0 hit); [3] evicts 1 (LRU); [1] evicts 2; [0,2]: 0 hit, 2 evicts 3
  assert cache.loaded == [0, 1, 2, 3, 1, 2]
  assert loader.calls == cache.loaded
  assert (cache.hits, cache.misses, cache.evictions) == (2, 6, 3)
  assert cache.resident == [1, 0, 2]
  with pytest.raises(MixieError, match="3 slots"):
    cache.slots_for([0, 1, 2, 3])


def test_cache_load_failure_is_per_expert(model):
  _, experts = model
  cache = ExpertCache(CFG, LORA, _Loader(experts, broken={4}), slots=2)
  slot_n, errors = cache.slots_for([4, 1, 4])
  assert set(errors) == {4} and "corrupt" in errors[4]
  assert slot_n[0] == -1 and slot_n[2] == -1 and slot_n[1] >= 0
  assert cache.loaded == [1]
  bad = jax.tree.map(lambda x: np.asarray(x[0]), experts)
  bad["q"]["a"] = bad["q"]["a"][:, :, :2]
  cache2 = ExpertCache(CFG, LORA, lambda e: bad, slots=2)
  _, errors = cache2.slots_for([0])
  assert "q.a has shape" in errors[0]


# --- the Server end to end, with a real expert store -------------------------------------------------


class _Embedder:
  """Embeds a text by its first number: topic = first token % n_topics (deterministic routing)."""

  def __init__(self, k):
    self.k = k

  def embed(self, texts):
    return np.eye(self.k, dtype=np.float32)[[int(t.split()[0]) % self.k for t in texts]]


@pytest.fixture()
def served(model, tmp_path):
  params, experts = model
  store = ExpertStore(tmp_path / "experts")
  fp = fingerprint(CFG, params)
  for t in range(N_EXPERTS):
    store.write(t, jax.tree.map(lambda x: x[t], experts), ExpertMeta.new(LORA, fp))
  router = Router(np.eye(N_EXPERTS), RouterConfig(route_tokens=2, search=SearchConfig(backend="brute")))
  server = Server(CFG, params, NumberTokenizer(), store, router, _Embedder(N_EXPERTS), cache_slots=2,
                  length_bucket=T)
  return server, store


def _reference(params, experts, prompt, e, n):
  """The server's answer for one prompt: greedy with its expert, cut at the stop token 0."""
  toks = _ref_generate(params, _one(experts, e), prompt, MAX_NEW)[:n]
  return toks[:toks.index(0)] if 0 in toks else toks


def test_server_routes_and_serves_more_experts_than_slots(model, served):
  params, experts = model
  server, _ = served
  assert server.lora == LORA
  prompts = _prompts([5, 3, 8, 2, 6, 4, 7], seed=7)
  firsts = [3, 1, 4, 1, 5, 0, 2]  # first token decides the topic: 5 distinct experts, 2 slots
  for p, f in zip(prompts, firsts):
    p[0] = f
  texts = [" ".join(map(str, p)) for p in prompts]
  res = server.generate(texts, max_new_tokens=MAX_NEW)
  assert [r.expert for r in res] == firsts
  for r, p, f in zip(res, prompts, firsts):
    assert r.error is None
    assert r.tokens == _reference(params, experts, p, f, MAX_NEW)
    assert r.text == " ".join(map(str, r.tokens))
  assert sorted(set(server.cache.loaded)) == sorted(set(firsts))
  assert len(server.cache.loaded) >= 5 and server.cache.evictions >= 3
  # the route depends on the prefix only: a new tail does not move a prompt to another expert
  again = server.generate([t + " 9 9 9" for t in texts], max_new_tokens=MAX_NEW)
  assert [r.expert for r in again] == firsts


def test_missing_or_corrupt_expert_fails_only_its_row(model, served):
  params, experts = model
  server, store = served
  store.weights_file(4).write_bytes(b"garbage")
  store.commit("expert 2 removed", remove=[2])  # the server switches to this generation before its batch
  prompts = _prompts([4, 4, 4, 4], seed=8)
  for p, f in zip(prompts, [4, 1, 2, 3]):
    p[0] = f
  res = server.generate([" ".join(map(str, p)) for p in prompts], max_new_tokens=MAX_NEW)
  assert "corrupt" in res[0].error and ".safetensors" in res[0].error
  assert "no expert for topic 2" in res[2].error
  for i in (1, 3):
    assert res[i].error is None
    assert res[i].tokens == _reference(params, experts, prompts[i], [4, 1, 2, 3][i], MAX_NEW)
  assert res[0].tokens == [] and res[2].tokens == []


def test_expert_of_another_lora_shape_fails_only_its_row(model, served):
  params, experts = model
  server, store = served
  one = jax.tree.map(lambda x: x[3], experts)
  qv = LoraConfig(rank=LORA.rank, alpha=LORA.alpha, targets=("q", "v"))
  store.write(3, {k: one[k] for k in ("q", "v")}, ExpertMeta.new(qv, fingerprint(CFG, params)))
  prompts = _prompts([4, 4], seed=9)
  prompts[0][0], prompts[1][0] = 3, 1
  res = server.generate([" ".join(map(str, p)) for p in prompts], max_new_tokens=MAX_NEW)
  assert "expert of topic 3" in res[0].error and "targets ['q', 'v']" in res[0].error
  assert res[1].error is None and res[1].tokens == _reference(params, experts, prompts[1], 1, MAX_NEW)


def test_server_input_errors(model, served):
  server, _ = served
  res = server.generate_tokens([[], [1, 2]], [1, -1], max_new_tokens=200)
  assert "empty prompt" in res[0].error and "max_seq_len" in res[1].error
  with pytest.raises(ConfigError, match="top_p"):
    server.generate(["1 2"], top_p=0.0)
  with pytest.raises(ConfigError, match="oracle"):
    Server(CFG, model[0], NumberTokenizer(), served[1], server.router.with_config(mode="oracle"), None,
           lora=LORA)
  with pytest.raises(ConfigError, match="cache_experts=2"):
    Server(CFG, model[0], NumberTokenizer(), served[1], server.router.with_config(mode="topk", topk=3), None,
           cache_slots=2, lora=LORA)


def test_server_topk_mode_mixes_the_routed_experts(model, served):
  params, experts = model
  server, _ = served
  server.router = server.router.with_config(mode="topk", topk=2, temperature=1.0)
  prompts = _prompts([6, 3], seed=9)
  prompts[0][0], prompts[1][0] = 2, 5
  res = server.generate([" ".join(map(str, p)) for p in prompts], max_new_tokens=MAX_NEW, stop=[])
  for r, p in zip(res, prompts):
    ids = [e for e, _ in r.experts]
    w = np.array([x for _, x in r.experts], np.float32)
    assert len(ids) == 2 and ids[0] == p[0] and r.expert == p[0] and w[0] > w[1] > 0
    ref, _ = generate_rows(params, gather_experts(experts, jnp.asarray(ids)), jnp.asarray(w[None]),
                           jnp.repeat(_padded([p])[0], 2, 0), jnp.repeat(_padded([p])[1], 2), NO_STOP,
                           jax.random.key(0), cfg=CFG, lora_scale=LORA.scale, max_new_tokens=MAX_NEW)
    assert r.tokens == np.asarray(ref[0]).tolist()

"""The stacked train step: B = 0 equals the base, introversion, sharding, masked slots, per-expert
optimizer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mixie.model.llama import FROZEN, TRAINABLE, bind, forward, param_at, vmap_adapters
from mixie.model.lora import expert_of, init_experts
from mixie.train import optim
from mixie.train.step import compile_fns, create_state
from train_utils import RULES, TINY, batch_for, mesh, tiny_base, tiny_spec

B, T = 2, 16


_COMPILED = {}


def _compiled(spec, m, base):
  key = (spec, m.devices.shape, tuple(d.id for d in m.devices.flat))
  if key not in _COMPILED:
    _COMPILED[key] = compile_fns(spec, m, RULES, jax.eval_shape(lambda: base))
  return _COMPILED[key]


def _run(spec, m, base, topics, steps, empty_at=None, state=None):
  """Trains slots holding `topics` for `steps` steps; returns (state, metrics per step)."""
  comp = _compiled(spec, m, base)
  if state is None:
    state = create_state(spec, m, RULES, base, topics, [steps] * len(topics), comp)
  out = []
  for s in range(steps):
    empty = (empty_at or {}).get(s, ())
    state, met = comp.step(state, base, batch_for(topics, [s] * len(topics), B, T, TINY.vocab_size, empty))
    out.append(jax.device_get(met))
  return state, out


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_zero_b_experts_equal_base_exactly():
  """Fresh experts (B = 0) through the module and `nnx.vmap` over the expert axis give the base's
  logits bit for bit; the filter picks exactly the experts' arrays out of the bound model."""
  base = tiny_base()
  spec = tiny_spec(4)
  experts = init_experts(TINY, spec.lora, jax.random.PRNGKey(3), 4)
  assert float(jnp.abs(experts["q"]["a"]).sum()) > 0  # A is random, only B is zero
  tok = jax.random.randint(jax.random.PRNGKey(1), (4, B, T), 0, TINY.vocab_size)
  logits = lambda model, t: model.logits(model(t)[0])  # noqa: E731

  @jax.jit
  def stacked(e, t):
    model = bind(TINY, base, e, lora_scale=spec.lora.scale)
    _, trainable, frozen = nnx.split(model, TRAINABLE, FROZEN)
    assert jax.tree.structure(expert_of(trainable)) == jax.tree.structure(e)  # nothing else trains
    assert not any("lora" in jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(frozen))
    return vmap_adapters(logits, axis=0, in_axes=(0,))(model, t)

  g = jax.jit(lambda t: jax.vmap(lambda tt: forward(base, None, tt, TINY)[0])(t))
  got, want = np.asarray(stacked(experts, tok)), np.asarray(g(tok))
  assert np.array_equal(got, want)


# one spec for the E=4 tests (shared compiles): dropout exercises the per-slot keys, decay the masking,
# a small clip makes clipping active
SPEC4 = tiny_spec(4, dropout=0.1, wd=0.05, clip=0.05)
# the experts trained alone also rematerialise their layers: equal results show remat changes nothing
SPEC1 = dataclasses.replace(tiny_spec(1, dropout=0.1, wd=0.05, clip=0.05), remat="full")
TOPICS4 = [3, 7, 11, 5]


def _close(got, want, msg=""):
  # f32 rounding differs between one matmul over E*b rows and over b rows (or across shards); Adam's
  # m / sqrt(v) amplifies it where a coordinate's gradient is ~0 (its step is ~lr whatever the
  # gradient's size), so the bound is absolute, far below the parameters' movement (~lr = 1e-2 per
  # step): every element within lr / 20, and all but one in a thousand within 5e-5 (seen: 1 of 4096 at
  # 1.1e-4, on jax 0.10.2)
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-4, err_msg=msg)
  off = np.abs(got - want) > 5e-5 + 1e-4 * np.abs(want)
  assert off.mean() <= 1e-3, f"{msg}: {int(off.sum())} of {off.size} elements differ by more than 5e-5"


def test_introversion_together_equals_alone():
  base = tiny_base()
  state, _ = _run(SPEC4, mesh(), base, TOPICS4, 5)
  together = _host(state["params"])
  for e, t in enumerate(TOPICS4):
    alone, _ = _run(SPEC1, mesh(), base, [t], 5)
    alone = _host(alone["params"])
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(alone)[0], jax.tree.leaves(together)):
      _close(b[e], a[0], f"slot {e} {jax.tree_util.keystr(path)}")
  b0 = together["q"]["b"]  # the experts really moved, and differently
  assert np.abs(b0).max() > 1e-3 and not np.allclose(b0[0], b0[1])


def test_per_expert_optimizer_matches_optax_adamw_alone():
  """A slot follows optax's own clip_by_global_norm + adamw fed the same per-step learning rates."""
  from mixie.train.step import dropout_key, init_state, slot_loss
  base = tiny_base()
  state, mets = _run(SPEC4, mesh(), base, TOPICS4, 4)
  e, topic = 1, TOPICS4[1]
  fresh = init_state(SPEC1, base, jnp.asarray([topic]), jnp.asarray([4]))["params"]
  params = jax.tree.map(lambda x: x[0], fresh)
  lrs = jnp.asarray([float(m["lr"][e]) for m in mets])
  tx = optax.chain(optax.clip_by_global_norm(0.05),
                   optax.adamw(lambda c: lrs[c], b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05))
  ost = tx.init(params)
  grad = jax.jit(jax.grad(lambda p, bt, k: slot_loss(SPEC1, p, base, bt["tokens"][0], bt["targets"][0],
                                                     bt["loss_mask"][0], k)[0]))
  for s in range(4):
    g = grad(params, batch_for([topic], [s], B, T, TINY.vocab_size), dropout_key(SPEC1, topic, s))
    upd, ost = tx.update(g, ost, params)
    params = optax.apply_updates(params, upd)
  got = jax.tree.map(lambda x: np.asarray(x)[e], jax.device_get(state["params"]))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    _close(b, np.asarray(a))
  assert max(float(m["grad_norm"][e]) for m in mets) > 0.05  # clipping was active


@pytest.mark.parametrize("shape", [(4, 2, 1), (8, 1, 1)])
def test_sharded_equals_single_device(shape):
  base = tiny_base()
  topics = list(range(8))
  spec = tiny_spec(8)
  ref, ref_m = _run(spec, mesh(), base, topics, 3, empty_at={1: (2,)})
  got, got_m = _run(spec, mesh(shape), base, topics, 3, empty_at={1: (2,)})
  leaf = jax.tree.leaves(got["params"])[0]
  assert leaf.sharding.spec[0] == "expert" and len(leaf.sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(_host(ref)), jax.tree.leaves(_host(got))):
    _close(b, a)
  np.testing.assert_allclose(got_m[-1]["loss"], ref_m[-1]["loss"], rtol=1e-5)


def test_slot_without_data_is_bit_identical():
  base = tiny_base()
  m = mesh()
  comp = _compiled(SPEC4, m, base)
  state = create_state(SPEC4, m, RULES, base, TOPICS4, [10] * 4, comp)
  state, _ = comp.step(state, base, batch_for(TOPICS4, [0] * 4, B, T, TINY.vocab_size))  # non-zero moments
  before = _host(state)
  state, met = comp.step(state, base, batch_for(TOPICS4, [1] * 4, B, T, TINY.vocab_size, empty=(2,)))
  after = _host(state)
  met = jax.device_get(met)
  assert met["tokens"][2] == 0 and met["loss"][2] == 0 and all(met["tokens"][[0, 1, 3]] == B * T)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert a.shape[0] == 4
    assert np.array_equal(a[2], b[2])  # params, moments, counts, step: bit for bit (decay is on)
  changed = [not np.array_equal(a[0], b[0]) for a, b in zip(jax.tree.leaves(before["params"]),
                                                          jax.tree.leaves(after["params"]))]
  assert all(changed)
  assert after["opt"]["step"].tolist() == [2, 2, 1, 2]


def test_learning_rate_schedule():
  opt = optim.OptConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
  lrs = np.asarray(optim.learning_rate(opt, jnp.arange(20), 20))
  np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
  assert np.all(np.diff(lrs[4:]) <= 1e-7) and abs(lrs[-1] - 0.1) < 0.01
  # per-expert horizons: each slot's own schedule
  two = np.asarray(optim.learning_rate(opt, jnp.asarray([10, 10]), jnp.asarray([12, 100])))
  assert two[0] < two[1]


def test_reset_restarts_warmup_and_moments():
  base = tiny_base()
  m = mesh()
  comp = _compiled(SPEC4, m, base)
  state = create_state(SPEC4, m, RULES, base, TOPICS4, [10] * 4, comp)
  fresh = _host(state["params"])
  for s in range(3):
    state, met = comp.step(state, base, batch_for(TOPICS4, [s] * 4, B, T, TINY.vocab_size))
  before = _host(state)
  mask = np.asarray([False, True, False, False])
  state = comp.reset(state, base, mask, np.asarray([0, 9, 0, 0], np.int32),
                     np.asarray([1, 10, 1, 1], np.int32))
  h = _host(state)
  assert h["topic"].tolist() == [3, 9, 11, 5] and h["opt"]["step"].tolist() == [3, 0, 3, 3]
  for leaf in jax.tree.leaves(h["opt"]["tx"]):
    assert np.all(leaf[1] == 0)  # zero moments and count for the new expert
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(h)):
    assert np.array_equal(a[~mask], b[~mask])  # the other slots are untouched
  assert np.array_equal(h["params"]["q"]["b"][1], np.zeros_like(h["params"]["q"]["b"][1]))
  assert not np.array_equal(h["params"]["q"]["a"][1], fresh["q"]["a"][1])  # topic 9's own init
  state, met = comp.step(state, base, batch_for([3, 9, 11, 5], [3, 0, 3, 3], B, T, TINY.vocab_size))
  assert float(met["lr"][1]) == pytest.approx(SPEC4.opt.lr / SPEC4.opt.warmup_steps)


def test_full_mode_trains_every_base_parameter():
  base = tiny_base()
  spec = tiny_spec(1, mode="full", lr=1e-3)
  state, mets = _run(spec, mesh((1, 2, 1)), base, [0], 4)
  assert mets[-1]["loss"][0] < mets[0]["loss"][0]
  p = _host(state["params"])
  assert jax.tree.structure(jax.tree.map(lambda x: x[0], p)) == jax.tree.structure(base)
  assert not np.array_equal(param_at(p, "q")[0], np.asarray(param_at(base, "q")))
  assert not np.array_equal(param_at(p, "final_norm")[0], np.asarray(param_at(base, "final_norm")))


def test_bfloat16_compute_keeps_f32_experts_and_tracks_f32_losses():
  base = tiny_base()
  topics = [0, 1]
  spec32 = tiny_spec(2)
  spec16 = tiny_spec(2, cfg=TINY.replace(dtype="bfloat16", param_dtype="bfloat16"))
  base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
  s32, m32 = _run(spec32, mesh(), base, topics, 3)
  s16, m16 = _run(spec16, mesh(), base16, topics, 3)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16["params"]))  # f32 experts and moments
  assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(s16["opt"]))
  for a, b in zip(m32, m16):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-2)

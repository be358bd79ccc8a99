"""Branched experts (train.init = "seed"): every expert starts from the seed bit for bit, a branch moves
only on its own topic's data, a slot without data stays bit-identical; the budget split; seed reuse."""

import jax
import numpy as np
import pytest

from configs.common import base_config
from mixie.errors import ConfigError
from mixie.model.lora import expert_shapes
from mixie.store import ExpertStore
from mixie.train import branch
from mixie.train.loop import train_loop
from mixie.train.scheduler import ExpertScheduler
from mixie.train.step import base_shardings, compile_fns, create_state
from train_utils import RULES, TINY, SyntheticLoader, batch_for, mesh, tiny_base, tiny_spec

B, T = 2, 8
SPEC = tiny_spec(4, wd=0.05)


def _seed(spec, scale=0.05):
  """A seed adapter with A and B both non-zero (unlike a fresh expert, whose B is 0)."""
  rng = np.random.default_rng(7)
  return {p: {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in ab.items()}
          for p, ab in expert_shapes(TINY, spec.lora).items()}


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_slots_equal(params_e, expert, slots):
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params_e)[0], jax.tree.leaves(expert)):
    for e in slots:
      assert np.array_equal(a[e], b), f"slot {e} {jax.tree_util.keystr(path)}"


def test_branched_experts_equal_the_seed_bit_for_bit_at_step_0(tmp_path):
  base = tiny_base()
  m = mesh()
  seed = _seed(SPEC)
  budgets = {t: 4 * B * T for t in range(6)}  # 6 topics on 4 slots: a second wave refills slots
  res = train_loop(SPEC, m, RULES, jax.device_put(base, base_shardings(SPEC, m, RULES)),
                   SyntheticLoader(4, B, T, TINY.vocab_size), ExpertScheduler(budgets, 4),
                   ckpt_dir=tmp_path / "ckpt", store=None, fingerprint="fp", tokens_per_step=B * T,
                   stop=lambda: True, progress=False, init_params=seed)
  assert res.status == "preempted" and res.step == 0
  state = _host(res.state)
  _assert_slots_equal(state["params"], seed, range(4))
  # fresh optimizer state: zero moments, step 0
  assert all(not np.any(x) for x in jax.tree.leaves(state["opt"]["tx"]) if x.dtype.kind == "f")
  assert state["opt"]["step"].tolist() == [0, 0, 0, 0]


def test_refilled_slots_start_from_the_seed_with_fresh_optimizer_state():
  base = tiny_base()
  m = mesh()
  comp = compile_fns(SPEC, m, RULES, jax.eval_shape(lambda: base))
  seed = _seed(SPEC)
  topics = [0, 1, 2, 3]
  state = branch.start_from(create_state(SPEC, m, RULES, base, topics, [5] * 4, comp), seed, np.ones(4, bool))
  for s in range(2):
    state, _ = comp.step(state, base, batch_for(topics, [s] * 4, B, T, TINY.vocab_size))
  before = _host(state)
  mask = np.asarray([False, True, False, True])
  state = comp.reset(state, base, mask, np.asarray([0, 7, 2, 9], np.int32), np.full(4, 5, np.int32))
  state = _host(branch.start_from(state, seed, mask))
  _assert_slots_equal(state["params"], seed, [1, 3])
  for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"])):
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2])  # the others keep training
  assert state["opt"]["step"].tolist() == [2, 0, 2, 0] and state["topic"].tolist() == [0, 7, 2, 9]


def _branch_steps(topics, steps, empty_at=None):
  base = tiny_base()
  m = mesh()
  comp = compile_fns(SPEC, m, RULES, jax.eval_shape(lambda: base))
  state = create_state(SPEC, m, RULES, base, topics, [steps] * len(topics), comp)
  state = branch.start_from(state, _seed(SPEC), np.ones(len(topics), bool))
  for s in range(steps):
    empty = (empty_at or {}).get(s, ())
    state, _ = comp.step(state, base, batch_for(topics, [s] * len(topics), B, T, TINY.vocab_size, empty))
  return _host(state)


def test_a_branch_moves_only_on_its_own_topics_data():
  a = _branch_steps([3, 1, 2, 5], 3)
  b = _branch_steps([3, 8, 9, 10], 3)  # the same topic in slot 0, other data in every other slot
  seed = _seed(SPEC)
  for x, y, s in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), jax.tree.leaves(seed)):
    assert np.array_equal(x[0], y[0])  # slot 0 saw the same data: bit for bit the same branch
    assert not np.array_equal(x[0], s)  # and it moved away from the seed
    assert not np.array_equal(x[1], y[1])  # slot 1 saw other data


def test_a_branch_without_data_stays_bit_identical():
  state = _branch_steps([3, 1, 2, 5], 2, empty_at={0: (2,), 1: (2,)})
  _assert_slots_equal(state["params"], _seed(SPEC), [2])
  assert state["opt"]["step"].tolist() == [2, 2, 0, 2]


def test_budget_split_keeps_the_total():
  c = base_config()
  c.train.init, c.train.seed_fraction = "seed", 0.25
  budgets = {0: 4096, 1: 4096, 3: 8192}
  plan = branch.plan(c, budgets, min_tokens=256)
  assert plan.tokens == 4096 and plan.branch_budgets == {0: 3072, 1: 3072, 3: 6144}
  assert plan.tokens + sum(plan.branch_budgets.values()) == sum(budgets.values())
  assert str(plan.dir) == f"{c.workdir}/seed"
  assert branch.plan(c, {0: 300}, min_tokens=256).branch_budgets == {0: 256}  # at least one batch


@pytest.mark.parametrize("field,value,match", [("init", "warm", "train.init"), ("seed_fraction", 1.0, "seed_fraction"),
                                               ("seed_fraction", 0, "seed_fraction")])
def test_bad_branch_settings_name_the_field(field, value, match):
  c = base_config()
  c.train[field] = value
  with pytest.raises(ConfigError, match=match):
    branch.validate(c)


def test_a_seed_dir_of_other_settings_is_refused(tmp_path):
  c = base_config()
  c.workdir = str(tmp_path)
  branch.claim(c, tmp_path / "seed")
  branch.claim(c, tmp_path / "seed")  # the same settings: fine
  c.train.tokens_per_expert = 4096
  with pytest.raises(ConfigError, match="train.tokens_per_expert=16384 there, 4096 here"):
    branch.claim(c, tmp_path / "seed")
  assert ExpertStore(tmp_path / "seed").topics() == []

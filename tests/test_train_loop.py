"""The training loop: scheduler refills, expert store, checkpoint/resume, non-finite loss, stop request."""

import jax
import numpy as np
import pytest

from mixie.errors import MixieError
from mixie.store import ExpertStore
from mixie.train.loop import NonFiniteLoss, train_loop
from mixie.train.scheduler import ExpertScheduler, token_budgets
from mixie.train.step import base_shardings, compile_fns, create_state
from train_utils import RULES, TINY, SyntheticLoader, batch_for, mesh, tiny_base, tiny_spec

B, T = 2, 8
TOPICS = [0, 1, 2, 3, 4]
# topic -> tokens in its "dataset": budgets proportional to these
SIZES = {0: 100, 1: 300, 2: 200, 3: 100, 4: 150}
SPEC = tiny_spec(2, lr=5e-3)


def _budgets():
  return token_budgets(SIZES, "proportional", 3 * B * T, min_tokens=B * T)


def _loop(tmp, name, base, *, spec=SPEC, max_steps=0, stop=None, checkpoint_every=2, on_saved=None,
          mesh_shape=(1, 1, 1)):
  loader = SyntheticLoader(spec.slots, B, T, TINY.vocab_size)
  sched = ExpertScheduler(_budgets(), spec.slots)
  store = ExpertStore(tmp / name / "experts")
  m = mesh(mesh_shape)
  base = jax.device_put(base, base_shardings(spec, m, RULES))
  res = train_loop(spec, m, RULES, base, loader, sched, ckpt_dir=tmp / name / "ckpt", store=store,
                   fingerprint="fp-test", tokens_per_step=B * T, checkpoint_every=checkpoint_every,
                   max_steps=max_steps, stop=stop, progress=False, on_saved=on_saved,
                   expert_meta=lambda t: {"centroid": [float(t), 0.5]})
  return res, store


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
  """One uninterrupted run on one device: `(LoopResult, ExpertStore)`, the reference of every test here
  (they trained the same run each: same spec, base, budgets and stream)."""
  return _loop(tmp_path_factory.mktemp("ref"), "ref", tiny_base())


def _store_bytes(store):
  return {t: ((store.entry_dir(t) / "weights.safetensors").read_bytes(),
              (store.entry_dir(t) / "meta.json").read_bytes()) for t in store.topics()}


def test_budgets_and_schedule_order():
  b = _budgets()
  assert b[1] == max(b.values()) and b[0] == b[3]
  assert sum(b.values()) == pytest.approx(5 * 3 * B * T, rel=0.05)
  s = ExpertScheduler(b, 2)
  assert s.order[:2] == [1, 2]  # largest budgets first
  assert token_budgets(SIZES, "fixed", 64) == {t: 64 for t in SIZES}


def test_scheduler_refills_slots_and_each_stored_expert_equals_training_it_alone(ref_run):
  base = tiny_base()
  res, store = ref_run
  assert res.status == "finished" and store.topics() == TOPICS
  assert res.diverged == {}  # a normal run: no expert flagged as diverged
  budgets = _budgets()
  spec1 = tiny_spec(1, lr=5e-3)  # one slot: the step is compiled once for every topic
  comp = compile_fns(spec1, mesh(), RULES, jax.eval_shape(lambda: base))
  for t in TOPICS:
    params, meta = store.load(t, "fp-test")
    steps = -(-budgets[t] // (B * T))
    assert meta.tokens_seen == steps * B * T and meta.centroid == (float(t), 0.5)
    assert meta.has_shape(SPEC.lora) and meta.mode == "experts" and meta.kind == "expert"
    assert np.isfinite(meta.final_loss)
    # the same expert trained alone in one slot for the same number of steps on the same stream
    st = create_state(spec1, mesh(), RULES, base, [t], [steps], comp)
    for s in range(steps):
      st, _ = comp.step(st, base, batch_for([t], [s], B, T, TINY.vocab_size))
    alone = jax.device_get(st["params"])
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(params)):
      np.testing.assert_allclose(b, a[0], rtol=1e-4, atol=5e-5)
  with pytest.raises(MixieError, match="trained on base fp-test"):
    store.load(0, "another-base")


def test_resume_from_checkpoint_gives_the_same_store_bit_for_bit(tmp_path, ref_run):
  base = tiny_base()
  ref = ref_run[1]
  first, _ = _loop(tmp_path, "cut", base, max_steps=5)
  assert first.status == "max_steps" and first.step == 5
  second, cut = _loop(tmp_path, "cut", base)  # new loader + scheduler objects: everything from the checkpoint
  assert second.status == "finished" and second.step > 5
  assert _store_bytes(cut) == _store_bytes(ref)


def test_resume_on_another_device_count(tmp_path, ref_run):
  """Saved on 1 device, continued on 4 (expert 2 x data 2): the abstract restore target carries the
  new shardings; the result equals the single-device run to f32 rounding."""
  base = tiny_base()
  ref = ref_run[1]
  first, _ = _loop(tmp_path, "moved", base, max_steps=5)
  second, moved = _loop(tmp_path, "moved", base, mesh_shape=(2, 2, 1))
  assert first.status == "max_steps" and second.status == "finished"
  leaf = jax.tree.leaves(second.state["params"])[0]
  assert len(leaf.sharding.device_set) == 4
  assert moved.topics() == ref.topics() == TOPICS
  for t in TOPICS:
    a, _ = ref.load(t, "fp-test")
    b, _ = moved.load(t, "fp-test")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(y, x, rtol=1e-4, atol=5e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  base = tiny_base()
  saved = []
  spec = tiny_spec(2, lr=1e30, clip=0.0)  # diverges: finite first step, then inf/nan
  with pytest.raises(NonFiniteLoss) as ei:
    _loop(tmp_path, "nan", base, spec=spec, checkpoint_every=1, on_saved=saved.append)
  msg = str(ei.value)
  assert "step 2" in msg and "topic(s) [1, 2]" in msg and "last good checkpoint is step 1" in msg
  assert saved == [1]
  from mixie.train.ckpt import TrainCheckpointer
  assert TrainCheckpointer(tmp_path / "nan" / "ckpt").latest_step() == 1


def test_stop_request_saves_and_returns(tmp_path):
  base = tiny_base()
  calls = {"n": 0}

  def stop():
    calls["n"] += 1
    return calls["n"] > 3

  res, _ = _loop(tmp_path, "term", base, stop=stop, checkpoint_every=100)
  assert res.status == "preempted" and res.step == 3
  from mixie.train.ckpt import TrainCheckpointer
  assert TrainCheckpointer(tmp_path / "term" / "ckpt").latest_step() == 3

"""The training loop: E slots on a frozen base, refilled by the expert scheduler, checkpointed, resumable.

`train_loop` is independent of where batches come from (anything with `next_batch()`, `state()`,
`restore()` and `set_slot(e, topic)`, e.g. `mixie.data.loader.PackedLoader`) and of the config system,
so tests and benchmarks drive it directly; `mixie.train.main` wires it to a config and a work directory.

Per step: the host takes the next `[E, b, T]` batch, counts each slot's tokens (no device round trip),
dispatches the jitted step, and only then looks at the previous step's metrics (one step of lag keeps
the device busy). When experts reach their budgets, all pending metrics are checked, the finished
experts are fetched (just those slots), written to the expert store, and their slots restart on the
next topics. A checkpoint is saved every `checkpoint_every` steps, after every metric so far was
checked finite: a non-finite loss stops the run with a message naming the step and the experts, and the
last good checkpoint stays the newest one. `stop()` returning True (SIGTERM) saves and returns.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from mixie.distributed import is_main_process
from mixie.errors import MixieError
from mixie.store import ExpertMeta, ExpertStore
from mixie.train import branch
from mixie.train import ckpt as ckpt_lib
from mixie.train.divergence import DivergenceMonitor, DivergenceRule
from mixie.train.metrics import MetricsWriter
from mixie.train.scheduler import ExpertScheduler
from mixie.train.step import TrainSpec, abstract_state, compile_fns, create_state


class NonFiniteLoss(MixieError):
  """A step produced a NaN or infinite loss."""


@dataclasses.dataclass
class LoopResult:
  """How a training loop ended, and what it did."""
  status: str  # "finished", "preempted" (stop requested; checkpoint saved) or "max_steps"
  step: int
  tokens: int
  seconds: float
  state: Any = None  # the final train state (on device)
  written: list = dataclasses.field(default_factory=list)  # topics written to the store by this call
  diverged: dict = dataclasses.field(default_factory=dict)  # topic -> why, of every finished expert
  tokens_total: int = 0  # tokens of the whole run, earlier calls (before a resume) included


def _gather_slots(tree, slots: list[int]):
  """Host copies of the given slots of a stacked tree (only those slots leave the devices)."""
  idx = jnp.asarray(slots, jnp.int32)
  if jax.process_count() > 1:  # pragma: no cover - multi-host TPU
    from jax.experimental import multihost_utils
    sub = jax.jit(lambda t: jax.tree.map(lambda x: x[idx], t))(tree)
    return multihost_utils.process_allgather(sub, tiled=True)
  return jax.device_get(jax.jit(lambda t: jax.tree.map(lambda x: x[idx], t))(tree))


def _put_batch(batch: dict, shardings: dict) -> dict:
  """Host batch -> global arrays; each process places only its addressable shards (multi-host safe:
  every process computes the same deterministic global batch)."""
  return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
          for k, v in batch.items()}


def train_loop(spec: TrainSpec, mesh: Mesh, rules, base, loader, scheduler: ExpertScheduler, *,
               ckpt_dir, store: ExpertStore | None, fingerprint: str, tokens_per_step: int,
               checkpoint_every: int = 50, log_every: int = 1, max_steps: int = 0,
               metrics: MetricsWriter | None = None, expert_meta: Callable[[int], Mapping] | None = None,
               stop: Callable[[], bool] | None = None, progress: bool = True,
               on_saved: Callable[[int], None] | None = None, keep_checkpoints: int = 2,
               divergence: DivergenceRule | None = None, init_params=None) -> LoopResult:
  """Trains until every scheduled expert reached its budget (or `max_steps`, or `stop()`).

  Args:
    spec, mesh, rules: what is trained and how it is sharded.
    base: the frozen base parameters (already on devices in `base_shardings`).
    loader: batch source with `next_batch()`, `state()`, `restore(s)`, `set_slot(e, topic)`; its batches
      hold `inputs`, `targets`, `loss_mask` `[E, b, T]` and `slot_tokens` `[E]`.
    scheduler: topics, budgets and slot assignment (restored from the checkpoint when one exists).
    ckpt_dir: orbax checkpoint directory of this run (resumed from when it holds a checkpoint).
    store: where finished experts go (None: nothing written, e.g. tests of the step).
    fingerprint: the base's fingerprint, recorded with every expert.
    tokens_per_step: tokens a slot gets per step (b * T), for the per-expert LR horizon.
    checkpoint_every, log_every, max_steps: cadences; max_steps 0 = no limit.
    metrics: JSONL writer (process 0).
    expert_meta: more `ExpertMeta` fields of a topic's expert (e.g. its centroid), by name.
    stop: polled every step; True saves a checkpoint and returns status "preempted".
    progress: show a tqdm bar with tokens/s.
    on_saved: called with the step after each checkpoint is saved (tests use it).
    keep_checkpoints: newest checkpoints kept.
    divergence: when a finished expert counts as diverged (`LoopResult.diverged`); None: the defaults.
    init_params: one expert every slot starts from (a seed adapter: `mixie.train.branch`), with fresh
      optimizer state; None: fresh experts.
  """
  comp = compile_fns(spec, mesh, rules, jax.eval_shape(lambda: base))
  frozen = base if spec.lora_mode else None  # "full" trains the base itself
  ckpt = ckpt_lib.TrainCheckpointer(ckpt_dir, max_to_keep=keep_checkpoints)
  mode = spec.mode
  E = spec.slots
  monitor = DivergenceMonitor(divergence or DivergenceRule())  # host floats of the metrics fetched anyway
  try:
    latest = ckpt.latest_step()
    if latest is not None:
      target = ckpt_lib.abstract_with_shardings(abstract_state(spec, jax.eval_shape(lambda: base)),
                                                comp.state_shardings)
      state, host = ckpt.restore(latest, target)
      if host.get("mode") != mode:
        raise MixieError(f"{ckpt.dir}: checkpoint of mode {host.get('mode')!r}, this run trains {mode!r}")
      scheduler.restore(host["scheduler"])
      monitor.restore(host.get("divergence"))
      loader.restore(host["loader"])
      step, tokens_total = int(host["step"]), int(host["tokens"])
      if metrics is not None:
        metrics.truncate_after(mode, step)
      print(f"mixie.train[{mode}]: resumed from {ckpt.dir} at step {step}", flush=True)
    else:
      scheduler.fill()
      topics_e = np.asarray(scheduler.slot_topic, np.int32)
      horizon_e = np.asarray([scheduler.horizon_steps(t, tokens_per_step) if t >= 0 else 1
                              for t in topics_e], np.int32)
      for e, t in enumerate(topics_e):
        loader.set_slot(e, int(t))
      state = create_state(spec, mesh, rules, base, np.maximum(topics_e, 0), horizon_e, comp)
      if init_params is not None:  # branched experts start from the seed adapter
        state = branch.start_from(state, init_params, topics_e >= 0)
      step, tokens_total = 0, 0

    total_steps = _estimate_steps(scheduler, tokens_per_step, E)
    bar = None
    if progress and is_main_process():
      bar = tqdm(total=total_steps, initial=min(step, total_steps), desc=f"train[{mode}]", unit="step",
                 dynamic_ncols=True)

    pending: list[dict] = []  # dispatched steps whose metrics were not looked at yet
    last_loss = [float("nan")] * E
    written: list[int] = []
    t_start, tok_start = time.time(), tokens_total
    t_log, tok_log = t_start, tokens_total

    def check(upto_all: bool):
      """Looks at pending metrics (all, or all but the newest); raises on a non-finite loss."""
      nonlocal t_log, tok_log
      keep = 0 if upto_all else 1
      while len(pending) > keep:
        p = pending.pop(0)
        m = {k: np.asarray(v) for k, v in jax.device_get(p["metrics"]).items()}
        bad = [e for e in range(E) if m["tokens"][e] > 0 and not math.isfinite(float(m["loss"][e]))]
        if bad:
          topics = [p["topics"][e] for e in bad]
          where = f"; the last good checkpoint is step {ckpt.latest_step()} in {ckpt.dir}" \
              if ckpt.latest_step() is not None else "; no checkpoint was saved yet"
          raise NonFiniteLoss(
              f"train[{mode}] step {p['step']}: non-finite loss ({', '.join(str(m['loss'][e]) for e in bad)})"
              f" for expert(s) of topic(s) {topics} in slot(s) {bad}{where}; nothing after it was saved. "
              "Lower train.lr, enable train.grad_clip, or check the data of these topics")
        for e in range(E):
          if m["tokens"][e] > 0:
            last_loss[e] = float(m["loss"][e])
            monitor.observe(p["topics"][e], last_loss[e], float(m["grad_norm"][e]))
        if metrics is not None and (p["step"] % log_every == 0 or p["final"]):
          now = time.time()
          active = m["tokens"] > 0
          rec = {"mode": mode, "step": p["step"], "tokens": p["tokens_total"],
                 "tokens_per_s": (p["tokens_total"] - tok_log) / max(now - t_log, 1e-9),
                 "loss_mean": float(m["loss"][active].mean()) if active.any() else None,
                 "experts": [{"slot": e, "topic": int(p["topics"][e]), "loss": float(m["loss"][e]),
                              "tokens": int(m["tokens"][e]), "grad_norm": float(m["grad_norm"][e]),
                              "lr": float(m["lr"][e])} for e in range(E) if m["tokens"][e] > 0]}
          metrics.write(rec)
          t_log, tok_log = now, p["tokens_total"]

    def save(s: int):
      check(upto_all=True)
      if ckpt.latest_step() == s:
        return
      host = {"mode": mode, "step": s, "tokens": tokens_total, "loader": loader.state(),
              "scheduler": scheduler.state(), "divergence": monitor.state()}
      ckpt.save(s, state, host)
      if on_saved is not None:
        ckpt.wait()
        on_saved(s)

    status = "finished"
    while not scheduler.finished:
      if max_steps and step >= max_steps:
        status = "max_steps"
        break
      if stop is not None and stop():
        save(step)
        ckpt.wait()
        status = "preempted"
        break
      batch = loader.next_batch()
      tokens_e = np.asarray(batch["slot_tokens"], np.int64)
      dev = _put_batch({"tokens": batch["inputs"], "targets": batch["targets"],
                        "loss_mask": batch["loss_mask"]}, comp.batch_shardings)
      topics_now = list(scheduler.slot_topic)
      state, m = comp.step(state, frozen, dev)
      step += 1
      tokens_total += int(tokens_e.sum())
      done = scheduler.add_tokens(tokens_e)
      pending.append({"step": step, "metrics": m, "topics": topics_now, "tokens_total": tokens_total,
                      "final": bool(done)})
      check(upto_all=bool(done))
      if done:
        params = _gather_slots(state["params"], done)
        for i, e in enumerate(done):
          topic = scheduler.release(e)
          monitor.finish(topic)
          if store is not None and is_main_process():
            expert = jax.tree.map(lambda x: x[i], params)
            meta = ExpertMeta.new(spec.lora, fingerprint, tokens_seen=scheduler.slot_tokens[e],
                                  final_loss=last_loss[e], mode=mode, steps=step,
                                  **(expert_meta(topic) if expert_meta is not None else {}))
            store.write(topic, expert, meta)
          written.append(topic)
        new = scheduler.fill()
        for e in done:
          loader.set_slot(e, new.get(e, -1))
        if new:
          mask = np.zeros(E, bool)
          topics = np.zeros(E, np.int32)
          horizon = np.ones(E, np.int32)
          for e, t in new.items():
            mask[e], topics[e], horizon[e] = True, t, scheduler.horizon_steps(t, tokens_per_step)
          state = comp.reset(state, base, mask, topics, horizon)
          if init_params is not None:
            state = branch.start_from(state, init_params, mask)
      if bar is not None:
        bar.update(1)
        el = time.time() - t_start
        bar.set_postfix(tok_s=f"{(tokens_total - tok_start) / max(el, 1e-9):.0f}",
                        experts=f"{len(scheduler.done)}/{len(scheduler.order)}", refresh=False)
      if step % checkpoint_every == 0 or scheduler.finished:
        save(step)
    check(upto_all=True)
    if status == "max_steps":
      save(step)
    if bar is not None:
      bar.close()
    ckpt.wait()
    return LoopResult(status=status, step=step, tokens=tokens_total - tok_start,
                      seconds=time.time() - t_start, state=state, written=written,
                      diverged=dict(monitor.diverged), tokens_total=tokens_total)
  finally:
    ckpt.close()


def _estimate_steps(scheduler: ExpertScheduler, tokens_per_step: int, slots: int) -> int:
  """Steps of the whole schedule if every slot streams full batches (for the progress bar)."""
  per = sorted((scheduler.horizon_steps(t, tokens_per_step) for t in scheduler.order), reverse=True)
  load = [0] * slots
  for p in per:  # LPT onto the least loaded slot
    i = load.index(min(load))
    load[i] += p
  return max(load) if load else 0

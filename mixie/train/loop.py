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
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from mixie.distributed import fault_point, is_main_process, to_host
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


@jax.jit
def _take_slots(tree, idx):
  return jax.tree.map(lambda x: x[idx], tree)


def _gather_slots(tree, slots: list[int]):
  """Host copies of the given slots of a stacked tree (only those slots leave the devices; with several
  processes, every process calls this and gets them all). Compiled once per number of slots."""
  return to_host(_take_slots(tree, np.asarray(slots, np.int32)))


def _place(x: np.ndarray, sharding) -> jax.Array:
  """A host array as a global array in `sharding`; each process places only its addressable shards."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _put_batch(batch: dict, shardings: dict) -> dict:
  """Host batch -> global arrays; only the rows of this process's shards must be filled in (the loader
  reads only this process's slots: `local_slots`)."""
  return {k: _place(v, shardings[k]) for k, v in batch.items()}


def local_slots(sharding, shape) -> list[int]:
  """The slots (leading-axis indices) of a `shape` batch that this process's devices hold."""
  out = set()
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    out.update(range(shape[0])[index[0]])
  return sorted(out)


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
  if hasattr(loader, "set_local_slots"):  # read only the slots whose rows this process's devices hold
    loader.set_local_slots(local_slots(comp.batch_shardings["tokens"], (spec.slots, mesh.devices.size, 1)))
  ckpt = ckpt_lib.TrainCheckpointer(ckpt_dir, max_to_keep=keep_checkpoints)
  try:
    run = _Run(spec=spec, comp=comp, ckpt=ckpt, loader=loader, scheduler=scheduler, metrics=metrics,
               log_every=log_every, on_saved=on_saved, tokens_per_step=tokens_per_step,
               init_params=init_params,
               monitor=DivergenceMonitor(divergence or DivergenceRule()))  # host floats fetched anyway
    if not run.resume(jax.eval_shape(lambda: base)):
      run.start(mesh, rules, base)
    bar = _progress_bar(run) if progress and is_main_process() else None
    run.start_clock()
    frozen = base if spec.lora_mode else None  # "full" trains the base itself
    status = "finished"
    while not scheduler.finished:
      if max_steps and run.step >= max_steps:
        status = "max_steps"
        break
      if stop is not None and stop():
        run.save()
        ckpt.wait()
        status = "preempted"
        break
      done = run.train_step(frozen)
      if done:
        run.finish_experts(done, store, fingerprint, expert_meta)
        run.refill(done, base)
      if bar is not None:
        run.show(bar)
      if run.step % checkpoint_every == 0 or scheduler.finished:
        run.save()
      fault_point(run.step, ckpt.wait)
    run.check(upto_all=True)
    if status == "max_steps":
      run.save()
    if bar is not None:
      bar.close()
    ckpt.wait()
    return run.result(status)
  finally:
    ckpt.close()


@dataclasses.dataclass
class _Run:
  """One `train_loop` call: what it trains with, and the state it carries from step to step."""
  spec: TrainSpec
  comp: Any  # the compiled step, reset and shardings (`compile_fns`)
  ckpt: ckpt_lib.TrainCheckpointer
  loader: Any
  scheduler: ExpertScheduler
  monitor: DivergenceMonitor
  metrics: MetricsWriter | None
  log_every: int
  on_saved: Callable[[int], None] | None
  tokens_per_step: int
  init_params: Any
  state: Any = None  # the train state (on device)
  step: int = 0
  tokens_total: int = 0  # tokens of the whole run, earlier calls (before a resume) included
  pending: list = dataclasses.field(default_factory=list)  # dispatched steps whose metrics were not looked at
  last_loss: list = dataclasses.field(default_factory=list)  # [E] host loss of each slot's newest step
  written: list = dataclasses.field(default_factory=list)  # topics written to the store by this call
  t_start: float = 0.0  # wall clock and tokens_total when training started (tokens/s of the bar)
  tok_start: int = 0
  t_log: float = 0.0  # wall clock and tokens_total of the last metrics record (its tokens/s)
  tok_log: int = 0

  @property
  def mode(self) -> str:
    """The training mode (recorded in checkpoints, metrics and expert metadata)."""
    return self.spec.mode

  def resume(self, base_shapes) -> bool:
    """Restores state, scheduler, divergence monitor and loader from the newest checkpoint; False
    when there is none."""
    latest = self.ckpt.latest_step()
    if latest is None:
      return False
    target = ckpt_lib.abstract_with_shardings(abstract_state(self.spec, base_shapes),
                                              self.comp.state_shardings)
    self.state, host = self.ckpt.restore(latest, target)
    if host.get("mode") != self.mode:
      raise MixieError(f"{self.ckpt.dir}: checkpoint of mode {host.get('mode')!r}, "
                       f"this run trains {self.mode!r}")
    self.scheduler.restore(host["scheduler"])
    self.monitor.restore(host.get("divergence"))
    self.loader.restore(host["loader"])
    self._begin(int(host["step"]), int(host["tokens"]))
    if self.metrics is not None:
      self.metrics.truncate_after(self.mode, self.step)
    print(f"mixie.train[{self.mode}]: resumed from {self.ckpt.dir} at step {self.step}", flush=True)
    return True

  def start(self, mesh: Mesh, rules, base) -> None:
    """A fresh state, its slots filled with the first scheduled topics."""
    self.scheduler.fill()
    for e, t in enumerate(self.scheduler.slot_topic):
      self.loader.set_slot(e, int(t))
    mask, topics, horizon = self._slot_arrays({e: int(t) for e, t in enumerate(self.scheduler.slot_topic)
                                               if t >= 0})
    self.state = create_state(self.spec, mesh, rules, base, topics, horizon, self.comp)
    if self.init_params is not None:  # branched experts start from the seed adapter
      self.state = branch.start_from(self.state, self.init_params, mask)
    self._begin(0, 0)

  def _begin(self, step: int, tokens_total: int) -> None:
    self.step, self.tokens_total = step, tokens_total
    self.last_loss = [float("nan")] * self.spec.slots

  def start_clock(self) -> None:
    """Marks the start of training (tokens/s of the bar and of the first metrics record)."""
    self.t_start = self.t_log = time.time()
    self.tok_start = self.tok_log = self.tokens_total

  def _slot_arrays(self, new: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`[E]` (mask, topic, horizon steps) of the slots in `new` (slot -> topic); other slots hold
    (False, 0, 1)."""
    E = self.spec.slots
    mask, topics, horizon = np.zeros(E, bool), np.zeros(E, np.int32), np.ones(E, np.int32)
    for e, t in new.items():
      mask[e], topics[e], horizon[e] = True, t, self.scheduler.horizon_steps(t, self.tokens_per_step)
    return mask, topics, horizon

  def train_step(self, frozen) -> list[int]:
    """Dispatches one step on the next batch (no device round trip) and looks at the metrics of the
    step before it (or of all steps, when experts finish); returns the slots whose experts finished."""
    batch = self.loader.next_batch()
    tokens_e = np.asarray(batch["slot_tokens"], np.int64)
    dev = _put_batch({"tokens": batch["inputs"], "targets": batch["targets"],
                      "loss_mask": batch["loss_mask"]}, self.comp.batch_shardings)
    topics_now = list(self.scheduler.slot_topic)
    self.state, m = self.comp.step(self.state, frozen, dev)
    self.step += 1
    self.tokens_total += int(tokens_e.sum())
    done = self.scheduler.add_tokens(tokens_e)
    self.pending.append({"step": self.step, "metrics": m, "topics": topics_now,
                         "tokens_total": self.tokens_total, "final": bool(done)})
    self.check(upto_all=bool(done))
    return done

  def check(self, upto_all: bool) -> None:
    """Looks at pending metrics (all, or all but the newest); raises on a non-finite loss."""
    keep = 0 if upto_all else 1
    while len(self.pending) > keep:
      p = self.pending.pop(0)
      m = to_host(p["metrics"])
      self._check_finite(p, m)
      for e in range(self.spec.slots):
        if m["tokens"][e] > 0:
          self.last_loss[e] = float(m["loss"][e])
          self.monitor.observe(p["topics"][e], self.last_loss[e], float(m["grad_norm"][e]))
      if self.metrics is not None and (p["step"] % self.log_every == 0 or p["final"]):
        self._log(p, m)

  def _check_finite(self, p: dict, m: dict) -> None:
    """`NonFiniteLoss` naming the step, topics, slots and the last good checkpoint, if any slot with
    tokens has a NaN or infinite loss."""
    bad = [e for e in range(self.spec.slots) if m["tokens"][e] > 0 and not math.isfinite(float(m["loss"][e]))]
    if not bad:
      return
    topics = [p["topics"][e] for e in bad]
    ckpt = self.ckpt
    where = f"; the last good checkpoint is step {ckpt.latest_step()} in {ckpt.dir}" \
        if ckpt.latest_step() is not None else "; no checkpoint was saved yet"
    raise NonFiniteLoss(
        f"train[{self.mode}] step {p['step']}: non-finite loss ({', '.join(str(m['loss'][e]) for e in bad)})"
        f" for expert(s) of topic(s) {topics} in slot(s) {bad}{where}; nothing after it was saved. "
        "Lower train.lr, enable train.grad_clip, or check the data of these topics")

  def _log(self, p: dict, m: dict) -> None:
    """One metrics record of a looked-at step: tokens/s since the last record, per-expert figures."""
    now = time.time()
    active = m["tokens"] > 0
    rec = {"mode": self.mode, "step": p["step"], "tokens": p["tokens_total"],
           "tokens_per_s": (p["tokens_total"] - self.tok_log) / max(now - self.t_log, 1e-9),
           "loss_mean": float(m["loss"][active].mean()) if active.any() else None,
           "experts": [{"slot": e, "topic": int(p["topics"][e]), "loss": float(m["loss"][e]),
                        "tokens": int(m["tokens"][e]), "grad_norm": float(m["grad_norm"][e]),
                        "lr": float(m["lr"][e])} for e in range(self.spec.slots) if m["tokens"][e] > 0]}
    self.metrics.write(rec)
    self.t_log, self.tok_log = now, p["tokens_total"]

  def finish_experts(self, done: list[int], store: ExpertStore | None, fingerprint: str,
                     expert_meta: Callable[[int], Mapping] | None) -> None:
    """Releases the finished slots' topics, judges them for divergence and writes their experts (only
    those slots leave the devices) to the store."""
    params = _gather_slots(self.state["params"], done)
    for i, e in enumerate(done):
      topic = self.scheduler.release(e)
      self.monitor.finish(topic)
      if store is not None and is_main_process():
        expert = jax.tree.map(lambda x: x[i], params)
        meta = ExpertMeta.new(self.spec.lora, fingerprint, tokens_seen=self.scheduler.slot_tokens[e],
                              final_loss=self.last_loss[e], mode=self.mode, steps=self.step,
                              **(expert_meta(topic) if expert_meta is not None else {}))
        store.write(topic, expert, meta)
      self.written.append(topic)

  def refill(self, done: list[int], base) -> None:
    """Starts the next scheduled topics on the freed slots (fresh LoRA and optimizer state, or the seed
    adapter); a slot with no topic left idles."""
    new = self.scheduler.fill()
    for e in done:
      self.loader.set_slot(e, new.get(e, -1))
    if not new:
      return
    e_sh = self.comp.state_shardings["topic"]  # [E] over the expert axis, as reset takes them
    mask, topics, horizon = self._slot_arrays(new)
    self.state = self.comp.reset(self.state, base, *(_place(x, e_sh) for x in (mask, topics, horizon)))
    if self.init_params is not None:
      self.state = branch.start_from(self.state, self.init_params, mask)

  def save(self) -> None:
    """Checkpoints the current step (after checking every pending metric), unless it already is."""
    self.check(upto_all=True)
    if self.ckpt.latest_step() == self.step:
      return
    host = {"mode": self.mode, "step": self.step, "tokens": self.tokens_total, "loader": self.loader.state(),
            "scheduler": self.scheduler.state(), "divergence": self.monitor.state()}
    self.ckpt.save(self.step, self.state, host)
    if self.on_saved is not None:
      self.ckpt.wait()
      self.on_saved(self.step)

  def show(self, bar) -> None:
    """Advances the progress bar by one step: tokens/s since the start, experts done."""
    bar.update(1)
    el = time.time() - self.t_start
    bar.set_postfix(tok_s=f"{(self.tokens_total - self.tok_start) / max(el, 1e-9):.0f}",
                    experts=f"{len(self.scheduler.done)}/{len(self.scheduler.order)}", refresh=False)

  def result(self, status: str) -> LoopResult:
    """The `LoopResult` of this call."""
    return LoopResult(status=status, step=self.step, tokens=self.tokens_total - self.tok_start,
                      seconds=time.time() - self.t_start, state=self.state, written=self.written,
                      diverged=dict(self.monitor.diverged), tokens_total=self.tokens_total)


def _progress_bar(run: _Run) -> tqdm:
  """The tqdm bar of a run, sized by the whole schedule and starting at its current step."""
  total_steps = _estimate_steps(run.scheduler, run.tokens_per_step, run.spec.slots)
  return tqdm(total=total_steps, initial=min(run.step, total_steps), desc=f"train[{run.mode}]", unit="step",
              dynamic_ncols=True)


def _estimate_steps(scheduler: ExpertScheduler, tokens_per_step: int, slots: int) -> int:
  """Steps of the whole schedule if every slot streams full batches (for the progress bar)."""
  per = sorted((scheduler.horizon_steps(t, tokens_per_step) for t in scheduler.order), reverse=True)
  load = [0] * slots
  for p in per:  # LPT onto the least loaded slot
    i = load.index(min(load))
    load[i] += p
  return max(load) if load else 0

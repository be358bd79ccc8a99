"""The main job: run what is missing in the work directory, train the experts and the baselines, and
end with the held-out perplexity table.

    python -m mixie.train --config=configs/demo.py [--config.workdir=...]

1. The config is validated before anything is loaded or compiled (`validate_config`; ConfigError names
   the field).
2. Missing topics or dataset in `workdir` are built by the cluster stage (`mixie.cluster.topics`).
3. The experts (`train.mode`, normally "experts") and then each of `train.baselines` ("lora_all": one LoRA
   on all data at the experts' rank, "lora_all_wide": the same at rank E·r (`wide_lora`), "full":
   continued pre-training of the whole base) are trained through the same `train_loop`, with the same
   total tokens; each run checkpoints into `workdir/checkpoints/<mode>` and resumes from there, so a
   finished run is skipped and an interrupted one continues. With `train.init = "seed"` the seed
   adapter is trained first (or reused when finished) and the experts branch from it
   (`mixie.train.branch`).
4. Held-out perplexity (`mixie.evaluate.run.evaluate`, on the base already loaded): the base, each
   baseline, the routed experts and each expert on its own topic's documents (oracle), token-weighted
   overall and per topic, scored after a routing prefix of P tokens; printed and written to
   `workdir/eval/`.

Outputs: `workdir/experts/` (expert store), `workdir/lora_all/` and `workdir/lora_all_wide/` (one-entry
stores), `workdir/full/` (the continued-pre-training base as safetensors), the seed adapter
(`train.seed_dir`, default `workdir/seed/`), `workdir/metrics.jsonl`.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from mixie import io as mio
from mixie.cluster.topics import dataset_dir, load_topics, run_cluster, summary_line, topics_complete
from mixie.cluster.topics import validate_config as validate_cluster
from mixie.data.dataset import dataset_status, open_dataset, topic_token_counts
from mixie.data.loader import PackedLoader, resolve_small_topics
from mixie.distributed import barrier, is_main_process, to_host
from mixie.dtypes import check_model_dtypes
from mixie.errors import ConfigError, check
from mixie.evaluate.run import evaluate, validate_eval_config
from mixie.evaluate.tables import format_table
from mixie.model.checkpoint import fingerprint
from mixie.model.load import load_base
from mixie.model.lora import LoraConfig
from mixie.sharding import make_mesh, mesh_from_config
from mixie.store import ExpertStore, save_tree
from mixie.train import branch, divergence, optim
from mixie.train.loop import train_loop
from mixie.train.metrics import MetricsWriter
from mixie.train.scheduler import BUDGETS, ExpertScheduler, token_budgets
from mixie.train.step import MODES, TrainSpec, base_shardings

BASELINES = ("lora_all", "lora_all_wide", "full")


# ---------------------------------------------------------------------------------------------------
# Config validation (before any compute).


def _int_field(config, dotted: str, lo: int) -> int:
  sec, field = dotted.split(".")
  v = config[sec][field]
  if not isinstance(v, int) or isinstance(v, bool) or v < lo:
    raise ConfigError(f"{dotted} must be an integer >= {lo}, got {v!r}")
  return v


def _inputs_missing(workdir) -> bool:
  return not topics_complete(workdir) or dataset_status(dataset_dir(workdir)) != "complete"


def validate_config(config, devices=None) -> None:
  """Checks every setting the main job uses; raises `ConfigError` naming the field. No compute."""
  if not config.get("workdir"):
    raise ConfigError("workdir must be set (--config.workdir=...)")
  t = config.train
  if t.mode not in MODES:
    raise ConfigError(f"train.mode must be one of {MODES}, got {t.mode!r}")
  bad = [b for b in tuple(t.baselines) if b not in BASELINES]
  if bad:
    raise ConfigError(f"train.baselines: unknown baseline(s) {bad}; choose from {list(BASELINES)}")
  for f, lo in (("train.slots", 1), ("train.batch_per_slot", 1), ("train.tokens_per_expert", 1),
                ("train.checkpoint_every", 1), ("train.log_every", 1), ("train.max_steps", 0),
                ("train.warmup_steps", 0), ("train.keep_checkpoints", 1), ("train.ce_chunk", 1),
                ("dataset.seq_len", 2), ("train.wide_rank_cap", 0)):
    _int_field(config, f, lo)
  branch.validate(config)  # train.init, train.seed_fraction
  if t.budget not in BUDGETS:
    raise ConfigError(f"train.budget must be one of {BUDGETS}, got {t.budget!r}")
  LoraConfig.from_config(config.lora)  # rank >= 1, known targets, dropout in [0, 1)
  optim.OptConfig.from_config(t)  # lr, betas, clip, schedule
  full_lr = t.get("full_lr", 0.0)
  if not (isinstance(full_lr, (int, float)) and not isinstance(full_lr, bool) and 0 <= full_lr < float("inf")):
    raise ConfigError(f"train.full_lr must be a number >= 0 (0 = train.lr), got {full_lr!r}")
  divergence.DivergenceRule.from_config(t)  # divergence_*, allow_divergence
  check_model_dtypes(config.model)
  axes = tuple(config.mesh.axes)
  for a in ("expert", "data"):
    if a not in axes:
      raise ConfigError(f"mesh.axes {axes} must include {a!r}")
  mesh = make_mesh(tuple(config.mesh.shape), axes, devices)
  n_exp, n_data = mesh.shape["expert"], mesh.shape["data"]
  if t.slots % n_exp:
    raise ConfigError(f"train.slots={t.slots} is not a multiple of the mesh's expert axis "
                      f"({n_exp} devices, mesh.shape={tuple(config.mesh.shape)}): every device must "
                      "hold the same number of slots")
  if t.batch_per_slot % n_data:
    raise ConfigError(f"train.batch_per_slot={t.batch_per_slot} is not a multiple of the mesh's data "
                      f"axis ({n_data} devices)")
  if t.eval_after:
    validate_eval_config(config)
  if _inputs_missing(config.workdir):
    if not t.run_missing:
      raise ConfigError(f"{config.workdir}/topics or /dataset is missing and train.run_missing=False: "
                        "run `python -m mixie.cluster --config=...` first, or set train.run_missing=True")
    validate_cluster(config)  # also checks the corpus, the base's headers and its tokenizer


# ---------------------------------------------------------------------------------------------------
# Data of a work directory.


@dataclasses.dataclass
class TrainData:
  """The clustered training split and what the scheduler needs from it."""

  source: Any  # mixie.data.dataset.ClusteredSource (train split)
  topic_map: np.ndarray  # int32 [K]: record topic -> trained topic (-1 = skipped)
  counts: np.ndarray  # tokens per trained topic [K] (0 for merged-away / skipped topics)
  centroids: np.ndarray  # [K, d]
  budgets: dict[int, int]  # trained topic -> token budget
  small_report: dict


def open_train_data(config, tokens_per_batch: int) -> TrainData:
  """Opens `workdir/dataset` (train split) and resolves small topics and budgets."""
  out = dataset_dir(config.workdir)
  topics = load_topics(config.workdir)
  src = open_dataset(out, "train")
  raw = topic_token_counts(out, "train")
  topic_map, report = resolve_small_topics(raw, topics.centroids_kd, tokens_per_batch,
                                           config.dataset.small_topics)
  counts = np.zeros_like(raw)
  for k, t in enumerate(topic_map):
    if t >= 0:
      counts[t] += raw[k]
  trained = {int(t): int(counts[t]) for t in np.unique(topic_map[topic_map >= 0])}
  budgets = token_budgets(trained, config.train.budget, int(config.train.tokens_per_expert),
                          min_tokens=tokens_per_batch)
  return TrainData(source=src, topic_map=topic_map.astype(np.int32), counts=counts,
                   centroids=np.asarray(topics.centroids_kd), budgets=budgets, small_report=report)


def baseline_mesh(mesh):
  """The mesh of an E = 1 run: the expert axis folded into the data axis (same devices)."""
  axes = mesh.axis_names
  e, d = mesh.shape["expert"], mesh.shape["data"]
  shape = [1 if a == "expert" else (e * d if a == "data" else mesh.shape[a]) for a in axes]
  order = [axes.index(a) for a in axes]  # keep device order: expert-major over data
  return make_mesh(shape, axes, list(np.transpose(mesh.devices, order).flat))


def wide_lora(config, n_experts: int) -> LoraConfig:
  """The LoRA of `lora_all_wide`: rank E·r for E trained experts (as many parameters as all experts
  together), at most `train.wide_rank_cap` when > 0; alpha grows with the rank, so the LoRA scale
  alpha / rank is the experts'."""
  lora = LoraConfig.from_config(config.lora)
  rank = n_experts * lora.rank
  if int(config.train.wide_rank_cap):
    rank = min(rank, int(config.train.wide_rank_cap))
  return dataclasses.replace(lora, rank=rank, alpha=lora.alpha * rank / lora.rank)


def _stopper() -> Callable[[], bool]:
  """Installs a SIGTERM handler (TPU preemption) that asks the loop to save and stop."""
  flag = threading.Event()
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, lambda *_: flag.set())
  return flag.is_set


# ---------------------------------------------------------------------------------------------------
# Training runs.


def train_run(config, mode: str, cfg, base, fp: str, data: TrainData, tokenizer, mesh, rules, *,
              stop=None, metrics=None, log=print, seed_plan: branch.SeedPlan | None = None, init=None,
              store=None, ckpt_dir=None):
  """Trains one run (`mode` = experts, lora_all, lora_all_wide, full or seed) to its end; returns the
  `LoopResult`. A branched run (`train.init = "seed"`) passes its `seed_plan` (the seed's and the
  branches' budgets) and, for the experts, `init` = `(seed params, seed info)` from `branch.load`.

  The experts are staged in the run's store (`workdir/<mode>`, the seed's `seed_plan.dir`) as they
  finish and committed as one generation of it when the run finishes. `store` (a `Staging` the caller
  commits) and `ckpt_dir` replace those (the expert lifecycle trains a few topics this way:
  `mixie.lifecycle.train`)."""
  t = config.train
  wd = mio.path(config.workdir)
  T = int(config.dataset.seq_len)
  if mode == "experts":
    E, b, topic_map, budgets, run_mesh = t.slots, t.batch_per_slot, data.topic_map, data.budgets, mesh
  else:  # one slot on all the data, the same rows per step and the same total tokens
    E, b, run_mesh = 1, t.slots * t.batch_per_slot, baseline_mesh(mesh)
    topic_map = np.where(data.topic_map >= 0, 0, -1).astype(np.int32)
    budgets = {0: int(sum(data.budgets.values()))}
  if seed_plan is not None:  # the seed's share of the total, or the branches' shares
    budgets = {0: seed_plan.tokens} if mode == "seed" else seed_plan.branch_budgets
  lora = wide_lora(config, len(data.budgets)) if mode == "lora_all_wide" else LoraConfig.from_config(config.lora)
  out_dir = seed_plan.dir if mode == "seed" else wd / mode
  if ckpt_dir is None:
    ckpt_dir = out_dir / "checkpoints" if mode == "seed" else wd / "checkpoints" / mode
  opt = optim.OptConfig.from_config(t)
  if mode == "full" and float(t.get("full_lr", 0.0)):  # all weights train: a far smaller step than a LoRA's
    opt = dataclasses.replace(opt, lr=float(t.full_lr))
  spec = TrainSpec(cfg=cfg, lora=lora, opt=opt,
                   slots=E, mode=mode, remat="full" if config.model.remat else "minimal", seed=int(config.seed),
                   ce_chunk=int(t.ce_chunk))
  run_base = base if run_mesh is mesh else jax.device_put(base, base_shardings(spec, run_mesh, rules))
  bos = tokenizer.bos_id if tokenizer.add_bos else None
  loader = PackedLoader(data.source, [-1] * E, batch_per_slot=b, seq_len=T, eos_id=tokenizer.eos_ids[0],
                        bos_id=bos, pad_id=tokenizer.pad_id, seed=int(config.seed), topic_map=topic_map)
  sched = ExpertScheduler(budgets, E)
  own = store is None and mode != "full"  # staged here, committed when the run finishes
  store = ExpertStore(out_dir).staging(f"train-{mode}") if own else store

  merged_into: dict[int, list[int]] = {}  # trained topic -> the small topics merged into it (one pass)
  for k, into in enumerate(data.topic_map.tolist()):
    if into >= 0 and k != into:
      merged_into.setdefault(into, []).append(k)

  def meta(topic):
    if mode != "experts":
      return {"kind": mode, "topics": int(np.unique(data.topic_map[data.topic_map >= 0]).size), "seq_len": T}
    out = {"kind": "expert", "centroid": data.centroids[topic].astype(float).tolist(), "seq_len": T,
           "topic_tokens": int(data.counts[topic]), "budget": int(budgets[topic]),
           "merged_topics": merged_into.get(topic, [])}
    return out if init is None else {**out, "init": "seed", "seed": init[1]}

  log(f"mixie.train[{mode}]: {len(budgets)} expert(s) on {E} slot(s) x {b} rows x {T} tokens, "
      f"{sum(budgets.values())} tokens in all, mesh {dict(run_mesh.shape)}")
  res = train_loop(spec, run_mesh, rules, run_base, loader, sched, ckpt_dir=ckpt_dir,
                   store=store, fingerprint=fp, tokens_per_step=b * T, checkpoint_every=t.checkpoint_every,
                   log_every=t.log_every, max_steps=t.max_steps, metrics=metrics, expert_meta=meta, stop=stop,
                   keep_checkpoints=t.keep_checkpoints, divergence=divergence.DivergenceRule.from_config(t),
                   init_params=None if init is None else init[0])
  if own and res.status == "finished":
    if is_main_process():
      store.commit(f"mixie.train: the {mode} run finished")
    barrier(f"mixie.train.commit.{mode}")  # the other processes read the committed generation next
  if mode == "full" and res.status == "finished" and not (wd / "full" / "meta.json").exists():
    params = jax.tree.map(lambda x: x[0].astype(base_dtype(base)), to_host(res.state["params"]))
    if not is_main_process():  # every process gathers (a collective), process 0 writes
      return res
    save_tree(wd / "full" / "params.safetensors", params)
    mio.atomic_write_json(wd / "full" / "meta.json", {
        "kind": "full", "base_fingerprint": fp, "fingerprint": fingerprint(cfg, params),
        "tokens": int(sum(budgets.values())), "tokens_seen": int(res.tokens_total), "seq_len": T})
  return res


def base_dtype(base):
  """The dtype the base parameters are stored in."""
  return jax.tree.leaves(base)[0].dtype


# ---------------------------------------------------------------------------------------------------
# The job.


def run(config, *, log=print, stop: Callable[[], bool] | None = None) -> dict[str, Any]:
  """The main job (see the module docstring); returns a JSON-able summary with `status`."""
  t_start = time.time()
  validate_config(config)

  wd = mio.path(config.workdir)
  mesh = mesh_from_config(config.mesh)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  if _inputs_missing(config.workdir):
    log(f"mixie.train: topics or dataset missing in {wd}: running the cluster stage")
    log(summary_line(run_cluster(config, log=log)))
  cfg, base, tokenizer = load_base(config.model, mesh=mesh, rules=rules, seed=int(config.seed))
  check(tokenizer is not None, "model: the base has no tokenizer (a random preset without one?)")
  if int(config.dataset.seq_len) > cfg.max_seq_len:
    raise ConfigError(f"dataset.seq_len={config.dataset.seq_len} exceeds the base's context "
                      f"({cfg.max_seq_len})")
  fp = fingerprint(cfg, base)
  T = int(config.dataset.seq_len)
  data = open_train_data(config, int(config.train.batch_per_slot) * T)
  stop = stop or _stopper()
  metrics = MetricsWriter(wd / "metrics.jsonl", tb_dir=wd / "tensorboard", log=log)
  summary: dict[str, Any] = {"workdir": str(wd), "base_fingerprint": fp, "runs": {}}
  modes = [config.train.mode] + [b for b in tuple(config.train.baselines) if b != config.train.mode]
  plan, init = None, None
  if config.train.init == "seed":  # the seed adapter first (trained once per seed_dir), then the branches
    plan = branch.plan(config, data.budgets, int(config.train.batch_per_slot) * T)
    branch.claim(config, plan.dir)
    modes = ["seed"] + modes
  try:
    for mode in modes:
      if mode == "seed" and 0 in ExpertStore(plan.dir):
        summary["runs"]["seed"] = {"status": "reused", "dir": str(plan.dir)}
        init = branch.load(plan.dir, fp, LoraConfig.from_config(config.lora))
        continue
      res = train_run(config, mode, cfg, base, fp, data, tokenizer, mesh, rules, stop=stop,
                      metrics=metrics, log=log, seed_plan=plan if mode in ("seed", "experts") else None,
                      init=init if mode == "experts" else None)
      summary["runs"][mode] = {"status": res.status, "step": res.step, "tokens": res.tokens,
                               "seconds": round(res.seconds, 1),
                               "tokens_per_s": round(res.tokens / res.seconds, 1) if res.seconds else None}
      res.state = None
      summary["runs"][mode]["diverged"] = divergence.note(wd, mode, res.diverged, log)
      if res.status == "preempted":
        log(f"mixie.train: SIGTERM: saved a checkpoint of {mode!r} at step {res.step} in "
            f"{wd / 'checkpoints' / mode}; rerun the same command to resume")
        summary["status"] = "preempted"
        return summary
      if res.status == "max_steps":
        log(f"mixie.train: {mode!r} stopped at train.max_steps={config.train.max_steps}")
        summary["status"] = "max_steps"
        return summary
      if mode == "seed":
        init = branch.load(plan.dir, fp, LoraConfig.from_config(config.lora))
  finally:
    metrics.close()
  if config.train.eval_after:  # the prefix-routed held-out table of `mixie.evaluate` on this base
    results = evaluate(config, loaded=(cfg, base, tokenizer), fp=fp, log=log)
    log(format_table(results))
    summary["eval"] = {"ppl": {p: tab["ppl"] for p, tab in results["by_prefix"].items()},
                       "docs": results["docs"], "rows": results["rows"]}
  summary["diverged"] = divergence.load(wd)
  refuse = bool(summary["diverged"]) and not config.train.allow_divergence
  summary["status"] = "diverged" if refuse else "finished"
  summary["seconds"] = round(time.time() - t_start, 1)
  if is_main_process():
    mio.atomic_write_json(wd / "train_summary.json", summary)
  log(f"mixie.train: done in {summary['seconds']:.0f}s; experts in {wd / 'experts'}")
  if refuse:
    raise divergence.Diverged(divergence.refusal(summary["diverged"]))
  return summary



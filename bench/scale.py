"""The scale simulation: E experts through every stage, timed, for several E (`configs/demo.py:scale:E`).

A tiny random base (2 layers, d=64, the shipped SmolLM2 tokenizer) and a synthetic corpus of E topics
(`mixie.data.synthetic`, 4 documents per topic) go through: embedding (TF-IDF) and k-means to E
centroids, the clustered dataset, E experts trained in waves of `train.slots` by the slot scheduler, the
expert store, the ScaNN router over E centroids (and kNN over the training documents), routed
evaluation over E experts, and mixed-batch serving with an LRU expert cache of 16 slots under churn.
Each E runs in a fresh process (so its peak RSS is its own).

What is reported, per E: wall seconds per stage; the training loop's host-side work, split into
per-step work (building and placing the batch, counting tokens) and per-expert work (writing finished
experts to the store, scheduler and loader bookkeeping) with its total per expert and per
wave, also as a multiple of what one store write of the same expert costs in a scratch store right after
(a calibration: the machine may be busier in one run than in another); fetching finished slots to the
host per expert (steady state: the first fetch of each wave size,
which compiles, is reported apart); per-expert
costs of scanning the store (listing + every expert's metadata), building the router,
evaluation and serving; peak RSS. Ratios are against the smallest E: flat (1.0) means linear in E.

  python bench/scale.py [--experts 50,500,5000] [--root /tmp/mixie_scale] [--keep]
  python bench/scale.py --one 500 --workdir DIR     # one E in this process (JSON on the last line)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import demo  # noqa: E402
from mixie.cluster.topics import run_cluster  # noqa: E402
from mixie.data.dataset import open_dataset  # noqa: E402
from mixie.data.loader import PackedLoader  # noqa: E402
from mixie.evaluate.run import evaluate  # noqa: E402
from mixie.model.checkpoint import fingerprint  # noqa: E402
from mixie.model.load import load_base  # noqa: E402
from mixie.route.run import build_router, expert_of_topic  # noqa: E402
from mixie.serve.run import make_server  # noqa: E402
from mixie.sharding import mesh_from_config  # noqa: E402
from mixie.store import ExpertStore, Staging  # noqa: E402
from mixie.train import loop as train_loop_mod  # noqa: E402
from mixie.train.main import open_train_data, train_run  # noqa: E402
from mixie.train.metrics import MetricsWriter  # noqa: E402
from mixie.train.scheduler import ExpertScheduler  # noqa: E402

PER_EXPERT = ("Staging.write", "ExpertScheduler.release", "ExpertScheduler.fill",
              "PackedLoader.set_slot")  # the training loop's host work when experts finish and start
PER_STEP = ("PackedLoader.next_batch", "_put_batch", "ExpertScheduler.add_tokens")


def peak_rss_mb() -> float:
  """Peak resident set size of this process so far, MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def timed_calls(records: list):
  """Records `(label, wall seconds, CPU seconds of the calling thread, key)` for every call of the
  training loop's host-side functions (patched for the duration; they behave the same). `key` is the
  number of slots of a `_gather_slots` call (its first call per number compiles), else None. The thread's
  CPU time is the host's own work, whatever else runs on the machine (the figures compared across E)."""
  targets = [(Staging, "write"), (ExpertStore, "commit"), (ExpertScheduler, "release"),
             (ExpertScheduler, "fill"),
             (ExpertScheduler, "add_tokens"), (PackedLoader, "set_slot"), (PackedLoader, "next_batch"),
             (train_loop_mod, "_gather_slots"), (train_loop_mod, "_put_batch")]
  saved = []
  for owner, name in targets:
    fn = getattr(owner, name)
    label = f"{owner.__name__}.{name}" if isinstance(owner, type) else name

    def wrapper(*a, _fn=fn, _label=label, **kw):
      t0, c0 = time.perf_counter(), time.thread_time()
      try:
        return _fn(*a, **kw)
      finally:
        key = len(a[1]) if _label == "_gather_slots" else None
        records.append((_label, time.perf_counter() - t0, time.thread_time() - c0, key))
    saved.append((owner, name, fn))
    setattr(owner, name, wrapper)
  try:
    yield
  finally:
    for owner, name, fn in saved:
      setattr(owner, name, fn)


def host_costs(records: list) -> tuple[dict, dict, dict, float]:
  """(wall seconds, CPU seconds, calls per label, compile seconds): the compile seconds are the first
  `_gather_slots` call of each slot count, left out of the steady-state figures."""
  wall, cpu, calls, seen, compile_s = defaultdict(float), defaultdict(float), defaultdict(int), set(), 0.0
  for label, dt, ct, key in records:
    if label == "_gather_slots" and key not in seen:
      seen.add(key)
      compile_s += dt
      continue
    wall[label] += dt
    cpu[label] += ct
    calls[label] += 1
  return wall, cpu, calls, compile_s


def wave_costs(records: list) -> list[float]:
  """CPU milliseconds of the per-expert host work per expert, wave by wave (a wave: the experts that
  finished together, written, and their slots refilled; it ends with the scheduler's `fill`)."""
  out, cpu, written = [], 0.0, 0
  for label, _, ct, _ in records:
    if label in PER_EXPERT:
      cpu += ct
      written += label == "Staging.write"
    if label == "ExpertScheduler.fill":
      if written:
        out.append(1e3 * cpu / written)
      cpu, written = 0.0, 0
  return out


def calibration_write_ms(store_dir: str, rounds: int = 4, per_round: int = 16) -> float:
  """CPU milliseconds per staged write (`Staging.write`, as the training loop's) of one of the run's
  experts into a fresh scratch store (the median of `rounds`): what a write costs on this machine right
  now, to which the per-expert host work is compared, so that a machine busier in one run than in
  another does not read as a cost of E."""
  store = ExpertStore(store_dir)
  tree, meta = store.load(store.topics()[0], None)
  out = []
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(store_dir))) as scratch:
    s = ExpertStore(scratch).staging("calibration")
    for r in range(rounds):
      c0 = time.thread_time()
      for i in range(per_round):
        s.write(r * per_round + i, tree, meta)
      out.append(1e3 * (time.thread_time() - c0) / per_round)
  return float(np.median(out))


def run_one(experts: int, workdir: str, serve_batches: int = 8) -> dict:
  """The simulation for E = `experts` in `workdir` (must be empty or absent); returns the report."""
  config = demo.get_config(f"scale:{experts}")
  config.workdir = workdir
  out: dict = {"experts_requested": experts, "stages_s": {}, "peak_rss_mb": {}}
  k = cluster_stage(config, out)
  loaded, fp = train_stage(config, out)
  store = store_and_router_stage(config, out, k)
  evaluate_stage(config, out, loaded, fp, len(store.topics()))
  serve_stage(config, out, loaded, serve_batches)
  out["stages_s"]["total"] = sum(v for key, v in out["stages_s"].items() if "." not in key)
  out["device"] = str(jax.devices()[0].device_kind)
  return out


def _quiet(*_):
  pass


def cluster_stage(config, out: dict) -> int:
  """Embedding, k-means and the clustered dataset (`mixie.cluster`); returns the number of topics."""
  t0 = time.perf_counter()
  summary = run_cluster(config, log=_quiet)
  out["stages_s"]["cluster"] = time.perf_counter() - t0
  with open(os.path.join(config.workdir, "topics", "steps.jsonl")) as f:
    out["stages_s"].update({f"cluster.{s['step']}": s["seconds"] for s in map(json.loads, f)})
  out["topics"] = {"k": summary["num_topics"], "train_docs": summary["num_train_docs"],
                   "nmi": summary["quality"].get("nmi"), "ari": summary["quality"].get("ari")}
  out["peak_rss_mb"]["cluster"] = peak_rss_mb()
  return summary["num_topics"]


def train_stage(config, out: dict):
  """The experts, in waves through the slot scheduler, with the loop's host work timed; returns the
  loaded base `(cfg, params, tokenizer)` and its fingerprint."""
  stage = out["stages_s"]
  t0 = time.perf_counter()
  mesh = mesh_from_config(config.mesh)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  cfg, base, tok = load_base(config.model, mesh=mesh, rules=rules, seed=int(config.seed))
  fp = fingerprint(cfg, base)
  data = open_train_data(config, int(config.train.batch_per_slot) * int(config.dataset.seq_len))
  stage["train.setup"] = time.perf_counter() - t0
  records: list = []
  metrics = MetricsWriter(os.path.join(config.workdir, "metrics.jsonl"))
  t0 = time.perf_counter()
  with timed_calls(records):
    res = train_run(config, "experts", cfg, base, fp, data, tok, mesh, rules, metrics=metrics, log=_quiet)
  stage["train"] = time.perf_counter() - t0
  metrics.close()
  seconds, cpu, calls, compile_s = host_costs(records)
  per_wave = wave_costs(records)
  q = max(1, len(per_wave) // 4)  # first and last quarter of the waves (a cost growing with the experts
  # done so far shows as a ratio above 1)
  sizes = [key for label, _, _, key in records if label == "_gather_slots"]
  fetched = sum(sizes) - sum(set(sizes))  # experts of the steady-state fetches
  n_exp = len(data.budgets)
  waves = calls["ExpertScheduler.fill"]  # the first fill, then one per wave of finishing experts
  per_expert_s = sum(seconds[k] for k in PER_EXPERT)
  per_step_s = sum(seconds[k] for k in PER_STEP)
  out["train"] = {
      "experts": n_exp, "slots": int(config.train.slots), "waves": waves, "steps": res.step,
      "tokens_per_s": res.tokens / max(res.seconds, 1e-9),
      "host_per_expert_ms": 1e3 * per_expert_s / n_exp, "host_per_wave_ms": 1e3 * per_expert_s / waves,
      "host_cpu_per_expert_ms": 1e3 * sum(cpu[k] for k in PER_EXPERT) / n_exp,
      "host_cpu_per_step_ms": 1e3 * sum(cpu[k] for k in PER_STEP) / max(res.step, 1),
      "host_cpu_per_expert_ms_median_wave": float(np.median(per_wave)),
      "host_cpu_late_vs_early_waves": float(np.median(per_wave[-q:]) / np.median(per_wave[:q])),
      "host_per_step_ms": 1e3 * per_step_s / max(res.step, 1),
      "fetch_per_expert_ms": 1e3 * seconds["_gather_slots"] / max(1, fetched),
      "host_share": (per_expert_s + per_step_s) / stage["train"], "gather_compile_s": compile_s,
      "detail_ms": {k: round(1e3 * v, 1) for k, v in sorted(seconds.items())}}
  calib = calibration_write_ms(os.path.join(config.workdir, "experts"))
  out["train"]["calibration_write_cpu_ms"] = calib
  out["train"]["host_cpu_per_expert_vs_calibration"] = out["train"]["host_cpu_per_expert_ms_median_wave"] / calib
  out["peak_rss_mb"]["train"] = peak_rss_mb()
  return (cfg, base, tok), fp


def store_and_router_stage(config, out: dict, k: int) -> ExpertStore:
  """Listing the store, reading every expert's metadata, building the router, routing every document."""
  store = ExpertStore(os.path.join(config.workdir, "experts"))
  t0, c0 = time.perf_counter(), time.thread_time()
  listed = store.topics()
  t1, c1 = time.perf_counter(), time.thread_time()
  eot = expert_of_topic(store, k)  # every expert's metadata
  t2, c2 = time.perf_counter(), time.thread_time()
  n = len(listed)
  sample = listed[:20]
  out["store"] = {"experts": n, "list_ms_per_expert": 1e3 * (t1 - t0) / n,
                  "meta_ms_per_expert": 1e3 * (t2 - t1) / n, "list_cpu_ms_per_expert": 1e3 * (c1 - c0) / n,
                  "meta_cpu_ms_per_expert": 1e3 * (c2 - c1) / n,
                  # its weights file, and its share of the generation's manifest (which holds the metadata)
                  "bytes_per_expert": sum(os.path.getsize(store.weights_file(t)) for t in sample) / len(sample)
                  + os.path.getsize(store.snapshot().manifest_file() or os.devnull) / n}
  out["stages_s"]["store_scan"] = t2 - t0
  t0 = time.perf_counter()
  router = build_router(config, store)
  t1 = time.perf_counter()
  emb = np.load(os.path.join(config.workdir, "topics", "embeddings.npz"))["emb_nd"]
  routed = router.route(emb)
  t2 = time.perf_counter()
  out["router"] = {"rows": router.n_topics, "build_ms_per_expert": 1e3 * (t1 - t0) / n,
                   "route_us_per_query": 1e6 * (t2 - t1) / emb.shape[0], "queries": int(emb.shape[0]),
                   "reaches_experts": int(np.unique(routed.top1).size),
                   "experts_in_router": int((eot >= 0).sum())}
  out["stages_s"]["router"] = t2 - t0
  out["peak_rss_mb"]["router"] = peak_rss_mb()
  return store


def evaluate_stage(config, out: dict, loaded, fp: str, n_experts: int) -> None:
  """Routed evaluation over every expert (`mixie.evaluate`)."""
  t0 = time.perf_counter()
  results = evaluate(config, loaded=loaded, fp=fp, log=_quiet, progress=False)
  seconds = time.perf_counter() - t0
  p = str(results["prefix_tokens"][-1])
  out["evaluate"] = {"docs": results["docs"], "pairs": results["pairs_scored"],
                     "scoring_s": results["scoring_seconds"], "host_s": seconds - results["scoring_seconds"],
                     "ms_per_expert": 1e3 * seconds / n_experts, "ppl": results["by_prefix"][p]["ppl"],
                     "routing_accuracy": results["by_prefix"][p]["routing_accuracy"]}
  out["stages_s"]["evaluate"] = seconds
  out["peak_rss_mb"]["evaluate"] = peak_rss_mb()


def serve_stage(config, out: dict, loaded, batches: int) -> None:
  """Mixed-batch serving of held-out prompts (16 per batch) through the 16-slot LRU expert cache."""
  t0 = time.perf_counter()
  server = make_server(config, loaded=loaded)
  held = open_dataset(os.path.join(config.workdir, "dataset"), "heldout")
  n = min(len(held), 16 * batches)
  prompts = [loaded[2].decode([int(t) for t in r["tokens"][:16]]) for r in held.__getitems__(list(range(n)))]
  t1 = time.perf_counter()
  answered = 0
  for i in range(0, n, 16):
    rs = server.generate(prompts[i:i + 16], max_new_tokens=int(config.generate.max_new_tokens))
    answered += sum(r.error is None for r in rs)
  t2 = time.perf_counter()
  c = server.cache
  out["serve"] = {"prompts": n, "answered": answered, "setup_s": t1 - t0,
                  "ms_per_prompt": 1e3 * (t2 - t1) / max(n, 1), "cache_slots": c.capacity,
                  "hits": c.hits, "misses": c.misses, "evictions": c.evictions}
  out["stages_s"]["serve"] = t2 - t0
  out["peak_rss_mb"]["serve"] = peak_rss_mb()


def compare(reports: list[dict]) -> dict:
  """The per-expert figures of each E and their ratio to the smallest E's (1.0 = linear in E)."""
  keys = {"train_host_cpu_per_expert_vs_calibration": ("train", "host_cpu_per_expert_vs_calibration"),
          "train_host_cpu_per_expert_ms_median_wave": ("train", "host_cpu_per_expert_ms_median_wave"),
          "train_host_cpu_per_expert_ms": ("train", "host_cpu_per_expert_ms"),
          "train_host_per_expert_ms": ("train", "host_per_expert_ms"),
          "train_fetch_per_expert_ms": ("train", "fetch_per_expert_ms"),
          "store_meta_cpu_ms_per_expert": ("store", "meta_cpu_ms_per_expert"),
          "train_host_per_step_ms": ("train", "host_per_step_ms"),
          "store_meta_ms_per_expert": ("store", "meta_ms_per_expert"),
          "store_list_ms_per_expert": ("store", "list_ms_per_expert"),
          "router_build_ms_per_expert": ("router", "build_ms_per_expert"),
          "evaluate_ms_per_expert": ("evaluate", "ms_per_expert")}
  ref = reports[0]
  out = {}
  for name, (sec, field) in keys.items():
    out[name] = {str(r["experts_requested"]): round(r[sec][field], 3) for r in reports}
    if ref[sec][field] > 0:
      out[name + "_ratio"] = {str(r["experts_requested"]): round(r[sec][field] / ref[sec][field], 2)
                              for r in reports}
  out["total_s"] = {str(r["experts_requested"]): round(r["stages_s"]["total"], 1) for r in reports}
  out["peak_rss_mb"] = {str(r["experts_requested"]): round(max(r["peak_rss_mb"].values())) for r in reports}
  return out


def run_subprocess(experts: int, workdir: str, timeout: float = 7200) -> dict:
  """`run_one` in a fresh Python process (its own peak RSS); the report from its last output line."""
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as the demo
  r = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", str(experts), "--workdir", workdir],
                     capture_output=True, text=True, timeout=timeout, env=env)
  if r.returncode != 0:
    raise RuntimeError(f"scale simulation E={experts} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--experts", default="50,500,5000", help="comma-separated E values")
  ap.add_argument("--root", default="/tmp/mixie_scale", help="work directories go to ROOT/E<e>")
  ap.add_argument("--keep", action="store_true", help="keep the work directories")
  ap.add_argument("--one", type=int, default=0, help="run one E in this process")
  ap.add_argument("--workdir", default="", help="with --one: the work directory")
  args = ap.parse_args()
  if args.one:
    wd = args.workdir or os.path.join(args.root, f"E{args.one}")
    shutil.rmtree(wd, ignore_errors=True)
    print(json.dumps(run_one(args.one, wd)), flush=True)
    return
  reports = []
  for e in sorted(int(x) for x in args.experts.split(",")):
    wd = os.path.join(args.root, f"E{e}")
    shutil.rmtree(wd, ignore_errors=True)
    reports.append(run_subprocess(e, wd))
    print(json.dumps(reports[-1]), flush=True)
    if not args.keep:
      shutil.rmtree(wd, ignore_errors=True)
  print(json.dumps({"compare": compare(reports)}, indent=1), flush=True)


if __name__ == "__main__":
  main()

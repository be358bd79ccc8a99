"""Time and bytes written by a generation commit of the versioned expert store, at E experts; prints JSON.

Experts of the SmolLM2-135M shape (`--layers` of its 30, rank `--rank`, every projection; f32), random
values, in a fresh store on local disk (each write fsync'd). For each E of `--experts`, medians over
`--reps` (a fresh store each rep):

- `first`: E experts staged and committed as generation 1 (a finished training run);
- `one_changed`: one expert rewritten with new values and committed (`retrain`, or `add` of one topic);
- `retire`: one expert's retired flag set (no weights written);
- `unchanged`: the same bytes staged again (a resumed run rewriting a finished expert): no generation;
- peer `rewrite_all`: the layout before generations (one `weights.safetensors` + `meta.json` per
  expert, written atomically, as `ExpertStore.write` did) rewritten for every expert: what keeping
  a changed expert set cost when each change meant rewriting the store (retraining all);
- `switch_check_us`: what a server pays per batch to notice a new generation (`current_generation()`,
  one small file read).

`bytes` is the growth of the store directory (files written and kept; temporary files are renamed, so
none are left). Ratios: one_changed vs rewrite_all, in seconds and bytes.

    python bench/store_commit.py [--experts 6,500] [--layers 2] [--rank 8] [--reps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mixie.io import atomic_write_json  # noqa: E402
from mixie.model.llama import PRESETS  # noqa: E402
from mixie.model.lora import LoraConfig, expert_shapes  # noqa: E402
from mixie.store import FORMAT, ExpertMeta, ExpertStore, save_tree  # noqa: E402


def dir_bytes(d) -> int:
  """Bytes of every file under `d`."""
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def expert(shapes, rng) -> dict:
  """Random f32 tensors of one expert's shapes."""
  return {p: {k: rng.standard_normal(s).astype(np.float32) for k, s in ab.items()} for p, ab in shapes.items()}


def timed(fn, d) -> tuple[float, int]:
  """(seconds, bytes the store directory grew by) of `fn()`."""
  b0, t0 = dir_bytes(d), time.perf_counter()
  fn()
  return time.perf_counter() - t0, dir_bytes(d) - b0


def one_rep(E: int, shapes, lora, root, seed: int) -> dict:
  """Every measurement of the module docstring, on fresh stores under `root`."""
  rng = np.random.default_rng(seed)
  experts = [expert(shapes, rng) for _ in range(E)]
  meta = ExpertMeta.new(lora, "bench", kind="expert", centroid=rng.standard_normal(384).tolist())
  d = os.path.join(root, f"store-{E}-{seed}")
  store = ExpertStore(d)
  out = {}

  def first():
    s = store.staging("run")
    for t, e in enumerate(experts):
      s.write(t, e, meta)
    assert s.commit("first") == 1

  out["first"] = timed(first, d)
  changed = expert(shapes, rng)

  def one_changed():
    s = store.staging("retrain")
    s.write(0, changed, meta)
    assert s.commit("retrain 0") == 2

  out["one_changed"] = timed(one_changed, d)
  out["retire"] = timed(lambda: store.commit("retire 1", retire=[1]), d)

  def unchanged():
    s = store.staging("resume")
    s.write(2, experts[2], meta)
    assert s.commit("resume") is None

  out["unchanged"] = timed(unchanged, d)
  t0 = time.perf_counter()
  n = 2000
  for _ in range(n):
    store.current_generation()
  switch_us = (time.perf_counter() - t0) / n * 1e6
  old = os.path.join(root, f"old-{E}-{seed}")

  def rewrite_all():  # the layout before generations: every entry's files, weights first
    for t, e in enumerate(experts):
      entry = os.path.join(old, f"topic_{t:06d}")
      os.makedirs(entry, exist_ok=True)
      save_tree(os.path.join(entry, "weights.safetensors"), e, metadata={"format": FORMAT})
      atomic_write_json(os.path.join(entry, "meta.json"), dataclasses.replace(meta, topic=t).to_json())

  out["rewrite_all"] = timed(rewrite_all, old)
  shutil.rmtree(d)
  shutil.rmtree(old)
  return {k: {"seconds": v[0], "bytes": v[1]} for k, v in out.items()} | {"switch_check_us": switch_us}


def main() -> None:
  """Runs the benchmark and prints (and optionally writes) the JSON."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--experts", default="6,500", help="comma-separated numbers of experts E")
  ap.add_argument("--layers", type=int, default=2, help="layers of the SmolLM2-135M shape kept (of 30)")
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--dir", default="", help="where the stores are written (default: a temporary dir)")
  ap.add_argument("--out", default="")
  a = ap.parse_args()
  cfg = dataclasses.replace(PRESETS["smollm2_135m"], n_layers=a.layers)
  lora = LoraConfig(rank=a.rank)
  shapes = expert_shapes(cfg, lora)
  per_expert = sum(4 * int(np.prod(s)) for ab in shapes.values() for s in ab.values())
  root = tempfile.mkdtemp(dir=a.dir or None, prefix="mixie-store-bench-")
  results = {}
  try:
    for E in (int(x) for x in a.experts.split(",")):
      reps = [one_rep(E, shapes, lora, root, seed) for seed in range(a.reps)]
      med = {k: {f: statistics.median(r[k][f] for r in reps) for f in ("seconds", "bytes")}
             for k in reps[0] if k != "switch_check_us"}
      med["switch_check_us"] = statistics.median(r["switch_check_us"] for r in reps)
      med["ratio_one_changed_vs_rewrite_all"] = {
          f: med["one_changed"][f] / med["rewrite_all"][f] for f in ("seconds", "bytes")}
      results[str(E)] = med
      print(f"E={E}: " + json.dumps(med), file=sys.stderr)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  out = {"benchmark": "store_commit", "expert_shape": {"preset": "smollm2_135m", "layers": a.layers,
                                                       "rank": a.rank, "targets": list(lora.targets),
                                                       "bytes_f32": per_expert},
         "reps": a.reps, "disk": "local, fsync'd", "results": results}
  print(json.dumps(out, indent=1))
  if a.out:  # atomically (a killed run leaves no half file)
    atomic_write_json(a.out, out)


if __name__ == "__main__":
  main()

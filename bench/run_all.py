"""Every benchmark's CPU section, one after another, into one JSON file (`make bench`).

Each `bench/*.py` runs in its own process with the sizes of the chosen profile (recorded in the JSON
next to its result, so that numbers are never read without them):

- `default`: sized for about 10 to 20 minutes on an idle 2-core machine: smaller than each script's
  own defaults (those are the measured README rows, some of which take an hour there);
- `smoke`: the smallest sizes, a check that every script runs end to end (a few minutes).

GPU sections are not run here (each script skips them without a GPU; `--sections` keeps them off).

    python bench/run_all.py [--profile default|smoke] [--only kmeans,embed] [--out FILE]

Writes `bench/results/<UTC date and time>.json` unless `--out` is given; exits 1 when a benchmark
failed (its stderr tail is in the JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# benchmark -> profile -> its command-line arguments (CPU sections only)
PROFILES: dict[str, dict[str, list[str]]] = {
    "base_inference": {
        "default": ["--batches", "1,4", "--prompt", "64", "--new", "32", "--repeats", "2"],
        "smoke": ["--batches", "1", "--prompt", "16", "--new", "4", "--repeats", "1"]},
    "embed": {
        "default": ["--docs", "500", "--max-tokens", "64", "--batch", "64"],
        "smoke": ["--docs", "64", "--max-tokens", "32", "--batch", "32"]},
    "kmeans": {
        "default": ["--n", "20000", "--d", "128", "--k", "128", "--iters", "10"],
        "smoke": ["--n", "4000", "--d", "32", "--k", "16", "--iters", "3"]},
    "route_log": {
        "default": ["--rows", "8", "--prompt-len", "32", "--new-tokens", "8", "--reps", "2"],
        "smoke": ["--quick", "--rows", "4", "--prompt-len", "32", "--new-tokens", "3", "--reps", "1"]},
    "route_serve": {
        "default": ["--sections", "serve,route", "--rows", "8", "--prompt-len", "32", "--new-tokens", "8",
                    "--knn-docs", "100000", "--reps", "2"],
        "smoke": ["--sections", "serve,route", "--quick", "--model", "random", "--reps", "1"]},
    "scale": {
        "default": ["--experts", "50,500"],
        "smoke": ["--experts", "50"]},
    "store_commit": {
        "default": ["--experts", "6,500", "--reps", "3"],
        "smoke": ["--experts", "6,50", "--reps", "1"]},
    "topic_quality": {
        "default": ["--max-docs", "2000", "--base-docs", "100", "--k", "12"],
        "smoke": ["--max-docs", "300", "--base-docs", "100", "--k", "4"]},
    "train_experts": {
        "default": ["--sections", "cpu", "--experts", "4", "--batch", "1", "--seq", "32", "--steps", "2",
                    "--repeats", "1"],
        "smoke": ["--sections", "cpu", "--model", "random", "--experts", "2", "--seq", "16", "--steps", "1",
                  "--repeats", "1"]},
}


def last_json(stdout: str):
  """The JSON object a benchmark printed last (the scripts print one, maybe after other lines)."""
  try:
    return json.loads(stdout)
  except json.JSONDecodeError:
    pass
  lines = stdout.splitlines()
  for i in range(len(lines) - 1, -1, -1):
    if lines[i].startswith("{"):
      try:
        return json.loads("\n".join(lines[i:]))
      except json.JSONDecodeError:
        continue
  return None


def _text(b) -> str:
  return b.decode("utf-8", "replace") if isinstance(b, bytes) else (b or "")


def run_one(name: str, args: list[str], timeout: float) -> dict:
  """Runs `bench/<name>.py args`; its JSON, wall time and, on failure, the end of its stderr."""
  cmd = [sys.executable, str(HERE / f"{name}.py"), *args]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get(
      "PYTHONPATH", "")])))
  t0 = time.perf_counter()
  try:
    r = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=timeout)
    code, out, err = r.returncode, r.stdout, r.stderr
  except subprocess.TimeoutExpired as e:  # its output so far comes as bytes
    code, out = "timeout", _text(e.stdout)
    err = f"killed after {timeout:.0f}s\n{_text(e.stderr)}"
  rec = {"args": args, "wall_s": round(time.perf_counter() - t0, 1), "returncode": code,
         "result": last_json(out) if code == 0 else None}
  if code != 0 or rec["result"] is None:
    rec["error"] = str(err)[-3000:] or str(out)[-3000:]
  return rec


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--profile", default="default", choices=("default", "smoke"))
  ap.add_argument("--only", default="", help="comma list of benchmarks (default: all)")
  ap.add_argument("--out", default="", help="JSON file to write (default: bench/results/<date>.json)")
  ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")
  a = ap.parse_args()
  names = [n for n in a.only.split(",") if n] or list(PROFILES)
  unknown = sorted(set(names) - set(PROFILES))
  if unknown:
    ap.error(f"unknown benchmark(s) {unknown}; choose from {sorted(PROFILES)}")
  now = datetime.datetime.now(datetime.timezone.utc)
  out_path = Path(a.out) if a.out else HERE / "results" / f"{now.strftime('%Y-%m-%dT%H%M%SZ')}.json"
  report = {"started": now.isoformat(timespec="seconds"), "profile": a.profile,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "loadavg_start": os.getloadavg()[0]},
            "benchmarks": {}}
  for name in names:
    print(f"bench/run_all: {name} {' '.join(PROFILES[name][a.profile])}", file=sys.stderr, flush=True)
    rec = run_one(name, PROFILES[name][a.profile], a.timeout)
    report["benchmarks"][name] = rec
    status = "ok" if rec["result"] is not None else f"FAILED ({rec['returncode']})"
    print(f"bench/run_all: {name} {status} in {rec['wall_s']:.0f}s", file=sys.stderr, flush=True)
  report["machine"]["loadavg_end"] = os.getloadavg()[0]  # other work on the machine skews timings
  report["wall_s"] = round(sum(r["wall_s"] for r in report["benchmarks"].values()), 1)
  failed = [n for n, r in report["benchmarks"].items() if r["result"] is None]
  report["failed"] = failed
  out_path.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_path.with_name(out_path.name + ".tmp")
  tmp.write_text(json.dumps(report, indent=2) + "\n")
  tmp.replace(out_path)  # atomic: a killed run leaves no half-written file
  print(f"bench/run_all: {len(names) - len(failed)} of {len(names)} benchmarks in {report['wall_s']:.0f}s; "
        f"wrote {out_path}", file=sys.stderr, flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

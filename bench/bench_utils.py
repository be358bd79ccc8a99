"""What the bench scripts share: median wall time of repeated calls, and the serving benchmarks'
command-line options.

Imported by the bench scripts (their directory is on `sys.path`); numpy only, so that it loads anywhere
a script runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def median_seconds(fn, reps: int) -> float:
  """Median wall seconds of `reps` calls of `fn` (no warm-up: the caller warms up)."""
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def serving_args(ap: argparse.ArgumentParser, *, reps: int, quick_help: str) -> None:
  """Adds the options of a batch of B prompts served to B experts: `--rows`, `--prompt-len`,
  `--new-tokens`, `--reps` (default `reps`), `--quick` (a smoke test of the script: `quick_help`)."""
  ap.add_argument("--rows", type=int, default=16)
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=16)
  ap.add_argument("--reps", type=int, default=reps)
  ap.add_argument("--quick", action="store_true", help=quick_help)

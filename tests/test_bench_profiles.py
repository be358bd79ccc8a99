"""`make bench` (bench/run_all.py) runs every benchmark script: a new script without a profile fails here."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
HELPERS = {"run_all", "hf_peer", "bench_utils"}  # modules the scripts import, not benchmarks


def _run_all():
  spec = importlib.util.spec_from_file_location("bench_run_all", BENCH / "run_all.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_every_benchmark_has_a_default_and_a_smoke_profile():
  scripts = {p.stem for p in BENCH.glob("*.py")} - HELPERS
  profiles = _run_all().PROFILES
  assert sorted(profiles) == sorted(scripts)
  for name, p in profiles.items():
    assert set(p) == {"default", "smoke"}, name

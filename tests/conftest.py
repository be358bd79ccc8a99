"""Tests run on 8 fake CPU devices; the flag must be set before jax starts."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (after the flags)

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache for every subprocess the tests start (this process read its own
# settings at `import jax` above, so only the children use it): the many short CLI runs of the same tiny
# configs (train, resume after a kill, evaluate, the scale simulation's two sizes) compile each program
# once per suite instead of once per process. Removed when the session ends.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_JAX_CACHE = tempfile.mkdtemp(prefix="mixie-tests-jax-cache-")
atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# --- a tiny trained work directory (session-scoped; used by the analysis and notebook tests) ----------

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import json  # noqa: E402

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

from run_utils import write_tiny_hf_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# `configs/demo.py:tiny` shrunk further for a CPU test: a 2-layer d=32 random Llama in HF format with the
# shipped SmolLM2 tokenizer, tf-idf topics of 240 documents, 4 experts trained at once for 8 steps,
# no baseline; then `mixie.evaluate` with two routing prefixes.
TINY_RUN_OVERRIDES = {
    "model.source": "hf", "cluster.embedder": "tfidf", "cluster.embed_tokens": 16, "data.max_docs": 240,
    "cluster.k": 4, "train.slots": 4, "train.batch_per_slot": 2, "dataset.seq_len": 32,
    "train.tokens_per_expert": 512, "train.checkpoint_every": 100, "train.baselines": "()",
    "train.eval_after": False, "mesh.shape": "(1,1,1)", "eval.max_docs": 24, "eval.prefix_tokens": "(4,8)",
    "route.knn_k": 4,
}


def built_once(tmp_path_factory, name: str, build) -> dict:
  """`build(directory)`'s JSON-able result, computed once per test session: with several pytest-xdist
  workers the first to ask builds it under a file lock in the session's shared temporary directory and
  the others read its result (a session fixture would otherwise be built once per worker)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's directory, above each worker's own
  result = root / f"{name}.json"
  with FileLock(str(root / f"{name}.lock")):
    if not result.exists():
      out = root / name
      shutil.rmtree(out, ignore_errors=True)  # a build that failed half-way in another worker
      out.mkdir()
      result.write_text(json.dumps(build(out)))
  return json.loads(result.read_text())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A work directory after `python -m mixie.train --config=configs/demo.py:tiny` (with
  `TINY_RUN_OVERRIDES`) and `python -m mixie.evaluate` on it, each a subprocess on one CPU device.

  Returns `{"workdir": Path, "hf": Path, "overrides": dict}`; read-only for the tests that use it.
  """
  res = built_once(tmp_path_factory, "tiny_run", _build_tiny_run)
  return {"workdir": Path(res["workdir"]), "hf": Path(res["hf"]), "overrides": res["overrides"]}


def _build_tiny_run(tmp: Path) -> dict:
  hf = write_tiny_hf_llama(tmp / "hf")
  workdir = tmp / "workdir"
  over = {**TINY_RUN_OVERRIDES, "model.path": str(hf)}
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device in the subprocesses
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  for stage in ("mixie.train", "mixie.evaluate"):
    cmd = [sys.executable, "-m", stage, "--config=configs/demo.py:tiny", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in over.items()]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{stage} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
  return {"workdir": str(workdir), "hf": str(hf), "overrides": over}


# --- a tiny two-point sweep, killed between its points and resumed (sweep, compute and notebook tests) --

import hashlib  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402


def file_snapshot(root: Path) -> dict:
  """`{relative path: (mtime_ns, sha256)}` of every regular file under `root` (links not followed)."""
  out = {}
  for d, _, files in os.walk(root, followlinks=False):
    for name in files:
      p = Path(d) / name
      if not p.is_symlink():
        out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
  return out


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
  """`python -m mixie.sweep --config=configs/sweeps/tiny.py` (points `scratch`, then `seed`) on a tiny
  random HF Llama, SIGKILLed as soon as its first point is done, then run again to the end.

  Returns `{"dir": sweep dir, "hf": the base, "killed_output", "resumed_output", "before": snapshot of
  points/scratch and shared/ right after the kill, "after": the same after the resume}`.
  """
  res = built_once(tmp_path_factory, "tiny_sweep", _build_tiny_sweep)
  return {**res, "dir": Path(res["dir"]), "hf": Path(res["hf"])}


def _build_tiny_sweep(tmp: Path) -> dict:
  hf = write_tiny_hf_llama(tmp / "hf")
  sd = tmp / "sweep"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device in the subprocesses
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [sys.executable, "-m", "mixie.sweep", "--config=configs/sweeps/tiny.py", f"--workdir={sd}",
         f"--config.base.model.path={hf}"]
  p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  t0 = time.time()
  while p.poll() is None and not (sd / "points" / "scratch" / "done.json").exists():
    assert time.time() - t0 < 900, "the first point did not finish in time"
    time.sleep(0.05)
  assert p.poll() is None, "the sweep ended before it could be killed:\n" + p.stdout.read()
  p.send_signal(signal.SIGKILL)
  killed, _ = p.communicate(timeout=60)
  snap = lambda: {**{f"points/scratch/{k}": v for k, v in file_snapshot(sd / "points" / "scratch").items()},
                  **{f"shared/{k}": v for k, v in file_snapshot(sd / "shared").items()
                     if k.startswith("data-")}}
  before = snap()
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, f"the resumed sweep failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
  return {"dir": str(sd), "hf": str(hf), "killed_output": killed, "resumed_output": r.stdout + r.stderr,
          "before": before, "after": snap()}


# --- scheduling under pytest-xdist (`make test` runs `-n 2 --dist loadfile --no-loadscope-reorder`) ---

# The longest files first (each ~1-3 min on 2 cores), so that no long one starts last and runs alone.
LONGEST_FIRST = ("test_multiprocess.py", "test_sweep.py", "test_scale.py", "test_lifecycle.py",
                 "test_train_cli.py", "test_model_parity.py", "test_families.py", "test_analysis.py",
                 "test_train_step.py", "test_divergence.py")


def pytest_collection_modifyitems(config, items):
  """The longest files first (`--no-loadscope-reorder` keeps this order for xdist's workers)."""
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise kept

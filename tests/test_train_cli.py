"""`python -m mixie.train` end to end on a tiny random base: the table, SIGTERM, SIGKILL + resume (bit for
bit), and bad configs refused before anything is loaded or compiled."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs.demo import get_config
from mixie.errors import ConfigError
from mixie.store import ExpertStore
from run_utils import write_tiny_hf_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  """A tiny random Llama in HF format with the shipped SmolLM2 tokenizer (vocab 49152)."""
  return write_tiny_hf_llama(tmp_path_factory.mktemp("tiny_hf"))


def _args(hf, workdir, **over):
  kv = {"model.source": "hf", "model.path": str(hf), "cluster.embedder": "tfidf", "data.max_docs": 240,
        "cluster.k": 4, "train.slots": 2, "train.batch_per_slot": 2, "dataset.seq_len": 32,
        "train.tokens_per_expert": 640, "train.checkpoint_every": 1, "train.baselines": "()",
        "eval.max_docs": 24, "eval.prefix_tokens": "(8,16)", "mesh.shape": "(1,1,1)"}
  kv.update(over)
  return [sys.executable, "-m", "mixie.train", "--config=configs/demo.py:tiny", f"--workdir={workdir}"] + [
      f"--config.{k}={v}" for k, v in kv.items()]


def _env(tmp):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device in the subprocesses
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=str(ROOT))
  return env


def _latest(workdir, mode="experts"):
  d = Path(workdir) / "checkpoints" / mode
  steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.exists() else []
  return max(steps, default=-1)


def _start_and_signal(cmd, env, workdir, sig, after_step, timeout=300):
  """Starts the trainer, sends `sig` once a checkpoint newer than `after_step` exists; returns the result."""
  p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  t0 = time.time()
  while p.poll() is None and _latest(workdir) <= after_step:
    assert time.time() - t0 < timeout, "trainer did not checkpoint in time"
    time.sleep(0.02)
  assert p.poll() is None, "the run finished before it could be interrupted:\n" + p.stdout.read()
  p.send_signal(sig)
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out


def _store_bytes(workdir):
  s = ExpertStore(Path(workdir) / "experts")
  return {t: tuple((s.entry_dir(t) / f).read_bytes() for f in ("weights.safetensors", "meta.json"))
          for t in s.topics()}


@pytest.mark.slow
def test_main_job_sigterm_sigkill_resume_bit_for_bit(tiny_hf, tmp_path):
  env = _env(tmp_path)
  a, b = tmp_path / "a", tmp_path / "b"
  # A: uninterrupted, from nothing (the cluster stage runs first), with the all-data baseline and the table
  # (checkpoints only at the end: they do not change what is trained)
  r = subprocess.run(_args(tiny_hf, a, **{"train.baselines": "('lora_all',)", "train.checkpoint_every": 100}),
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  out = r.stdout + r.stderr
  assert "held-out perplexity" in out and "oracle" in out and "lora_all" in out
  table = json.loads((a / "eval" / "results.json").read_text())  # mixie.evaluate's table
  assert table["rows"] == ["base", "lora_all", "centroid", "knn", "topk", "oracle"] and table["docs"] > 0
  lines = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
  assert {l["mode"] for l in lines} == {"experts", "lora_all"} and all("experts" in l for l in lines)
  ref = _store_bytes(a)
  assert len(ref) == 4

  # B: same topics and dataset, interrupted twice (no table: A checked it, B checks the store)
  for sub in ("topics", "dataset"):
    shutil.copytree(a / sub, b / sub)
  no_eval = {"train.eval_after": False}
  code, out = _start_and_signal(_args(tiny_hf, b, **no_eval), env, b, signal.SIGTERM, after_step=1)
  assert code == 0, out
  assert "SIGTERM: saved a checkpoint" in out and "Traceback" not in out
  cut = _latest(b)
  assert cut >= 2
  code, out = _start_and_signal(_args(tiny_hf, b, **no_eval), env, b, signal.SIGKILL, after_step=cut + 1)
  assert code == -signal.SIGKILL
  r = subprocess.run(_args(tiny_hf, b, **no_eval, **{"train.checkpoint_every": 100}), cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "resumed from" in r.stdout + r.stderr
  assert _store_bytes(b) == ref
  steps = [json.loads(l)["step"] for l in (b / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(steps) and len(steps) == len(set(steps))  # reads as one uninterrupted run


# --- bad configs: refused before anything is loaded or compiled --------------------------------------


@pytest.fixture
def no_compute(monkeypatch):
  """Fails the test if the main job gets as far as loading the base or compiling a step."""
  import mixie.model.load
  import mixie.train.step

  def boom(*a, **k):
    raise AssertionError("got past config validation")

  monkeypatch.setattr(mixie.model.load, "load_base", boom)
  monkeypatch.setattr(mixie.train.step, "_compile_fns", boom)


def _cfg(tmp_path, **over):
  c = get_config("tiny")
  c.workdir = str(tmp_path / "w")
  c.mesh.shape = (4, 2, 1)
  c.train.slots = 4
  c.train.batch_per_slot = 2
  for k, v in over.items():
    sec, field = k.split(".")
    c[sec][field] = v
  return c


@pytest.mark.parametrize("over, field", [
    ({"train.slots": 6}, "train.slots=6 is not a multiple of the mesh's expert axis"),
    ({"train.batch_per_slot": 3}, "train.batch_per_slot=3"),
    ({"lora.rank": 0}, "lora.rank"),
    ({"lora.targets": ("q", "qkv_proj")}, "lora.targets"),
    ({"train.run_missing": False}, "train.run_missing=False"),
    ({"data.source": "jsonl", "data.path": "/nonexistent/corpus.jsonl"}, "data.path"),
    ({"train.mode": "moe"}, "train.mode"),
    ({"train.baselines": ("lora_al",)}, "train.baselines"),
    ({"train.lr": -1.0}, "train.lr"),
    ({"mesh.shape": (3, 1, 1)}, "mesh.shape"),
])
def test_bad_config_refused_before_compute(tmp_path, no_compute, over, field):
  from mixie.train.main import run
  with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
    run(_cfg(tmp_path, **over), log=lambda *_: None)


def test_cli_bad_config_one_clear_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "mixie.train", "--config=configs/demo.py:tiny",
                      f"--workdir={tmp_path}", "--config.lora.rank=0"], cwd=ROOT, env=_env(tmp_path),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert "mixie: error: lora.rank must be a positive integer" in r.stderr and "Traceback" not in r.stderr

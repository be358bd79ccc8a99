"""Real multi-process runs: `launch/local.py --processes 2 --devices-per-process 4` runs `mixie.train` (the
cluster stage, 8 experts in two waves of 4 slots, the evaluation) as one JAX multi-controller job with
gloo collectives, on the mesh expert 4 x data 2 that spans both processes (process 0 holds slots 0-1,
process 1 slots 2-3). Compared with one process holding all 8 devices on the same mesh and config.

What equals what: the clustered dataset, the topic assignment and every expert's weights are bit for
bit equal. The k-means centroids differ by at most a few f32 ulps (<= 1e-6): Lloyd's per-centroid
sums are all-reduced over the 8 devices of the `data` axis, through gloo across processes versus XLA's
in-process all-reduce, which add the partial sums in different orders. What is computed from the
centroids carries that difference: the centroid in each expert's metadata, and the topk row's mixture
weights (a softmax of router distances), so topk perplexities agree to 1e-6 relative; every other table
entry is exactly equal.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_RUN_OVERRIDES
from run_utils import write_tiny_hf_llama

from mixie.store import ExpertStore

LAUNCH = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2", "--devices-per-process", "4",
          "--grace", "3", "--"]
CENTROID_ATOL = 1e-6  # f32 k-means centroids: psum order (see the module docstring)
PPL_RTOL = 1e-6  # perplexities that depend on the centroids' values (topk weights)


def _env(**extra):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices: set per run below
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
  return env


def _train_cmd(workdir, over):
  return [sys.executable, "-m", "mixie.train", "--config=configs/demo.py:tiny", f"--workdir={workdir}"] + [
      f"--config.{k}={v}" for k, v in over.items()]


def _run(cmd, env, timeout=900):
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same tiny config run by 2 processes x 4 devices and by 1 process x 8 devices (same mesh)."""
  tmp = tmp_path_factory.mktemp("mp")
  hf = write_tiny_hf_llama(tmp / "hf")
  # 8 topics on 4 slots: two waves, so slots are refilled across processes too
  over = {**TINY_RUN_OVERRIDES, "model.path": str(hf), "mesh.shape": "(4,2,1)", "train.eval_after": True,
          "cluster.k": 8}
  mp, sp, wlog = tmp / "mp", tmp / "sp", tmp / "write_log"
  r = _run(LAUNCH + _train_cmd(mp, over), _env(MIXIE_WRITE_LOG=str(wlog)))
  assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
  r1 = _run(_train_cmd(sp, over), _env(JAX_NUM_CPU_DEVICES="8"))
  assert r1.returncode == 0, r1.stdout[-4000:] + r1.stderr[-4000:]
  return {"mp": mp, "sp": sp, "over": over, "write_log": wlog, "out": r.stdout}


def _files(d: Path) -> list[str]:
  return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def test_two_processes_span_the_mesh(runs):
  out = runs["out"]
  assert "mesh {'expert': 4, 'data': 2, 'model': 1}" in out
  # both processes ran the job and printed the same table
  tables = [[l[5:] for l in out.splitlines() if l.startswith(f"[p{i}] oracle")] for i in (0, 1)]
  assert tables[0] and tables[0] == tables[1]
  # the checkpoint was written collectively: each process wrote its own shards
  ckpt = runs["mp"] / "checkpoints" / "experts"
  assert any(ckpt.rglob("ocdbt.process_1")) and any(ckpt.rglob("ocdbt.process_0"))


def test_store_and_table_equal_one_process(runs):
  mp, sp = runs["mp"], runs["sp"]
  s_mp, s_sp = ExpertStore(mp / "experts"), ExpertStore(sp / "experts")
  topics = s_sp.topics()
  assert topics == s_mp.topics() and len(topics) == 8
  for t in topics:  # weights bit for bit
    assert s_mp.weights_file(t).read_bytes() == s_sp.weights_file(t).read_bytes(), t
    m_mp, m_sp = (s.meta(t).to_json() for s in (s_mp, s_sp))
    np.testing.assert_allclose(m_mp.pop("centroid"), m_sp.pop("centroid"), rtol=0, atol=CENTROID_ATOL)
    assert m_mp == m_sp  # tokens, losses, budgets, merged topics: exactly
  np.testing.assert_allclose(np.load(mp / "topics" / "centroids.npy"), np.load(sp / "topics" / "centroids.npy"),
                             rtol=0, atol=CENTROID_ATOL)
  for f in ("topics/assignment.npz", "topics/embeddings.npz", "dataset/index-train.npz",
            "dataset/index-heldout.npz"):
    a, b = np.load(mp / f), np.load(sp / f)
    assert all(np.array_equal(a[k], b[k]) for k in b.files), f
  r_mp, r_sp = (json.loads((d / "eval" / "results.json").read_text()) for d in (mp, sp))
  assert r_mp["rows"] == r_sp["rows"] and r_mp["docs"] == r_sp["docs"] and r_mp["docs"] > 0
  for p, tab in r_sp["by_prefix"].items():
    other = r_mp["by_prefix"][p]
    assert other["routing_accuracy"] == tab["routing_accuracy"] and other["tokens"] == tab["tokens"]
    for row, v in tab["ppl"].items():
      if row == "topk":
        assert other["ppl"][row] == pytest.approx(v, rel=PPL_RTOL)
      else:
        assert other["ppl"][row] == v, (p, row)
      for t, vt in tab["ppl_per_topic"][row].items():
        assert other["ppl_per_topic"][row][t] == pytest.approx(vt, rel=0 if row != "topk" else PPL_RTOL)


def test_only_process_zero_wrote(runs):
  mp, wlog = runs["mp"], runs["write_log"]
  assert not (wlog / "writes.p1.log").exists() or not (wlog / "writes.p1.log").read_text().strip()
  written = {Path(l).resolve() for l in (wlog / "writes.p0.log").read_text().splitlines()}
  tfds, tb = (mp / "dataset" / "tfds").resolve(), (mp / "tensorboard").resolve()
  assert tfds in written  # the TFDS shards (written by TFDS itself) were built by process 0
  libs = {tfds} | ({tb} if tb.exists() else set())  # folders a library fills: noted as one folder
  assert libs <= written
  unaccounted = []
  for rel in _files(mp):
    p = (mp / rel).resolve()
    if rel.startswith("checkpoints/") or libs & set(p.parents):
      continue  # orbax: every process writes its own shards (collective); TFDS, tensorboardX: folders
    if p not in written:
      unaccounted.append(rel)
  assert not unaccounted, f"files no write log accounts for: {unaccounted}"
  assert any("experts/blobs/" in str(p) for p in written) and any("experts/generations/" in str(p) for p in written)
  assert (mp / "eval" / "results.json").resolve() in written


def test_sigkill_one_process_then_resume(runs, tmp_path):
  """Process 1 dies by SIGKILL after step 14, in the second wave (the last checkpoint is step 12); the
  launcher stops process 0; both start again, resume from step 12 and write the same store as the
  uninterrupted run."""
  wd = tmp_path / "killed"
  wd.mkdir()
  for d in ("topics", "dataset"):  # the same topics: the training alone is under test
    shutil.copytree(runs["mp"] / d, wd / d)
  over = {**runs["over"], "train.checkpoint_every": 4, "train.eval_after": False, "train.keep_checkpoints": 1}
  r = _run(LAUNCH + _train_cmd(wd, over), _env(MIXIE_FAULT_KILL="1:14"))
  assert r.returncode == 128 + 9, r.stdout[-4000:]
  assert "process 1 failed (signal SIGKILL)" in r.stdout
  assert len(list((wd / "experts" / "staging").rglob("topic_*.json"))) == 4  # the first wave's, staged
  assert ExpertStore(wd / "experts").topics() == []  # nothing committed: the run did not finish
  assert sorted(p.name for p in (wd / "checkpoints" / "experts").iterdir() if p.name.isdigit()) == ["12"]
  r = _run(LAUNCH + _train_cmd(wd, over), _env())
  assert r.returncode == 0, r.stdout[-6000:]
  for i in (0, 1):
    assert any(l.startswith(f"[p{i}] mixie.train[experts]: resumed from") and l.endswith("at step 12")
               for l in r.stdout.splitlines()), r.stdout[-3000:]
  done, resumed = ExpertStore(runs["mp"] / "experts"), ExpertStore(wd / "experts")
  assert resumed.topics() == done.topics()
  for t in done.topics():  # the same bytes (content-addressed: the same hash) and the same metadata
    assert resumed.sha256(t) == done.sha256(t) and resumed.meta(t) == done.meta(t), t
    assert resumed.weights_file(t).read_bytes() == done.weights_file(t).read_bytes(), t


def test_export_and_generate_with_two_processes(runs, tmp_path):
  """The host-only export runs on process 0; generation runs on every process, process 0 prints."""
  wlog, out = tmp_path / "write_log", tmp_path / "export"
  stage = [sys.executable, "-m", "mixie.export", "--config=configs/demo.py:tiny", f"--workdir={runs['mp']}",
           f"--out={out}"] + [f"--config.{k}={v}" for k, v in runs["over"].items()]
  r = _run(LAUNCH + stage, _env(MIXIE_WRITE_LOG=str(wlog)))
  assert r.returncode == 0, r.stdout[-4000:]
  assert "[p0] mixie.export: 8 adapter(s)" in r.stdout and "[p1] mixie.export" not in r.stdout
  assert (out / "router.json").exists() and not (wlog / "writes.p1.log").exists()
  written = {Path(l).resolve() for l in (wlog / "writes.p0.log").read_text().splitlines()}
  assert {(out / f).resolve() for f in _files(out)} <= written
  gen = [sys.executable, "-m", "mixie.generate", "--config=configs/demo.py:tiny", f"--workdir={runs['mp']}",
         "--prompt=The history of", "--config.generate.max_new_tokens=4"] + [
             f"--config.{k}={v}" for k, v in runs["over"].items()]
  r = _run(LAUNCH + gen, _env(MIXIE_WRITE_LOG=str(wlog)))
  assert r.returncode == 0, r.stdout[-4000:]
  assert "[p0] === prompt 0 [expert" in r.stdout and "[p1] ===" not in r.stdout
  assert not (wlog / "writes.p1.log").exists()  # the router cache, if saved, came from process 0

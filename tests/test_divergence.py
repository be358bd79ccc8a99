"""Divergence: the rules on loss and gradient-norm histories, the loop naming a forced divergence, and
the main job exiting non-zero with the experts named in its log, `train_summary.json` and the evaluation
table."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from mixie.evaluate.tables import format_table
from mixie.train.divergence import DivergenceMonitor, DivergenceRule, load, record, table_marks
from mixie.train.loop import train_loop
from mixie.train.scheduler import ExpertScheduler
from mixie.train.step import base_shardings
from train_utils import RULES, TINY, SyntheticLoader, mesh, tiny_base, tiny_spec

ROOT = Path(__file__).resolve().parents[1]


def _judge(losses, grads, rule=DivergenceRule()):
  m = DivergenceMonitor(rule)
  for l, g in zip(losses, grads):
    m.observe(7, l, g)
  return m.finish(7)


def test_rules():
  ok = [1.0] * 10
  assert _judge([3.2, 3.0, 3.1, 2.9, 3.3, 2.8, 2.7, 3.0], ok) is None  # noisy, not rising
  why = _judge([3.0, 3.1, 2.9, 3.5, 6.0, 9.0, 10.5, 10.8], ok)  # start mean 3.0, end mean 10.1
  assert why.startswith("loss rose from 3.000 (mean of its first 3 steps) to 10.100")
  assert _judge([3.0, 3.9], ok) is None and _judge([3.0, 4.1], ok).startswith("loss rose")  # 1-step windows
  assert _judge([3.0], ok) is None  # one step: no loss verdict
  assert _judge([10.8] * 6, [0.5, 0.0, 0.0, 0.0, 0.1, 0.0]).startswith(
      "gradient norm exactly 0 for 3 consecutive steps")
  assert _judge([10.8] * 6, [0.0, 0.0, 0.1, 0.0, 0.0, 0.1]) is None  # never 3 in a row
  assert _judge([10.8] * 6, [0.0] * 6, DivergenceRule(zero_grad_steps=0)) is None  # off
  assert _judge([3.0, 9.0], ok, DivergenceRule(window=0)) is None  # off
  # the state is JSON and carries a half-seen expert over a resume
  m = DivergenceMonitor()
  for l in (3.0, 3.1, 2.9, 3.5):
    m.observe(1, l, 1.0)
  m2 = DivergenceMonitor()
  m2.restore(json.loads(json.dumps(m.state())))
  for l in (6.0, 9.0, 10.5, 10.8):
    m2.observe(1, l, 1.0)
  assert m2.finish(1) == why and m2.diverged == {1: why}


def test_table_and_results_name_diverged_experts(tmp_path):
  record(tmp_path, "experts", {2: "because"})
  record(tmp_path, "lora_all", {0: "also"})
  record(tmp_path, "lora_all", {})  # a later run of lora_all replaces its verdicts
  assert load(tmp_path) == [{"run": "experts", "expert": 2, "reason": "because"}]
  record(tmp_path, "lora_all", {0: "also"})
  tab = {"ppl": {r: 10.0 for r in ("base", "lora_all")}, "routing_accuracy": {"base": None, "lora_all": None},
         "ppl_per_topic": {r: {"0": 9.0, "1": 11.0} for r in ("base", "lora_all")},
         "tokens": 20, "tokens_per_topic": {"0": 10, "1": 10}, "docs_per_topic": {"0": 1, "1": 1}}
  results = {"prefix_tokens": [4], "rows": ["base", "lora_all"], "topics": [0, 1], "docs": 2,
             "expert_of_topic": {"0": 0, "1": 2}, "by_prefix": {"4": tab}, "diverged": load(tmp_path)}
  assert table_marks(results)[:2] == ({"lora_all"}, {"1"})
  text = format_table(results)
  assert "topic 1!" in text and "topic 0!" not in text and "\nlora_all!" in text and "\nbase " in text
  assert text.splitlines()[-1].startswith("! diverged in training (experts [2], lora_all;")
  assert "!" not in format_table({**results, "diverged": []})


def _loop(tmp, lr, clip):
  B, T = 2, 8
  spec = tiny_spec(2, lr=lr, clip=clip)
  m = mesh()
  base = jax.device_put(tiny_base(), base_shardings(spec, m, RULES))
  sched = ExpertScheduler({0: 10 * B * T, 1: 10 * B * T}, 2)
  return train_loop(spec, m, RULES, base, SyntheticLoader(2, B, T, TINY.vocab_size), sched,
                    ckpt_dir=tmp / "ckpt", store=None, fingerprint="fp", tokens_per_step=B * T,
                    checkpoint_every=100, progress=False)


def test_loop_names_a_forced_divergence(tmp_path):
  # (a normal loop run is not flagged: test_train_loop's scheduler test asserts it; the verdicts' trip
  # through a checkpoint: test_rules above and the main job's rerun below)
  # lr 1e3 without clipping: the logits collapse to uniform (loss ln 97), the gradients to exactly 0
  res = _loop(tmp_path, 1e3, 0.0)
  assert res.status == "finished" and sorted(res.diverged) == [0, 1]
  assert all(w.startswith("gradient norm exactly 0 for") and "final loss 4.575" in w
             for w in res.diverged.values())


@pytest.mark.slow
def test_main_job_forced_divergence_exits_non_zero(tiny_run, tmp_path):
  """A tiny run with lr 1e3 and no clipping: every expert named, exit 2; allowed, exit 0. And the
  session's normal tiny run was not flagged."""
  normal = tiny_run["workdir"]
  assert json.loads((normal / "train_summary.json").read_text())["diverged"] == []
  assert json.loads((normal / "eval" / "results.json").read_text())["diverged"] == []
  w = tmp_path / "w"
  for sub in ("topics", "dataset"):  # the same topics and dataset: no cluster stage
    shutil.copytree(normal / sub, w / sub)
  over = {**tiny_run["overrides"], "train.lr": 1000.0, "train.grad_clip": 0.0, "train.eval_after": True,
          "eval.prefix_tokens": "(4,)", "eval.max_docs": 8}
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)

  def run(**more):
    cmd = [sys.executable, "-m", "mixie.train", "--config=configs/demo.py:tiny", f"--workdir={w}"] + [
        f"--config.{k}={v}" for k, v in {**over, **more}.items()]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

  r = run()
  assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
  err = r.stderr.strip().splitlines()
  assert err[-1].startswith("mixie: error: 4 trained expert(s) diverged (expert 0, expert 1, expert 2, "
                            "expert 3;") and "train.allow_divergence=True" in err[-1]
  assert "Traceback" not in r.stderr
  for t in range(4):
    assert f"mixie.train[experts]: DIVERGED: expert of topic {t}: gradient norm exactly 0" in r.stdout
  summary = json.loads((w / "train_summary.json").read_text())
  assert summary["status"] == "diverged" and [d["expert"] for d in summary["diverged"]] == [0, 1, 2, 3]
  assert sorted(summary["runs"]["experts"]["diverged"]) == ["0", "1", "2", "3"]
  assert json.loads((w / "eval" / "results.json").read_text())["diverged"] == summary["diverged"]
  head = next(l for l in r.stdout.splitlines() if l.startswith("P=4"))
  marks = re.findall(r"topic \d+(!?)", head)  # every topic's expert diverged: every column marked
  assert marks and set(marks) == {"!"}
  assert "! diverged in training (experts [0, 1, 2, 3];" in r.stdout
  # allowed: the verdicts come back from the finished checkpoint, named, and the run exits 0
  r = run(**{"train.allow_divergence": True, "train.eval_after": False})
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "DIVERGED: expert of topic 3" in r.stdout
  summary = json.loads((w / "train_summary.json").read_text())
  assert summary["status"] == "finished" and len(summary["diverged"]) == 4

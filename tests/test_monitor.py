"""The monitor on synthetic request logs written through the serving log path (real router, real
records): late queries from another domain are flagged as drift, in those windows only; a log without
drift flags nothing; an expert that never serves although its training share predicts traffic is
flagged dead; the per-window shares equal a direct count; the CLI writes the summary and plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.common import base_config
from mixie.errors import ConfigError, MixieError
from mixie.monitor.summary import MonitorConfig, read_log, summarize, training_shares
from mixie.route.fallback import Policy, apply_fallback, fallback_expert
from mixie.route.router import Router, RouterConfig
from mixie.route.search import SearchConfig
from mixie.serve.request_log import RequestLog, request_records
from mixie.serve.server import Result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, K = 64, 8
HOUR = 3600.0
CFG = MonitorConfig(window_s=HOUR, reference_requests=200, min_window_requests=30)
POLICY = Policy("base", "margin", 0.75)  # ~15% of domain A queries fall below


def _domains(seed=0):
  """Topic centroids of domain A (dims 0..31) and a sampler of queries of domain A or B (dims 32..63)."""
  rng = np.random.default_rng(seed)
  cents = np.zeros((K, D), np.float32)
  cents[:, :32] = rng.normal(size=(K, 32))

  def queries(n, domain, topics=None):
    x = np.zeros((n, D), np.float32)
    if domain == "A":
      t = rng.integers(0, K, n) if topics is None else rng.choice(topics, n)
      x[:] = cents[t] / np.linalg.norm(cents[t], axis=1, keepdims=True)
    else:
      x[:, 32:] = rng.normal(size=(n, 32))
      x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x + 0.5 * rng.normal(size=(n, D)).astype(np.float32) / np.sqrt(D)

  return cents, queries


def _write_log(path, plan, seed=0):
  """Writes one record per request through `request_records`; `plan`: a list of (hours, per_hour,
  domain, topics) segments. Returns the records' margins and fallbacks, in order."""
  cents, queries = _domains(seed)
  router = Router(cents, RouterConfig(search=SearchConfig(backend="brute")))
  log = RequestLog(str(path))
  t, out = 1.7e9, []
  for hours, per_hour, domain, topics in plan:
    q = queries(int(hours * per_hour), domain, topics)
    for i in range(len(q)):
      routed = router.route(q[i:i + 1])
      b = POLICY.below(routed)
      served = apply_fallback(routed, b, fallback_expert("base")) if b.any() else routed
      res = [Result(tokens=[5, 6, 7], latency_ms={"load": 0.1, "prefill": 5.0, "decode": 15.0})]
      log.append(request_records(time_s=t, source="server", mode="centroid", prefixes=[[1, 2, 3]],
                                 routed=routed, served=served, below_n=b, policy=POLICY, results=res,
                                 token_counts=[12], route_ms=0.3))
      out.append((float(routed.margin[0]), bool(b[0])))
      t += HOUR / per_hour
  return out


def test_late_queries_from_another_domain_are_flagged_as_drift(tmp_path):
  path = tmp_path / "drift.jsonl"
  _write_log(path, [(6, 100, "A", None), (2, 100, "B", None)])
  records, bad = read_log(path)
  assert bad == 0 and len(records) == 800
  s = summarize(records, CFG, experts=range(K))
  drift = [f for f in s["flags"] if f["flag"] == "drift"]
  assert [round((f["window_start"] - records[0]["time"]) / HOUR) for f in drift] == [6, 7]
  for f in drift:
    assert f["ks"] >= CFG.drift_ks and f["p"] < CFG.drift_p and f["direction"] == "farther"
    assert f["distance_median"] > f["reference_distance_median"] + 0.3
    assert f["requests"] == 100 and "monitor.drift_ks" in f["rule"]
  assert [w["drift"] for w in s["windows"]] == [False] * 6 + [True] * 2
  assert all(w["ks"] < 0.25 for w in s["windows"][2:6])  # domain A windows after the reference
  assert s["windows"][0]["ks"] is None  # the first two hours are the reference itself
  assert not [f for f in s["flags"] if f["flag"] == "dead_expert"]


def test_a_log_without_drift_flags_nothing(tmp_path):
  path = tmp_path / "steady.jsonl"
  marks = _write_log(path, [(8, 100, "A", None)], seed=1)
  records, _ = read_log(path)
  s = summarize(records, CFG, experts=range(K), expected_share={e: 1 / K for e in range(K)})
  assert s["flags"] == [] and s["traffic"]["unused"] == []
  assert sum(w["ks"] is not None for w in s["windows"]) == 6  # tested, and passed
  # the low-confidence and fallback shares per window equal a direct count
  for w, i in zip(s["windows"], range(0, 800, 100)):
    low = [m < POLICY.threshold for m, _ in marks[i:i + 100]]
    assert w["low_confidence_share"] == pytest.approx(np.mean(low))
    assert w["fallback_share"] == pytest.approx(np.mean([fb for _, fb in marks[i:i + 100]]))
  assert 0 < s["traffic"]["fallback"]["base"] < 800
  served = sum(v["served"] for v in s["traffic"]["per_expert"].values())
  assert served + s["traffic"]["fallback"]["base"] == 800


def test_dead_expert_is_flagged_with_its_numbers(tmp_path):
  path = tmp_path / "dead.jsonl"
  _write_log(path, [(4, 100, "A", [0, 1, 2, 3, 4, 5])], seed=2)  # topics 6 and 7 never asked about
  records, _ = read_log(path)
  shares = {e: 0.124 for e in range(K - 1)} | {7: 0.002}  # expert 7: 0.8 requests expected
  s = summarize(records, CFG, experts=range(K), expected_share=shares)
  dead = [f for f in s["flags"] if f["flag"] == "dead_expert"]
  assert [f["expert"] for f in dead] == [6]
  assert dead[0]["served"] == 0 and dead[0]["expected"] == pytest.approx(400 * 0.124)
  assert dead[0]["training_share"] == 0.124 and dead[0]["requests_routed"] == 400
  assert s["traffic"]["unused"] == [6, 7]  # 7 is unused too, but silence there is no evidence
  assert not [f for f in s["flags"] if f["flag"] == "drift"]


def test_training_shares_and_reading_errors(tmp_path):
  shares = training_shares(np.asarray([0, 0, 1, -1, 2]), np.asarray([10, 10, 20, 60]))
  assert shares == {0: 0.2, 1: 0.2}  # expert 2 (imported, no documents) gets an equal share
  p = tmp_path / "log.jsonl"
  p.write_text('{"time": 1.0, "distance": 0.5}\nnot json\n{"no_time": 1}\n\n')
  records, bad = read_log(p)
  assert len(records) == 1 and bad == 2
  with pytest.raises(MixieError, match="request log not found"):
    read_log(tmp_path / "missing.jsonl")
  with pytest.raises(MixieError, match="no request records"):
    summarize([], CFG)
  c = base_config()
  assert MonitorConfig.from_config(c) == MonitorConfig()
  c.monitor.window_s = 0
  with pytest.raises(ConfigError, match="monitor.window_s"):
    MonitorConfig.from_config(c)


def test_cli_writes_summary_and_plot_and_prints_flags(tmp_path):
  log = tmp_path / "requests.jsonl"
  _write_log(log, [(3, 100, "A", None), (1, 100, "B", None)])
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "mixie.monitor", "--config=configs/demo.py:tiny", f"--workdir={tmp_path}"]
  p = subprocess.run(cmd + [f"--log={log}"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stderr
  assert "FLAG drift" in p.stdout and "ks=" in p.stdout
  summary = json.loads((tmp_path / "monitor" / "summary.json").read_text())
  assert summary["records"] == 400 and [f["flag"] for f in summary["flags"]] == ["drift"]
  png = (tmp_path / "monitor" / "monitor.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert p.stderr.strip().endswith("request log not found (serve.log_path; is logging on?)")

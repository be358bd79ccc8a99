"""The monitor of a run: reads its request log, its router's experts and their training shares, and
writes `workdir/monitor/summary.json` and `workdir/monitor/monitor.png`."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mixie import io as mio
from mixie.cluster.topics import load_topics, topics_complete
from mixie.errors import ConfigError, check
from mixie.monitor.plot import NAME, plot_monitor
from mixie.monitor.summary import MonitorConfig, read_log, summarize, training_shares
from mixie.route.router import ROUTER_NPZ
from mixie.route.run import router_dir
from mixie.serve.request_log import log_path

SUMMARY_JSON = "summary.json"
PLOT_PNG = f"{NAME}.png"


def monitor_dir(workdir):
  """Where the monitor writes under `workdir`."""
  return mio.path(workdir) / "monitor"


def run_experts(workdir) -> tuple[list[int], dict[int, float]]:
  """The experts the run's router chooses among and each one's share of the training documents
  (empty when the run has no router yet)."""
  npz = router_dir(workdir) / ROUTER_NPZ
  if not npz.exists():
    return [], {}
  eot = mio.load_arrays(npz)["expert_of_topic"]
  if not topics_complete(workdir):  # a store-only run (imported experts): no training documents
    return sorted({int(e) for e in eot if e >= 0}), {}
  topics = load_topics(workdir)
  counts = np.bincount(topics.topic_n[~topics.heldout_n], minlength=topics.num_topics)
  return sorted({int(e) for e in eot if e >= 0}), training_shares(eot, counts)


def run_monitor(config, log_file: str | None = None) -> dict[str, Any]:
  """Summarises the run's request log (`log_file`, else `monitor.log_path`, else `serve.log_path`)
  and writes the summary and plot; returns the summary."""
  cfg = MonitorConfig.from_config(config)
  path = log_file or str(config.monitor.log_path) or log_path(config)
  check(bool(path), "no request log: set serve.log_path (or monitor.log_path, or pass --log)",
        ConfigError)
  records, bad = read_log(path)
  experts, shares = run_experts(config.workdir)
  summary = summarize(records, cfg, experts=experts, expected_share=shares, bad_lines=bad, log=path)
  out = monitor_dir(config.workdir)
  plot_monitor(summary, save_dir=out)
  mio.atomic_write_json(out / SUMMARY_JSON, mio.json_safe(summary))
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """A few lines for the terminal: totals, unused experts and every flag with its numbers."""
  tr = summary["traffic"]
  lines = [f"{summary['records']} requests ({summary['bad_lines']} unreadable lines, "
           f"{summary['errors']} failed), {len(summary['windows'])} windows of "
           f"{summary['settings']['window_s']:g}s; fallback served {tr['fallback'] or 'none'}; "
           f"unused experts: {tr['unused'] or 'none'}"]
  lines += [f"note: {n}" for n in summary["notes"]]
  for f in summary["flags"]:
    nums = ", ".join(f"{k}={_utc(v)}" if k.startswith("window_") else
                     f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in f.items()
                     if k not in ("flag", "rule"))
    lines.append(f"FLAG {f['flag']}: {nums} [{f['rule']}]")
  if not summary["flags"]:
    lines.append("no flags")
  return "\n".join(lines)


def _utc(t: float) -> str:
  """Unix seconds as `YYYY-mm-ddTHH:MM:SSZ`."""
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

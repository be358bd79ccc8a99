"""The monitor's PNG: traffic per expert, low-confidence share per window, drift per window."""

from __future__ import annotations

from typing import Any

import numpy as np

from mixie import figures

NAME = "monitor"  # the figure's file name: <save_dir>/monitor.png


def plot_monitor(summary: dict[str, Any], *, save_dir=None):
  """The figure of a `mixie.monitor.summary.summarize` result: requests served per expert with their
  expected count (dead experts marked), the low-confidence and fallback shares per window, and each
  window's median nearest-centroid distance and KS distance to the reference (drift windows red);
  written as `<save_dir>/monitor.png` when given."""
  fig = figures.new_figure(15, 4.5)
  ax1, ax2, ax3 = fig.subplots(1, 3)
  per = summary["traffic"]["per_expert"]
  dead = {f["expert"] for f in summary["flags"] if f["flag"] == "dead_expert"}
  names = list(per)
  x = np.arange(len(names))
  ax1.bar(x, [per[e]["served"] for e in names],
          color=["tab:red" if int(e) in dead else "tab:blue" for e in names], label="served")
  ax1.plot(x, [per[e]["expected"] for e in names], "k_", ms=12, label="expected (training share)")
  dead_x = [i for i, e in enumerate(names) if int(e) in dead]
  ax1.plot(dead_x, [0] * len(dead_x), "rx", ms=10, mew=2, label="dead (flagged)")
  ax1.set_xticks(x, names, fontsize=7, rotation=90 if len(names) > 24 else 0)
  ax1.set_xlabel("expert (red: flagged dead)")
  ax1.set_ylabel("requests")
  ax1.set_title(f"traffic ({summary['records']} requests)")
  ax1.legend(fontsize=8)

  rows = summary["windows"]
  t0 = summary["time"]["first"]
  hours = [(r["start"] - t0) / 3600.0 for r in rows]
  nan = lambda v: np.nan if v is None else v  # noqa: E731
  ax2.plot(hours, [nan(r["low_confidence_share"]) for r in rows], "o-", label="confidence < threshold")
  ax2.plot(hours, [nan(r["fallback_share"]) for r in rows], "s--", label="served by a fallback")
  ax2.set_xlabel("window start (hours after the first request)")
  ax2.set_ylabel("share of requests")
  ax2.set_ylim(-0.02, 1.02)
  ax2.set_title("low-confidence queries per window")
  ax2.legend(fontsize=8)

  ref = summary["reference"]["distance_median"]
  ax3.plot(hours, [nan(r["distance_median"]) for r in rows], "o-",
           label="median nearest-centroid distance")
  if ref is not None:
    ax3.axhline(ref, color="gray", ls=":", label="reference median")
  drift = [h for h, r in zip(hours, rows) if r["drift"]]
  for h in drift:
    ax3.axvspan(h, h + summary["settings"]["window_s"] / 3600.0, color="tab:red", alpha=0.15)
  ax3b = ax3.twinx()
  ax3b.plot(hours, [nan(r["ks"]) for r in rows], "x:", color="tab:purple", label="KS distance")
  ax3b.axhline(summary["settings"]["drift_ks"], color="tab:purple", ls="--", lw=0.8)
  ax3b.set_ylim(0, 1)
  ax3b.set_ylabel("KS distance to the reference")
  ax3.set_xlabel("window start (hours after the first request)")
  ax3.set_ylabel("distance")
  ax3.set_title("drift against the training centroids (red: flagged)")
  ax3.legend(fontsize=8, loc="upper left")
  if save_dir is not None:
    figures.save_figure(fig, save_dir, NAME, dpi=100)
  return fig

"""What a sweep's table says about the question mixie exists for, as numbers: do routed experts beat one
LoRA on all the data, at equal training tokens and at equal FLOPs, at which budget, how far routing
trails the oracle, and what branching from a seed changes.

`findings(table)` (a table of `mixie.sweep.report`) returns, at one routing prefix P:

    points     per point: its settings, each row's perplexity, and the gaps below
    crossover  the smallest tokens per expert at which the routed row is no worse than lora_all (None)
    compass    whether some point has routed <= 0.98 x lora_all, and whether routed stays within 2% of
               the oracle at every point (the issue's orientation marks; nothing is tuned toward them)
    seed       per budget with both a scratch and a seed-branched point: seed / scratch - 1 (routed)

Gaps are ratios minus one (positive: the first row is worse): `vs_lora_all` at equal tokens (the rows of
one point train on the same tokens); `vs_lora_all_flops`, the routed row against lora_all's curve over
the sweep's points interpolated (log-log) at the routed row's own FLOPs, where that lies inside the
curve; `vs_lora_all_ci`, the 95% interval of `vs_lora_all` over the held-out documents (from the
table); `vs_oracle`, routing's own cost; `vs_full`, against full continued pre-training at equal tokens
(6N per token: about 1.4x the routed row's FLOPs), and `vs_full_flops` on its curve at equal FLOPs.
`lora_all_equivalent_tokens` reads lora_all's curve the other way: the training tokens at which lora_all
reaches the routed row's perplexity (log-log, inside the curve, None elsewhere), and `token_efficiency`
is that over the routed row's own tokens (1 = as good a use of a token as lora_all; 0.5 = lora_all gets
there on half the tokens).
"""

from __future__ import annotations

from typing import Any

import numpy as np

COMPASS_RATIO, COMPASS_ORACLE = 0.98, 0.02  # routed <= 0.98 x lora_all; routed within 2% of oracle


def _by_point(table: dict[str, Any], prefix: int) -> dict[str, dict[str, dict]]:
  out: dict[str, dict[str, dict]] = {}
  for r in table["rows"]:
    if r["prefix"] == prefix:
      out.setdefault(r["point"], {})[r["row"]] = r
  return out


def common_prefix(table: dict[str, Any]) -> int:
  """The largest P every point of the table was evaluated at."""
  per: dict[str, set] = {}
  for r in table["rows"]:
    per.setdefault(r["point"], set()).add(r["prefix"])
  common = set.intersection(*per.values()) if per else set()
  return max(common) if common else max(r["prefix"] for r in table["rows"])


def _gap(a, b):
  return None if a is None or b is None else a / b - 1.0


def _curve_at(points: list[tuple[float, float]], x: float) -> float | None:
  """The log-log interpolation of `(x, y)` points at `x`; None outside their range."""
  pts = sorted((p for p in points if p[0] and p[1]), key=lambda p: p[0])
  if len(pts) < 1 or not pts[0][0] <= x <= pts[-1][0]:
    return None
  if len(pts) == 1:
    return pts[0][1]
  lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.exp(np.interp(np.log(x), lx, ly)))


def _tokens_for(points: list[tuple[float, float]], y: float) -> float | None:
  """The x at which the log-log curve through `(x, y)` points, y falling as x grows, reaches `y`;
  None outside the curve or where it does not fall everywhere."""
  pts = sorted((p for p in points if p[0] and p[1]), key=lambda p: p[0])
  ys = [p[1] for p in pts]
  if len(pts) < 2 or any(b >= a for a, b in zip(ys, ys[1:])):
    return None
  return _curve_at([(py, px) for px, py in pts], y)  # a falling curve read the other way


def findings(table: dict[str, Any], *, prefix: int | None = None, routed: str = "centroid") -> dict[str, Any]:
  """The answers of a sweep table at P = `prefix` (default: the largest P of every point) for the routed
  row `routed` (see the module docstring)."""
  p = int(prefix) if prefix else common_prefix(table)
  pts = _by_point(table, p)
  curve = {row: [(g[row]["flops"], g[row]["ppl"]) for g in pts.values() if row in g] for row in ("lora_all", "full")}
  by_tokens = [(g["lora_all"]["tokens"], g["lora_all"]["ppl"]) for g in pts.values() if "lora_all" in g]
  out_points = []
  for name, g in pts.items():
    first = next(iter(g.values()))
    ppl = {row: r["ppl"] for row, r in g.items()}
    mine = g.get(routed)
    rec = {"point": name, "tokens_per_expert": first.get("tokens_per_expert"), "init": first.get("init"),
           "seed_fraction": first.get("seed_fraction"), "k": first.get("k"), "rank": first.get("rank"),
           "ppl": ppl, "tokens": {row: r["tokens"] for row, r in g.items()},
           "flops": {row: r["flops"] for row, r in g.items()},
           "routing_accuracy": None if mine is None else mine["routing_accuracy"]}
    if mine is not None:
      at = {row: _curve_at(c, mine["flops"]) if mine["flops"] else None for row, c in curve.items()}
      rec.update(vs_lora_all=_gap(mine["ppl"], ppl.get("lora_all")), vs_lora_all_ci=mine.get("vs_lora_all_ci"),
                 vs_lora_all_flops=_gap(mine["ppl"], at["lora_all"]),
                 vs_oracle=_gap(mine["ppl"], ppl.get("oracle")), vs_full=_gap(mine["ppl"], ppl.get("full")),
                 vs_full_flops=_gap(mine["ppl"], at["full"]),
                 vs_lora_all_wide=_gap(mine["ppl"], ppl.get("lora_all_wide")))
      equiv = _tokens_for(by_tokens, mine["ppl"])
      rec.update(lora_all_equivalent_tokens=equiv,
                 token_efficiency=None if equiv is None or not mine["tokens"] else equiv / mine["tokens"])
    out_points.append(rec)
  out_points.sort(key=lambda r: (r["tokens_per_expert"] or 0, str(r["init"]), r["point"]))
  scratch = [r for r in out_points if r["init"] in (None, "scratch") and r.get("vs_lora_all") is not None]
  wins = [r["tokens_per_expert"] for r in scratch if r["vs_lora_all"] <= 0]
  oracle = [r["vs_oracle"] for r in out_points if r.get("vs_oracle") is not None]
  seeds = {}
  for r in out_points:
    if r["init"] == "seed" and routed in r["ppl"]:
      twin = [s for s in scratch if s["tokens_per_expert"] == r["tokens_per_expert"] and s["k"] == r["k"]
              and s["rank"] == r["rank"]]
      if twin:
        seeds[r["point"]] = _gap(r["ppl"][routed], twin[0]["ppl"][routed])
  return {
      "prefix": p, "routed": routed, "points": out_points,
      "crossover": min(wins) if wins else None,
      "compass": {"routed_le_098_lora_all": any(r["vs_lora_all"] <= COMPASS_RATIO - 1 for r in scratch),
                  "routed_within_2pct_of_oracle": bool(oracle) and max(oracle) <= COMPASS_ORACLE},
      "seed": seeds,
  }


def _pct(v) -> str:
  return "-" if v is None else f"{100 * v:+.1f}%"


def _ci(r) -> str:
  ci = r.get("vs_lora_all_ci")
  return "" if not ci else f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def _equiv(r) -> str:
  t, e = r.get("lora_all_equivalent_tokens"), r.get("token_efficiency")
  return "-" if t is None else f"{t:,.0f} ({e:.2f}x)"


def markdown(f: dict[str, Any]) -> str:
  """The findings as a Markdown section (one line per point, then the answers)."""
  lines = [f"## Findings at P = {f['prefix']} ({f['routed']} routing)", "",
           "| point | tok/expert | init | routed | lora_all | oracle | full | vs lora_all (tokens) | "
           "vs lora_all (FLOPs) | vs oracle | vs full (tokens) | vs full (FLOPs) | routing acc. | "
           "lora_all's tokens for the routed ppl (x the routed row's) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in f["points"]:
    ppl = r["ppl"]
    cell = lambda k: "-" if ppl.get(k) is None else f"{ppl[k]:.3f}"  # noqa: E731
    acc = "-" if r["routing_accuracy"] is None else f"{r['routing_accuracy']:.3f}"
    lines.append(f"| {r['point']} | {r['tokens_per_expert']} | {r['init']} | {cell(f['routed'])} | "
                 f"{cell('lora_all')} | {cell('oracle')} | {cell('full')} | {_pct(r.get('vs_lora_all'))}{_ci(r)} | "
                 f"{_pct(r.get('vs_lora_all_flops'))} | {_pct(r.get('vs_oracle'))} | {_pct(r.get('vs_full'))} | "
                 f"{_pct(r.get('vs_full_flops'))} | {acc} | {_equiv(r)} |")
  c = f["compass"]
  cross = "none in the sweep" if f["crossover"] is None else f"{f['crossover']} tokens per expert"
  lines += ["", f"- crossover (routed no worse than lora_all at equal tokens): {cross}",
            f"- routed <= {COMPASS_RATIO} x lora_all at some point: {'yes' if c['routed_le_098_lora_all'] else 'no'}; "
            f"routed within {100 * COMPASS_ORACLE:.0f}% of the oracle everywhere: "
            f"{'yes' if c['routed_within_2pct_of_oracle'] else 'no'}"]
  if f["seed"]:
    lines.append("- seed-branched vs scratch (routed): " + ", ".join(f"{k} {_pct(v)}" for k, v in f["seed"].items()))
  return "\n".join(lines) + "\n"

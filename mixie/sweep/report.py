"""A sweep's combined table and plots, and their loaders (notebooks read them as `mixie.analysis.sweeps`).

The table has one row per (point, routing prefix P, evaluation row), read from each point's
`eval/results.json` and `point.json`:

    point, series, x     the point, its line label (the sweep's `series` fields) and the swept value
    prefix, row          P and the evaluation row (base, lora_all, lora_all_wide, full, centroid, ...)
    ppl, routing_accuracy   held-out perplexity after P; top-1 routing accuracy (routed rows)
    tokens, flops        the row's training tokens and FLOPs (`mixie.compute`)
    train_loss           the loss at the end of the row's training run (the experts' pooled for routed
                         rows; `mixie.train.metrics.final_loss`): new data every step, so the number to
                         choose hyper-parameters by, where held-out perplexity must not be. It is each
                         run's own training mix: the experts weigh every topic by its budget, lora_all
                         by its size, so compare it within a row (across lrs), not across rows
    vs_lora_all_ci       the 95% interval of ppl / ppl(lora_all) - 1 over the held-out documents (a
                         paired bootstrap of `eval/per_doc.npz`, fixed seed; None without that file)
    k, rank, tokens_per_expert, init, seed_fraction, lr, slots, docs   the point's settings and documents

Written to `<sweep dir>/reports/<name>/`: `table.json`, `table.md` (a perplexity pivot, the long table
and the findings of `mixie.sweep.findings`), `findings.json`, and PNG plots: perplexity against training tokens and FLOPs (one line per row and series), against
the swept setting (k, rank, ...) when it is not P, and perplexity and routing accuracy against P when
the points were evaluated at several P.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from mixie import io as mio
from mixie.compute import format_flops
from mixie.errors import MixieError
from mixie.figures import new_figure, save_figure
from mixie.sweep import findings as fnd
from mixie.train.metrics import final_loss, read_curves

TABLE_JSON, TABLE_MD, FINDINGS_JSON = "table.json", "table.md", "findings.json"
BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED = 2000, 0
PREFIX_FIELD = "eval.prefix_tokens"
SETTINGS = {"k": "cluster.k", "rank": "lora.rank", "tokens_per_expert": "train.tokens_per_expert",
            "init": "train.init", "seed_fraction": "train.seed_fraction", "lr": "train.lr",
            "slots": "train.slots"}
# the training run behind each evaluation row (routed and oracle rows: the experts)
RUN_OF_ROW = {"lora_all": "lora_all", "lora_all_wide": "lora_all_wide", "full": "full", "centroid": "experts",
              "knn": "experts", "topk": "experts", "oracle": "experts"}


def report_dir(sweep_dir, name: str):
  """Where the report of sweep `name` goes."""
  return mio.path(sweep_dir) / "reports" / name


# ---------------------------------------------------------------------------------------------------
# The table.


def _label(fields: Sequence[str], settings: dict) -> str:
  return ", ".join(f"{f.split('.')[-1]}={settings.get(f)}" for f in fields)


def paired_gap_ci(nll_a: np.ndarray, tok_a: np.ndarray, nll_b: np.ndarray, tok_b: np.ndarray, *,
                  samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95):
  """The `level` interval of ppl_a / ppl_b - 1 (token-weighted perplexities of two rows scored on the
  same documents: per-document summed NLLs `nll_*` over `tok_*` tokens) under a paired bootstrap that
  resamples documents, `[lo, hi]`."""
  n = len(nll_a)
  idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
  log_ratio = nll_a[idx].sum(1) / tok_a[idx].sum(1) - nll_b[idx].sum(1) / tok_b[idx].sum(1)
  lo, hi = np.quantile(np.expm1(log_ratio), [(1 - level) / 2, (1 + level) / 2])
  return [float(lo), float(hi)]


def _gap_cis(wd, res) -> dict[tuple[int, str], list[float]]:
  """`{(P, row): vs_lora_all_ci}` from the point's `eval/per_doc.npz` (empty without it or lora_all)."""
  path = wd / "eval" / "per_doc.npz"
  if not path.exists() or "lora_all" not in res["rows"]:
    return {}
  with np.load(path) as d:
    per = {k: d[k].astype(np.float64) for k in d.files if k.endswith((".nll", ".tokens"))}
  out = {}
  for p in res["prefix_tokens"]:
    ref = (per.get(f"p{p}.lora_all.nll"), per.get(f"p{p}.lora_all.tokens"))
    for row in res["rows"]:
      mine = (per.get(f"p{p}.{row}.nll"), per.get(f"p{p}.{row}.tokens"))
      if row != "lora_all" and all(a is not None for a in (*ref, *mine)):
        out[(int(p), row)] = paired_gap_ci(*mine, *ref)
  return out


def point_rows(sweep_dir, name: str, *, x: str = "", series: Sequence[str] = ()) -> list[dict[str, Any]]:
  """The table rows of one finished point of a sweep directory."""
  wd = mio.path(sweep_dir) / "points" / name
  rec = mio.read_json(wd / "point.json")
  res = mio.read_json(wd / "eval" / "results.json")
  settings = {**rec.get("settings", {}), **rec.get("overrides", {})}
  experts = {int(e) for e in res.get("expert_of_topic", {}).values() if int(e) >= 0}
  curves = read_curves((wd.parent / rec["owner"] if rec.get("owner") else wd) / "metrics.jsonl") or {}
  end_loss = {mode: final_loss(c) for mode, c in curves.items()}
  cis = _gap_cis(wd, res)
  base = {"point": name, "series": _label(series, settings), "docs": res["docs"],
          **{k: settings.get(f) for k, f in SETTINGS.items()}, "k": len(experts) or settings.get("cluster.k"),
          "rank": res.get("lora", {}).get("rank", settings.get("lora.rank"))}
  out = []
  for p in res["prefix_tokens"]:
    tab = res["by_prefix"][str(p)]
    for row in res["rows"]:
      c = res.get("compute", {}).get(row, {})
      out.append({**base, "x": p if x == PREFIX_FIELD else settings.get(x), "prefix": int(p), "row": row,
                  "ppl": tab["ppl"][row], "routing_accuracy": tab["routing_accuracy"].get(row),
                  "tokens": c.get("tokens"), "flops": c.get("flops"),
                  "train_loss": end_loss.get(RUN_OF_ROW.get(row, "")), "vs_lora_all_ci": cis.get((int(p), row))})
  return out


def build_table(sweep_dir, sweep, points: Sequence[str] | None = None) -> dict[str, Any]:
  """The combined table of the sweep's points (all of `sweep.points`, or the names given)."""
  names = list(points) if points is not None else [p[0] for p in sweep.points]
  x, series = str(sweep.get("x", "")), tuple(sweep.get("series", ()))
  rows = [r for n in names for r in point_rows(sweep_dir, n, x=x, series=series)]
  return {"name": sweep.name, "sweep_dir": str(sweep_dir), "x": x, "series": list(series),
          "plot_prefix": int(sweep.get("plot_prefix", 0)) or None, "points": names, "rows": rows,
          "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def load_table(sweep_dir, name: str = "") -> dict[str, Any]:
  """The table written by a sweep (`name` "" = the only report in the directory)."""
  d = mio.path(sweep_dir) / "reports"
  if not name:
    names = sorted(p.name for p in d.iterdir()) if d.exists() else []
    if len(names) != 1:
      raise MixieError(f"{d}: name one of the sweeps reported there: {names}")
    name = names[0]
  return mio.read_json(report_dir(sweep_dir, name) / TABLE_JSON)


def _fmt(v, spec=".3f") -> str:
  if v is None:
    return "-"
  return format(v, spec) if isinstance(v, float) else str(v)


def markdown(table: dict[str, Any]) -> str:
  """The table as Markdown: a perplexity pivot (one line per point and P) and the long table."""
  rows = table["rows"]
  names = list(dict.fromkeys(r["row"] for r in rows))
  routed = [n for n in names if any(r["routing_accuracy"] is not None and r["row"] == n for r in rows)
            and n != "oracle"]
  head = ["point", "series", "x", "P", *names, *[f"acc ({n})" for n in routed]]
  lines = [f"# sweep {table['name']}", "", f"x = `{table['x'] or '-'}`; created {table['created']}", "",
           "Held-out perplexity after the first P tokens:", "",
           "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  groups: dict[tuple, dict[str, dict]] = {}
  for r in rows:
    groups.setdefault((r["point"], r["prefix"]), {})[r["row"]] = r
  for (point, p), g in groups.items():
    first = next(iter(g.values()))
    cells = [point, first["series"] or "-", _fmt(first["x"]), str(p)]
    cells += [_fmt(g[n]["ppl"]) if n in g else "" for n in names]
    cells += [_fmt(g[n]["routing_accuracy"]) if n in g else "" for n in routed]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Every row with its training compute (`mixie.compute`) and the loss at the end of its "
            "training (new data every step: what to choose hyper-parameters by):", "",
            "| point | P | row | ppl | routing acc. | train tokens | train FLOPs | end train loss |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['point']} | {r['prefix']} | {r['row']} | {_fmt(r['ppl'])} | "
                 f"{_fmt(r['routing_accuracy'])} | {_fmt(r['tokens'])} | {format_flops(r['flops'])} | "
                 f"{_fmt(r.get('train_loss'), '.4f')} |")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Plots (each returns a matplotlib Figure; `save_dir` also writes it as PNG).


def _save(fig, save_dir, name):
  if save_dir is not None:
    save_figure(fig, save_dir, name)
  return fig


def _prefix(table, prefix: int | None) -> int:
  """The P of the plots: `prefix`, the table's `plot_prefix`, or the largest P every point has."""
  if prefix:
    return int(prefix)
  if table.get("plot_prefix"):
    return int(table["plot_prefix"])
  per_point: dict[str, set] = {}
  for r in table["rows"]:
    per_point.setdefault(r["point"], set()).add(r["prefix"])
  common = set.intersection(*per_point.values()) if per_point else set()
  return max(common) if common else max(r["prefix"] for r in table["rows"])


def _lines(rows, key, x_of) -> dict[str, list[tuple]]:
  """`{line label: [(x, y), ...] sorted by x}`: one line per (row, series)."""
  multi = len({r["series"] for r in rows}) > 1
  out: dict[str, list] = {}
  for r in rows:
    x, y = x_of(r), r[key]
    if x is None or y is None:
      continue
    label = f"{r['row']} ({r['series']})" if multi and r["series"] else r["row"]
    out.setdefault(label, []).append((x, y))
  return {k: sorted(v) for k, v in out.items()}


def plot_vs_compute(table: dict[str, Any], *, by: str = "tokens", prefix: int | None = None, save_dir=None):
  """Perplexity (at P) against each row's training tokens or FLOPs (`by`); the base is a dashed line."""
  p = _prefix(table, prefix)
  rows = [r for r in table["rows"] if r["prefix"] == p]
  fig = new_figure(7.5, 4.8)
  ax = fig.add_subplot()
  base = [r["ppl"] for r in rows if r["row"] == "base"]
  if base:
    ax.axhline(float(np.mean(base)), color="gray", ls="--", lw=1, label="base (0 tokens)")
  for label, pts in _lines([r for r in rows if r["row"] != "base"], "ppl", lambda r: r[by] or None).items():
    ax.plot(*zip(*pts), marker="o", label=label)
  ax.set_xscale("log")
  ax.set_xlabel(f"training {'tokens' if by == 'tokens' else 'FLOPs'} of the row")
  ax.set_ylabel(f"held-out perplexity after P={p}")
  ax.set_title(f"sweep {table['name']}: perplexity against training {by}")
  ax.legend(fontsize=8)
  return _save(fig, save_dir, f"ppl_vs_{by}")


def plot_vs_setting(table: dict[str, Any], setting: str, *, prefix: int | None = None, save_dir=None):
  """Perplexity (at P) against a point setting (`k`, `rank`, `tokens_per_expert`, ...)."""
  p = _prefix(table, prefix)
  rows = [r for r in table["rows"] if r["prefix"] == p]
  fig = new_figure(7.5, 4.8)
  ax = fig.add_subplot()
  for label, pts in _lines(rows, "ppl", lambda r: r.get(setting)).items():
    ax.plot(*zip(*pts), marker="o", ls="--" if label.startswith("base") else "-", label=label)
  ax.set_xticks(sorted({r.get(setting) for r in rows if r.get(setting) is not None}))
  ax.set_xlabel(setting)
  ax.set_ylabel(f"held-out perplexity after P={p}")
  ax.set_title(f"sweep {table['name']}: perplexity against {setting}")
  ax.legend(fontsize=8)
  return _save(fig, save_dir, f"ppl_vs_{setting}")


def plot_vs_prefix(table: dict[str, Any], *, metric: str = "ppl", save_dir=None):
  """Perplexity (`metric="ppl"`) or routing accuracy (`"routing_accuracy"`, routed rows; the oracle's
  is 1 by definition) against P, one line per row (and point, when there are several)."""
  rows = [r for r in table["rows"] if r[metric] is not None and not (metric != "ppl" and r["row"] == "oracle")]
  multi = len({r["point"] for r in rows}) > 1
  fig = new_figure(7.5, 4.8)
  ax = fig.add_subplot()
  lines: dict[str, list] = {}
  for r in rows:
    lines.setdefault(f"{r['row']} ({r['point']})" if multi else r["row"], []).append((r["prefix"], r[metric]))
  for label, pts in lines.items():
    ax.plot(*zip(*sorted(pts)), marker="o", label=label)
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted({r["prefix"] for r in rows}), [str(v) for v in sorted({r["prefix"] for r in rows})])
  ax.set_xlabel("routing prefix P (tokens)")
  ax.set_ylabel("held-out perplexity after P" if metric == "ppl" else "top-1 routing accuracy")
  ax.set_title(f"sweep {table['name']}: {'perplexity' if metric == 'ppl' else 'routing accuracy'} against P")
  ax.legend(fontsize=8)
  return _save(fig, save_dir, "ppl_vs_prefix" if metric == "ppl" else "routing_vs_prefix")


def swept_setting(table: dict[str, Any]) -> str | None:
  """The table column of the sweep's `x` (k, rank, tokens_per_expert, init, seed_fraction) when it takes
  several values, else None."""
  short = {f: k for k, f in SETTINGS.items()}.get(table.get("x") or "")
  return short if short and len({r[short] for r in table["rows"]}) > 1 else None


def several_prefixes(table: dict[str, Any]) -> bool:
  """Whether the table holds several routing prefixes P."""
  return len({r["prefix"] for r in table["rows"]}) > 1


def plot_all(table: dict[str, Any], save_dir=None) -> list[str]:
  """Every plot the table supports (see the module docstring); returns their names."""
  names = []
  for by in ("tokens", "flops"):
    plot_vs_compute(table, by=by, save_dir=save_dir)
    names.append(f"ppl_vs_{by}")
  short = swept_setting(table)
  if short:
    plot_vs_setting(table, short, save_dir=save_dir)
    names.append(f"ppl_vs_{short}")
  if several_prefixes(table):
    for metric in ("ppl", "routing_accuracy"):
      plot_vs_prefix(table, metric=metric, save_dir=save_dir)
    names += ["ppl_vs_prefix", "routing_vs_prefix"]
  return names


def write_report(sweep_dir, sweep, points) -> dict[str, Any]:
  """Writes the table (JSON, Markdown) and the plots of the sweep's points; returns their paths."""
  d = report_dir(sweep_dir, sweep.name)
  table = build_table(sweep_dir, sweep, [p.name for p in points])
  found = fnd.findings(table, prefix=table.get("plot_prefix"))
  mio.atomic_write_json(d / TABLE_JSON, table)
  mio.atomic_write_json(d / FINDINGS_JSON, found)
  mio.atomic_write_text(d / TABLE_MD, markdown(table) + "\n" + fnd.markdown(found))
  plots = plot_all(table, save_dir=d)
  return {"dir": str(d), "table_json": str(d / TABLE_JSON), "table_md": str(d / TABLE_MD),
          "findings_json": str(d / FINDINGS_JSON), "plots": [str(d / f"{n}.png") for n in plots]}

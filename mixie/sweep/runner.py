"""Runs a sweep: every point's missing stages, sharing what points have in common; resumable.

Layout of a sweep directory (the sweep config's `workdir`, a local path; several sweeps may share one):

    shared/data-<key>/topics, dataset   the cluster stage, once per distinct data key (`spec.data_key`)
    shared/seed-<key>/                  a seed adapter (train.init = "seed"), once per `spec.seed_key`
    points/<name>/                      one normal `python -m mixie.train` work directory per point:
      topics, dataset                   links to its shared data
      point.json                        its overrides, keys, train settings and owner (written first)
      experts/ lora_all/ ... eval/      what mixie.train and mixie.evaluate write there
      trained.json                      its training (experts and baselines) finished
      done.json                         its evaluation finished, with its eval key
    reports/<sweep name>/               table.json, table.md and plots (`mixie.sweep.report`)

An evaluation-only point (its train key equals that of an already trained point, its "owner"; e.g. the
prefix sweep) links experts/, lora_all/, lora_all_wide/ and full/ to the owner's and has only its own
eval/ (or links the owner's too when its whole config is the owner's). Points run in order, one at a
time, in this process.

Resuming: a point with a done.json of its eval key is skipped without touching any file; any other
point continues where it stopped (every mixie.train run resumes from its checkpoints; the cluster stage
from its markers). A point whose train settings differ from its point.json is refused (`ConfigError`
naming the fields): give it another name, or delete its directory. Two changes are taken in place
(`mixie.sweep.spec.grown`): more baselines (only those train, then the point is evaluated again) and
a config field added to mixie since, at its neutral value (it cannot have changed what was trained).

Adopting work directories made without the runner (`adopt=True`): a `points/<name>/` without point.json
is taken as that point as it is (its experts and baselines are trusted to match the point's settings;
missing baselines are trained and the evaluation is redone); `shared/topics` + `shared/dataset` (the
shared data of a hand-made sweep) move to `shared/data-<key>/` when their cluster-stage settings equal
a point's, and the points' `topics`/`dataset` links are re-pointed there.
"""

from __future__ import annotations

import copy
import os
import pathlib
import time
from typing import Any, Callable, Sequence

from mixie import io as mio
from mixie.cluster.topics import run_cluster, step_settings, summary_line
from mixie.errors import ConfigError
from mixie.evaluate.run import evaluate
from mixie.evaluate.tables import format_table
from mixie.sweep import report
from mixie.sweep import spec as sp
from mixie.train.main import _inputs_missing  # the main job's rule for "topics or dataset missing"
from mixie.train.main import _stopper, run, validate_config

OUTPUTS = ("experts", "lora_all", "lora_all_wide", "full")  # what an evaluation-only point links to
POINT_JSON, TRAINED_JSON, DONE_JSON = "point.json", "trained.json", "done.json"


def sweep_dir(sweep) -> pathlib.Path:
  """The sweep directory (`ConfigError` unless a local path)."""
  d = str(sweep.get("workdir") or "")
  if not d:
    raise ConfigError("workdir: the sweep directory must be set (--workdir=... or --config.workdir=...)")
  if "://" in d:
    raise ConfigError(f"workdir={d!r}: a sweep directory must be a local path (its points link to "
                      "shared stages)")
  return pathlib.Path(d)


def point_config(sd: pathlib.Path, point: sp.Point):
  """The run config of a point in the sweep directory: its workdir, and its shared seed when branched."""
  c = copy.deepcopy(point.config)
  c.workdir = str(sd / "points" / point.name)
  if c.train.init == "seed":
    c.train.seed_dir = str(sd / "shared" / f"seed-{sp.seed_key(c)}")
  return c


def validate(sweep, devices=None) -> list[sp.Point]:
  """The sweep's points, every one's config checked (`ConfigError` naming the point) before any work
  (`devices`: those the points' meshes are checked against; default all)."""
  sd = sweep_dir(sweep)
  points = sp.points_of(sweep)
  for p in points:
    try:
      validate_config(point_config(sd, p), devices)
    except ConfigError as e:
      raise ConfigError(f"sweep point {p.name!r}: {e}") from None
  return points


# ---------------------------------------------------------------------------------------------------
# Links, shared data, point records.


def _link(link: pathlib.Path, target: pathlib.Path) -> None:
  """`link` -> `target` as a relative symlink; a link elsewhere is re-pointed, a real directory kept."""
  rel = os.path.relpath(target, link.parent)
  if link.is_symlink():
    if os.readlink(link) == rel:
      return
  elif link.exists():
    return  # a real directory (an adopted work directory's own): left as it is
  tmp = link.parent / f".{link.name}.link-{os.getpid()}"
  if tmp.is_symlink():
    tmp.unlink()
  os.symlink(rel, tmp)
  os.replace(tmp, link)


def _adopt_shared_data(sd: pathlib.Path, config, d: pathlib.Path, log) -> None:
  """Moves `shared/topics` + `shared/dataset` to `d` when their cluster settings are `config`'s."""
  old = sd / "shared"
  marker = old / "topics" / "done" / "dataset.json"
  if not (marker.exists() and (old / "dataset").exists()):
    return
  if mio.read_json(marker).get("settings") != step_settings(config)["dataset"]:
    return
  d.mkdir(parents=True, exist_ok=True)
  for sub in ("topics", "dataset"):
    os.rename(old / sub, d / sub)
  log(f"mixie.sweep: adopted {old}/topics and /dataset as {d}")


def ensure_data(sd: pathlib.Path, config, key: str, *, adopt: bool, log) -> pathlib.Path:
  """`shared/data-<key>` with complete topics and dataset (the cluster stage runs when missing)."""
  d = sd / "shared" / f"data-{key}"
  if adopt and not d.exists():
    _adopt_shared_data(sd, config, d, log)
  if _inputs_missing(str(d)):
    c = copy.deepcopy(config)
    c.workdir = str(d)
    log(f"mixie.sweep: cluster stage into {d}")
    log(summary_line(run_cluster(c, log=log)))
  return d


def find_owner(sd: pathlib.Path, name: str, train_key: str) -> str | None:
  """A trained point (not `name`) of the same train key, or None."""
  pts = sd / "points"
  for d in sorted(pts.iterdir()) if pts.exists() else []:
    if d.name == name or not (d / POINT_JSON).exists() or not (d / TRAINED_JSON).exists():
      continue
    rec = mio.read_json(d / POINT_JSON)
    if rec.get("keys", {}).get("train") == train_key and not rec.get("owner"):
      return d.name
  return None


def claim(wd: pathlib.Path, point: sp.Point, config, keys: dict, *, adopt: bool, sd, log) -> dict:
  """Writes (or checks) the point's `point.json`; returns it. Refuses a changed point, and a directory
  that this runner did not make unless `adopt`."""
  pj = wd / POINT_JSON
  rec = {"name": point.name, "overrides": sp.flat(point.overrides), "keys": keys,
         "settings": sp.train_settings(config)}
  if pj.exists():
    old = mio.read_json(pj)
    if old.get("keys", {}).get("train") != keys["train"]:
      have, now = old.get("settings", {}), rec["settings"]
      changed = sorted(k for k in set(have) | set(now) if have.get(k) != now.get(k))
      grown = sp.grown(have, now)
      if grown is None:
        diffs = [f"{k}={have.get(k)!r} there, {now.get(k)!r} now" for k in changed]
        raise ConfigError(f"{wd}: point {point.name!r} was trained with other settings ({'; '.join(diffs[:4])}); "
                          "give the point another name, or delete that directory")
      log(f"mixie.sweep: point {point.name!r}: {grown}; its finished runs are kept")
      (wd / TRAINED_JSON).unlink(missing_ok=True)  # the main job trains what is missing, then evaluates
    rec["owner"] = old.get("owner")
    if old == rec:
      return old
  else:
    if wd.exists() and any(wd.iterdir()):
      if not adopt:
        raise ConfigError(f"{wd} exists but was not made by the sweep runner (no {POINT_JSON}): pass "
                          f"--adopt to take it as point {point.name!r} as it is, or move it away")
      log(f"mixie.sweep: adopting {wd} as point {point.name!r}")
      rec["owner"] = None
    else:
      rec["owner"] = find_owner(sd, point.name, keys["train"])
  mio.atomic_write_json(pj, rec)
  return rec


# ---------------------------------------------------------------------------------------------------
# Points and the sweep.


def run_point(sd: pathlib.Path, point: sp.Point, *, adopt: bool = False, log=print,
              stop: Callable[[], bool] | None = None) -> str:
  """Runs what is missing of one point; returns "done", or the main job's status when it stopped early
  ("preempted", "max_steps")."""
  config = point_config(sd, point)
  wd = pathlib.Path(config.workdir)
  keys = {"data": sp.data_key(config), "train": sp.train_key(config), "eval": sp.eval_key(config)}
  done = wd / DONE_JSON
  if done.exists() and mio.read_json(done).get("eval_key") == keys["eval"]:
    log(f"mixie.sweep: point {point.name!r} is done ({done})")
    return "done"
  rec = claim(wd, point, config, keys, adopt=adopt, sd=sd, log=log)
  data = ensure_data(sd, config, keys["data"], adopt=adopt, log=log)
  for sub in ("topics", "dataset"):
    _link(wd / sub, data / sub)
  t0 = time.time()
  if rec["owner"]:
    owner = sd / "points" / rec["owner"]
    same = (owner / DONE_JSON).exists() and mio.read_json(owner / DONE_JSON).get("eval_key") == keys["eval"]
    for sub in OUTPUTS + (("eval",) if same else ()):  # the same evaluation too: nothing to redo
      if (owner / sub).exists():
        _link(wd / sub, owner / sub)
    if not same:
      log(f"mixie.sweep: point {point.name!r}: evaluating the experts of point {rec['owner']!r}")
      log(format_table(evaluate(config, log=log)))
  else:
    log(f"mixie.sweep: point {point.name!r} in {wd}")
    summary = run(config, log=log, stop=stop)
    if summary["status"] != "finished":
      return summary["status"]
    if not (wd / TRAINED_JSON).exists():
      mio.atomic_write_json(wd / TRAINED_JSON, {"train_key": keys["train"], "runs": summary["runs"]})
  mio.atomic_write_json(done, {"eval_key": keys["eval"], "train_key": keys["train"], "owner": rec["owner"],
                               "seconds": round(time.time() - t0, 1),
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
  return "done"


def run_sweep(sweep, *, adopt: bool = False, only: Sequence[str] = (), log=print) -> dict[str, Any]:
  """Runs every point of `sweep` (skipping finished ones; only the points named in `only` when it is
  not empty), then writes its report (of every finished point); returns a summary with `status`
  ("finished" or why it stopped) and the report's paths."""
  points = validate(sweep)
  sd = sweep_dir(sweep)
  names = [p.name for p in points]
  unknown = [n for n in only if n not in names]
  if unknown:
    raise ConfigError(f"--only: no point(s) {unknown} in sweep {sweep.name!r}; its points: {names}")
  todo = [p for p in points if not only or p.name in only]
  stop = _stopper()  # SIGTERM: the running point checkpoints and the sweep stops
  for i, p in enumerate(todo):
    status = run_point(sd, p, adopt=adopt, log=log, stop=stop)
    if status != "done" or (stop() and i + 1 < len(todo)):
      log(f"mixie.sweep: stopped in point {p.name!r} ({status}); rerun the same command to resume")
      return {"status": status if status != "done" else "preempted", "point": p.name}
  done = [p for p in points if (sd / "points" / p.name / DONE_JSON).exists()]  # `only`: maybe not all
  paths = report.write_report(sd, sweep, done)
  log(f"mixie.sweep: {len(todo)} points done ({len(done)} of {len(points)} in the report); "
      f"table and plots in {paths['dir']}")
  return {"status": "finished", **paths}

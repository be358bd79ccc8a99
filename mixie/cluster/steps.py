"""The cluster stage's steps: the settings each step's output depends on, completion markers, step log.

A step's marker (`topics/done/<step>.json`) records the settings it ran with; `StepLog.done` compares
them with the config, so outputs are reused only for the settings that made them, and a difference is an
error naming the fields (never a silent overwrite). Starting a step removes its marker and the later
steps' markers first; a step's marker is written after all its outputs.
"""

from __future__ import annotations

import json
import time

from mixie import io as mio
from mixie.errors import ConfigError, MixieError

STEPS = ("embed", "cluster", "dataset")


def plain(x):
  """`x` as plain JSON values (tuples as lists, anything else unknown as its string)."""
  return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))



def step_settings(config) -> dict[str, dict]:
  """The config fields (flat `section.field` names) each step's output depends on; a step includes
  the fields of the steps before it."""
  cc = config.cluster
  embed = {f"data.{k}": v for k, v in plain(config.data.to_dict()).items()}
  embed.update({"cluster.embedder": cc.embedder, "cluster.embed_tokens": cc.embed_tokens})
  model = {f"model.{k}": config.model.get(k) for k in ("source", "path", "preset")}
  if cc.embedder == "tfidf":
    embed.update({"cluster.tfidf_dim": cc.tfidf_dim, "seed": config.seed})
  if cc.embedder == "base":
    embed.update(model)
  fields = ["method", "metric", "silhouette_sample"]
  fields += (["k", "n_init", "max_iters", "tol", "balanced_max_size"] if cc.method == "kmeans" else
             ["umap_dim", "umap_neighbors", "min_cluster_size"])
  cluster = {**embed, "seed": config.seed, **{f"cluster.{f}": plain(cc[f]) for f in fields}}
  return {"embed": embed, "cluster": cluster, "dataset": {**cluster, **model}}


def _diff(old: dict, new: dict) -> list[str]:
  return [f"{k}={old.get(k)!r} there, {new.get(k)!r} in the config"
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class StepLog:
  """Completion markers and the step log (`steps.jsonl`) of one topics directory."""

  def __init__(self, directory, settings: dict[str, dict]):
    self.dir = mio.path(directory)
    self.settings = settings
    self.log: list[dict] = []

  def marker(self, step):
    """The completion marker of `step`."""
    return self.dir / "done" / f"{step}.json"

  def done(self, step) -> bool:
    """True when `step` completed with these settings; `ConfigError` when with other settings."""
    m = self.marker(step)
    if not m.exists():
      return False
    try:
      old = mio.read_json(m)["settings"]
    except (MixieError, KeyError, TypeError):
      return False  # unreadable marker: redo the step
    diffs = _diff(old, self.settings[step])
    if diffs:
      raise ConfigError(
          f"{self.dir}: the {step} step was run with other settings ({'; '.join(diffs[:4])}). "
          "Use a fresh --workdir, or delete the topics (and anything trained on them) to redo it")
    return True

  def start(self, step) -> float:
    """Removes the markers of `step` and of the steps after it; returns the start time."""
    for later in STEPS[STEPS.index(step):]:
      if self.marker(later).exists():
        self.marker(later).unlink()
    return time.time()

  def finish(self, step, t0: float, extra: dict | None = None) -> None:
    """Writes the marker of `step` (its settings, seconds, `extra`) and logs it as run."""
    rec = {"step": step, "settings": self.settings[step], "seconds": round(time.time() - t0, 3),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
    mio.atomic_write_json(self.marker(step), rec)
    self._log(step, "ran", rec["seconds"])

  def skip(self, step) -> None:
    """Logs `step` as skipped (already done)."""
    self._log(step, "skipped", 0.0)

  def _log(self, step, status, seconds):
    entry = {"step": step, "status": status, "seconds": seconds,
             "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    self.log.append(entry)
    p = self.dir / "steps.jsonl"
    old = p.read_text() if p.exists() else ""
    mio.atomic_write_text(p, old + json.dumps(entry) + "\n")

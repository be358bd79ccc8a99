"""Divergence of an expert, told from the per-step loss and gradient norm the loop already fetches.

An expert (a topic's LoRA, or the one slot of a baseline) has diverged when, over the steps on which it
had tokens,
- its loss ends far above where it started: the mean of its last `window` losses exceeds the mean of
  its first `window` losses by more than `margin` nats (with fewer than 2 x `window` steps, both windows
  are half its steps; an expert of one step is never judged on loss), or
- its gradient norm is exactly 0 for `zero_grad_steps` consecutive steps: the logits have collapsed
  (e.g. to uniform, loss = ln V) and nothing will move them again.

The verdict is made when the expert finishes (`finish`), on host floats only: no device round trip is
added. The monitor's state is JSON (it rides in the train checkpoint's host state), so a resumed run
judges an expert on all of its steps. `workdir/divergence.json` keeps the verdicts of each run
(`record`), for the main job's summary and exit status and for the evaluation's table (`load`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mixie import io as mio
from mixie.errors import ConfigError, MixieError

DIVERGENCE_JSON = "divergence.json"
MARK = "!"  # printed after a diverged row or topic in the evaluation table


class Diverged(MixieError):
  """Experts diverged and `train.allow_divergence` is False."""


@dataclasses.dataclass(frozen=True)
class DivergenceRule:
  """The thresholds (config fields `train.divergence_*`); 0 turns a test off."""

  window: int = 3  # steps averaged at the start and at the end of an expert's training
  margin: float = 1.0  # nats: final mean loss above the start mean by more than this = diverged
  zero_grad_steps: int = 3  # consecutive steps with a gradient norm of exactly 0 = diverged

  @classmethod
  def from_config(cls, t) -> "DivergenceRule":
    """From the `train` config section; `ConfigError` naming a bad field."""
    r = cls(window=t.divergence_window, margin=t.divergence_margin, zero_grad_steps=t.divergence_zero_grad_steps)
    for f, v in (("divergence_window", r.window), ("divergence_zero_grad_steps", r.zero_grad_steps)):
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"train.{f} must be an integer >= 0 (0 = off), got {v!r}")
    if not float(r.margin) >= 0:
      raise ConfigError(f"train.divergence_margin must be >= 0 nats, got {r.margin!r}")
    if not isinstance(t.allow_divergence, bool):
      raise ConfigError(f"train.allow_divergence must be True or False, got {t.allow_divergence!r}")
    return r


class DivergenceMonitor:
  """Per-topic loss history (first and last `window` losses) and zero-gradient streaks; verdicts."""

  def __init__(self, rule: DivergenceRule = DivergenceRule()):
    self.rule = rule
    self.track: dict[str, dict[str, Any]] = {}  # topic -> {first, last, steps, zero_run, max_zero_run}
    self.diverged: dict[int, str] = {}  # topic -> why

  def observe(self, topic: int, loss: float, grad_norm: float) -> None:
    """One step of `topic`'s expert on which it had tokens."""
    w = max(self.rule.window, 1)
    t = self.track.setdefault(str(int(topic)), {"first": [], "last": [], "steps": 0, "zero_run": 0,
                                                 "max_zero_run": 0})
    t["steps"] += 1
    if len(t["first"]) < w:
      t["first"].append(float(loss))
    t["last"] = (t["last"] + [float(loss)])[-w:]
    t["zero_run"] = t["zero_run"] + 1 if grad_norm == 0.0 else 0
    t["max_zero_run"] = max(t["max_zero_run"], t["zero_run"])

  def finish(self, topic: int) -> str | None:
    """The verdict on `topic`'s finished expert: why it diverged, or None; forgets its history."""
    t = self.track.pop(str(int(topic)), None)
    why = None if t is None else self._judge(t)
    if why is not None:
      self.diverged[int(topic)] = why
    return why

  def _judge(self, t: dict[str, Any]) -> str | None:
    r = self.rule
    if r.zero_grad_steps and t["max_zero_run"] >= r.zero_grad_steps:
      return (f"gradient norm exactly 0 for {t['max_zero_run']} consecutive steps (collapsed logits; "
              f"final loss {t['last'][-1]:.3f})")
    w = min(r.window, t["steps"] // 2)
    if r.window and w >= 1:
      # the first and the last w steps (`first` holds the first `window`, `last` the last `window`)
      start = sum(t["first"][:w]) / w
      end = sum(t["last"][-w:]) / w
      if end > start + r.margin:
        return (f"loss rose from {start:.3f} (mean of its first {w} steps) to {end:.3f} (mean of its "
                f"last {w}), more than train.divergence_margin={r.margin:g} nats")
    return None

  def state(self) -> dict[str, Any]:
    """JSON-able state (for the checkpoint's host state)."""
    return {"track": self.track, "diverged": {str(k): v for k, v in self.diverged.items()}}

  def restore(self, s: dict[str, Any] | None) -> None:
    """Restores `state()`; None (a checkpoint written before divergence was tracked) starts empty."""
    s = s or {}
    self.track = {k: dict(v) for k, v in s.get("track", {}).items()}
    self.diverged = {int(k): v for k, v in s.get("diverged", {}).items()}


def refusal(diverged: list[dict[str, Any]]) -> str:
  """The error of a run whose experts diverged (`load`'s list) and that does not allow it."""
  names = ", ".join(f"expert {d['expert']}" if d["run"] == "experts" else d["run"] for d in diverged)
  return (f"{len(diverged)} trained expert(s) diverged ({names}; why: train_summary.json, "
          f"{DIVERGENCE_JSON}). Lower train.lr or set train.grad_clip > 0 and train again in a fresh "
          "workdir, or set train.allow_divergence=True to keep them")


def describe(mode: str, diverged: dict[int, str]) -> str:
  """One line per diverged expert of run `mode`."""
  name = "expert of topic {}" if mode == "experts" else f"{mode} (slot {{}})"
  return "\n".join(f"mixie.train[{mode}]: DIVERGED: {name.format(t)}: {why}"
                   for t, why in sorted(diverged.items()))


def note(workdir, mode: str, diverged: dict[int, str], log=print) -> dict[str, str]:
  """After a training run: logs its diverged experts, `record`s them; returns them JSON-able."""
  if diverged:
    log(describe(mode, diverged))
  record(workdir, mode, diverged)
  return {str(t): why for t, why in sorted(diverged.items())}


def record(workdir, mode: str, diverged: dict[int, str]) -> None:
  """Writes run `mode`'s verdicts into `workdir/divergence.json` (replacing that run's earlier ones)."""
  p = mio.path(workdir) / DIVERGENCE_JSON
  all_runs = mio.read_json(p) if p.exists() else {}
  all_runs[mode] = {str(t): why for t, why in sorted(diverged.items())}
  mio.atomic_write_json(p, all_runs)


def load(workdir) -> list[dict[str, Any]]:
  """Every diverged expert of `workdir`: `[{"run": mode, "expert": topic, "reason": why}]`."""
  p = mio.path(workdir) / DIVERGENCE_JSON
  if not p.exists():
    return []
  return [{"run": mode, "expert": int(t), "reason": why}
          for mode, runs in sorted(mio.read_json(p).items()) for t, why in sorted(runs.items())]


def table_marks(results: dict[str, Any]) -> tuple[set[str], set[str], str | None]:
  """For the evaluation table: the rows and the topic columns to mark with `MARK`, and a footnote."""
  div = results.get("diverged") or []
  experts = {d["expert"] for d in div if d["run"] == "experts"}
  rows = {d["run"] for d in div if d["run"] != "experts"}
  eot = results.get("expert_of_topic", {})
  topics = {str(t) for t in results.get("topics", []) if eot.get(str(t)) in experts}
  if not div:
    return rows, topics, None
  what = [f"experts {sorted(experts)}"] if experts else []
  return rows, topics, (f"{MARK} diverged in training ({', '.join(what + sorted(rows))}; see "
                        f"{DIVERGENCE_JSON}); topic {MARK}: that topic's own expert diverged")

"""Sweep configs, their points, and the keys that decide what points share.

A sweep config (`configs/sweeps/*.py`, `get_config(arg)`) is a ConfigDict with:

    name         the sweep's name; its table and plots go to `<workdir>/reports/<name>/`
    workdir      the sweep directory (a local path); several sweeps may share one, and then share stages
    base         the run config every point starts from (a `configs/*.py` config)
    points       ((point name, {"section.field": value, ...}), ...): each point is `base` + its overrides
    x            the field the sweep varies, for the plots ("" = none); "eval.prefix_tokens" means P
    series       fields whose values tell a point's lines apart besides the row (e.g. ("train.init",))
    plot_prefix  P of the plots against tokens, FLOPs, k and rank (0 = the largest P of every point)

Keys (short hashes of flat `section.field` settings):
- `data_key`: the cluster stage's settings (`mixie.cluster.topics.step_settings`): points with equal
  keys share one `shared/data-<key>/{topics,dataset}`;
- `seed_key`: the seed adapter's settings (`mixie.train.branch.seed_settings`): `shared/seed-<key>/`;
- `train_key`: every setting but those of evaluation, routing, generation (`EVAL_ONLY`), the device
  layout (`LAYOUT`) and bookkeeping: a point whose train key equals a trained point's is evaluated on
  that point's experts and baselines, not trained again (e.g. the prefix sweep);
- `eval_key`: every setting (layout and bookkeeping aside): a finished point is redone only when it
  changes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from typing import Any

import ml_collections

from mixie.cluster.steps import plain, step_settings  # one rule for JSON-plain config values
from mixie.errors import ConfigError
from mixie.train.branch import seed_settings

# settings that never change what a point trains (the runner sets workdir and train.seed_dir itself)
BOOKKEEPING = ("workdir", "train.seed_dir", "train.eval_after", "train.log_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.run_missing")
EVAL_ONLY = ("eval.", "route.", "generate.")  # prefixes of the settings evaluation alone reads
LAYOUT = ("mesh.",)  # how a run is laid out on devices, not what it computes: a point may resume elsewhere
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclasses.dataclass
class Point:
  """One point of a sweep: its name, its overrides and the resolved run config (workdir not set)."""

  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict


def flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`{"section.field": JSON-plain value}` of a run config."""
  out: dict[str, Any] = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, (ml_collections.ConfigDict, dict)):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = plain(v)
  walk(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config, "")
  return out


def digest(settings: dict[str, Any]) -> str:
  """A short stable hash of JSON-able settings."""
  return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=6).hexdigest()


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any], where: str):
  """A copy of `config` with the dotted-field `overrides` set; `ConfigError` names `where` and the field."""
  c = copy.deepcopy(config)
  for key, value in overrides.items():
    *parents, field = key.split(".")
    node = c
    for p in parents:
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise ConfigError(f"{where}: unknown config field {key!r}")
      node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or field not in node:
      raise ConfigError(f"{where}: unknown config field {key!r}")
    try:
      node[field] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{where}: {key}={value!r}: {e}") from None
  return c


def points_of(sweep: ml_collections.ConfigDict) -> list[Point]:
  """The sweep's points (names checked: unique, file-name safe)."""
  raw = tuple(sweep.points)
  if not raw:
    raise ConfigError("points: the sweep has no points")
  out, seen = [], set()
  for i, item in enumerate(raw):
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict)):
      raise ConfigError(f"points[{i}]: expected (name, {{'section.field': value}}), got {item!r}")
    name, over = item
    if not isinstance(name, str) or not _NAME.match(name) or name in seen:
      raise ConfigError(f"points[{i}]: the name {name!r} must be unique and made of letters, digits, "
                        "'_', '.' and '-'")
    seen.add(name)
    out.append(Point(name=name, overrides=dict(over), config=apply_overrides(sweep.base, over,
                                                                              f"sweep point {name!r}")))
  return out


def _without(settings: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
  return {k: v for k, v in settings.items()
          if not k.startswith(prefixes + LAYOUT) and k not in BOOKKEEPING}


def data_key(config) -> str:
  """The key of the topics and dataset a run config trains on."""
  return digest(step_settings(config)["dataset"])


def seed_key(config) -> str:
  """The key of a run config's seed adapter."""
  return digest(seed_settings(config))


def train_key(config) -> str:
  """The key of what a run config trains (evaluation, routing and bookkeeping settings aside)."""
  return digest(_without(flat(config), EVAL_ONLY))


def eval_key(config) -> str:
  """The key of a run config's whole result (bookkeeping aside)."""
  return digest(_without(flat(config), ()))


def train_settings(config) -> dict[str, Any]:
  """The settings `train_key` hashes (recorded in `point.json`, to name what changed)."""
  return _without(flat(config), EVAL_ONLY)


# values of a config field that mean "off": a field mixie gained after a point was trained, at one of
# these, changes nothing the point trained
NEUTRAL = (None, False, 0, 0.0, "", (), [])


# fields that configure one baseline's run alone: free to change while that baseline is new to a point
BASELINE_FIELDS = {"train.full_lr": "full", "train.wide_rank_cap": "lora_all_wide"}


def grown(have: dict[str, Any], now: dict[str, Any]) -> str | None:
  """How train settings `now` extend a trained point's recorded `have` without changing what it trained
  (a sentence), or None when they do not: only `train.baselines` grew (new baselines to train), fields
  absent from `have` are at a `NEUTRAL` value, and a field of a newly added baseline alone
  (`BASELINE_FIELDS`) may take any value."""
  added = set(now.get("train.baselines") or ()) - set(have.get("train.baselines") or ())
  notes = []
  for k in sorted(set(have) | set(now)):
    if have.get(k) == now.get(k):
      continue
    if k in now and BASELINE_FIELDS.get(k) in added and "train.baselines" in have:
      notes.append(f"{k}={now[k]!r} (for the new {BASELINE_FIELDS[k]} run)")
    elif k not in have and k in now and any(now[k] == v and type(now[k]) is type(v) for v in NEUTRAL):
      notes.append(f"{k}={now[k]!r} is new")
    elif k == "train.baselines" and k in have and k in now and set(have[k]) < set(now[k]):
      notes.append(f"baselines {sorted(set(now[k]) - set(have[k]))} added")
    else:
      return None
  return ", ".join(notes)

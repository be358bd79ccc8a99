"""Branched experts (Branch-Train-Merge style): every expert starts from one shared seed adapter.

`train.init = "scratch"`: every expert starts fresh (A random, B = 0). `"seed"`: first the seed adapter
is trained, a LoRA of the experts' own rank, alpha and targets trained through the same trainer on all
topics' data (as `lora_all`); then every expert starts from it, with fresh optimizer state (zero Adam
moments, step 0, its own warm-up and schedule), and trains on its own topic only.

Token budget, `train.seed_fraction` = f: let S be the sum of the experts' scratch budgets (the tokens of a
scratch row, and of `lora_all`). The seed trains on round(f * S) tokens of all the data; each branch on
(1 - f) of its own scratch budget (at least one batch). A seed-branched row thus costs S tokens, as the
scratch row and `lora_all` do, and is compared with them at equal training tokens.

The seed lives in `train.seed_dir` ("" = `workdir/seed`): a one-entry expert store (topic 0) with its own
checkpoints (`checkpoints/`) and `settings.json`, the settings it was trained with (`seed_settings`). It is
trained once, resumes like every run, and is reused by every run pointing at it with equal settings
(sweep points share one); other settings are refused, naming the fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mixie import io as mio
from mixie.cluster.topics import _plain, step_settings  # one rule for JSON-plain config values
from mixie.distributed import is_main_process
from mixie.errors import ConfigError, check
from mixie.store import ExpertStore

INITS = ("scratch", "seed")
SETTINGS_JSON = "settings.json"
_TRAIN_FIELDS = ("slots", "batch_per_slot", "budget", "tokens_per_expert", "seed_fraction", "lr",
                 "warmup_steps", "min_lr_ratio", "weight_decay", "b1", "b2", "grad_clip", "schedule",
                 "ce_chunk", "max_steps")


def validate(config) -> None:
  """Checks `train.init` and `train.seed_fraction`; `ConfigError` names the field."""
  t = config.train
  if t.init not in INITS:
    raise ConfigError(f"train.init must be one of {INITS}, got {t.init!r}")
  f = t.seed_fraction
  if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
    raise ConfigError(f"train.seed_fraction must be a number in (0, 1), got {f!r}")
  if t.init == "seed" and t.mode != "experts":
    raise ConfigError(f"train.init='seed' branches the experts; it needs train.mode='experts', got {t.mode!r}")


def seed_dir(config):
  """Where the seed adapter of `config` lives: `train.seed_dir`, or `workdir/seed`."""
  return mio.path(config.train.seed_dir or mio.path(config.workdir) / "seed")


def seed_settings(config) -> dict[str, Any]:
  """Every setting the seed adapter depends on (flat `section.field` names): the data it trains on,
  the base, the LoRA shape, the rows per step, the optimizer and its token budget's inputs."""
  out = dict(step_settings(config)["dataset"])
  out.update({f"model.{k}": config.model.get(k) for k in ("source", "path", "preset", "dtype", "param_dtype")})
  out.update({f"lora.{k}": v for k, v in config.lora.to_dict().items()})
  out.update({f"dataset.{k}": config.dataset[k] for k in ("seq_len", "small_topics")})
  out.update({f"train.{k}": config.train[k] for k in _TRAIN_FIELDS})
  out["seed"] = config.seed
  return _plain(out)


@dataclasses.dataclass
class SeedPlan:
  """The seed adapter of a branched run and the branches' budgets."""

  dir: Any  # the seed's one-entry expert store
  tokens: int  # the seed's token budget
  branch_budgets: dict[int, int]  # topic -> tokens of its branch


def plan(config, budgets: Mapping[int, int], min_tokens: int) -> SeedPlan:
  """Splits the scratch `budgets` by `train.seed_fraction` (see the module docstring)."""
  f = float(config.train.seed_fraction)
  total = int(sum(int(b) for b in budgets.values()))
  branch = {int(t): max(int(min_tokens), int(round((1.0 - f) * int(b)))) for t, b in budgets.items()}
  return SeedPlan(dir=seed_dir(config), tokens=max(int(min_tokens), int(round(f * total))),
                  branch_budgets=branch)


def claim(config, d) -> None:
  """Writes `settings.json` into a new seed directory (process 0), or refuses one trained with other
  settings."""
  want = seed_settings(config)
  p = mio.path(d) / SETTINGS_JSON
  if p.exists():
    have = mio.read_json(p)
    diffs = [f"{k}={have.get(k)!r} there, {want.get(k)!r} here" for k in sorted(set(have) | set(want))
             if have.get(k) != want.get(k)]
    if diffs:
      raise ConfigError(f"{d}: the seed adapter there was trained with other settings ({'; '.join(diffs[:4])})."
                        " Point train.seed_dir elsewhere, or delete that directory to retrain it")
  elif is_main_process():
    mio.atomic_write_json(p, want)


def load(d, fingerprint: str, lora) -> tuple[dict, dict[str, Any]]:
  """The trained seed adapter (host arrays) and what the branches record of it (their metadata's
  `seed`)."""
  store = ExpertStore(d)
  check(0 in store, f"{d}: no finished seed adapter")
  tree, meta = store.load(0, fingerprint, lora)
  check(meta.tokens_seen is not None, f"{store.meta_file(0)}: the seed adapter's tokens_seen is missing")
  info = {"dir": str(d), "tokens_seen": meta.tokens_seen, "rank": meta.rank, "alpha": meta.alpha,
          "targets": list(meta.targets), "seq_len": meta.seq_len}
  return tree, info


# ---------------------------------------------------------------------------------------------------
# Writing the seed into the train state (after `create_state` and after every slot reset).


_JITTED: dict = {}


def _start_from(state, seed, mask_e):
  def put(p, s):
    m = mask_e.reshape(mask_e.shape + (1,) * (p.ndim - 1))
    return jnp.where(m, jnp.broadcast_to(s.astype(p.dtype), p.shape), p)
  return {**state, "params": jax.tree.map(put, state["params"], seed)}


def start_from(state, seed, mask_e):
  """`state` with the parameters of the slots in `mask_e` ([E] bool) replaced by `seed` (one expert);
  the optimizer state is untouched (fresh after `create_state` / a slot reset). State donated."""
  leaves, treedef = jax.tree.flatten(state)
  shardings = tuple(x.sharding for x in leaves)
  key = (treedef, tuple((x.shape, str(x.dtype)) for x in leaves), shardings)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(_start_from, out_shardings=jax.tree.unflatten(treedef, shardings),
                           donate_argnums=(0,))
  mesh = getattr(shardings[0], "mesh", None)
  rep = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
  seed, mask_e = jax.tree.map(np.asarray, seed), np.asarray(mask_e, bool)
  if rep is not None:
    seed, mask_e = jax.device_put((seed, mask_e), rep)
  return _JITTED[key](state, seed, mask_e)

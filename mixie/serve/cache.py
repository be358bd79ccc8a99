"""An on-device LRU cache of experts: C slots stacked on a leading axis, bookkeeping on the host.

The slots are one expert pytree with leading axis C (`[C, l, d_in, r]` ...), so a batch gathers its
rows' experts with one `take` (`mixie.serve.batched.gather_experts`). On a miss the expert is read by
`load_fn(expert_id) -> expert pytree of arrays` (the expert store; it raises `MixieError` when the
expert is missing or corrupt) and written into a free slot, or the least recently used slot not
needed by the current batch, by a jitted `.at[slot].set` that donates the old slots (no copy of the
cache). A failed load is reported per expert; the slot stays free and nothing else is affected.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from mixie.errors import MixieError
from mixie.model.llama import LlamaConfig
from mixie.model.lora import LoraConfig, expert_shapes


@functools.partial(jax.jit, donate_argnums=0)
def _write_slot(slots_c, slot, expert):
  return jax.tree.map(lambda s, e: s.at[slot].set(e.astype(s.dtype)), slots_c, expert)


def check_expert(expert: Any, shapes: dict, name: str) -> dict:
  """Validates an expert tree against `expert_shapes`; raises `MixieError` naming the bad tensor."""
  if not isinstance(expert, dict) or set(expert) != set(shapes):
    got = sorted(expert) if isinstance(expert, dict) else type(expert).__name__
    raise MixieError(f"{name}: has projections {got}, expected {sorted(shapes)}")
  out = {}
  for proj, ab in shapes.items():
    if not isinstance(expert[proj], dict) or set(expert[proj]) != {"a", "b"}:
      raise MixieError(f"{name}: projection {proj!r} must hold tensors 'a' and 'b'")
    out[proj] = {}
    for k, shape in ab.items():
      x = np.asarray(expert[proj][k])
      if x.shape != tuple(shape):
        raise MixieError(f"{name}: tensor {proj}.{k} has shape {x.shape}, expected {tuple(shape)}")
      if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise MixieError(f"{name}: tensor {proj}.{k} is not finite floating point ({x.dtype})")
      out[proj][k] = x
  return out


class ExpertCache:
  """LRU cache of experts in `slots` device slots (see the module docstring).

  Attributes:
    slots_c: the stacked experts `[C, ...]` (zeros in empty slots).
    loaded: expert ids in the order they were loaded (for tests and stats).
    hits, misses, evictions: counters.
  """

  def __init__(self, cfg: LlamaConfig, lora: LoraConfig, load_fn: Callable[[int], Any], slots: int, *,
               sharding=None):
    if slots < 1:
      raise MixieError(f"generate.cache_experts must be >= 1, got {slots}")
    self.lora = lora
    self.load_fn = load_fn
    self.capacity = int(slots)
    self.shapes = expert_shapes(cfg, lora)
    dt = jnp.dtype(lora.dtype)
    make = lambda s: jnp.zeros((self.capacity,) + tuple(s), dt)
    if sharding is not None:
      make = jax.jit(make, out_shardings=sharding, static_argnums=0)
    self.slots_c = jax.tree.map(make, self.shapes, is_leaf=lambda x: isinstance(x, tuple))
    self._lru: collections.OrderedDict[int, int] = collections.OrderedDict()  # expert -> slot
    self._free = list(range(self.capacity))
    self.loaded: list[int] = []
    self.hits = self.misses = self.evictions = 0

  def __contains__(self, expert_id: int) -> bool:
    return int(expert_id) in self._lru

  @property
  def resident(self) -> list[int]:
    """Cached expert ids, least recently used first."""
    return list(self._lru)

  def slots_for(self, expert_ids: Iterable[int]) -> tuple[np.ndarray, dict[int, str]]:
    """The slot of each expert id (loading misses); -1 ids (the base) map to slot -1.

    Returns `(slot_n int32, errors)`: `errors[expert_id]` is the message of a failed load (its slot
    is -1). Raises `MixieError` if the ids need more distinct experts than there are slots.
    """
    ids = [int(e) for e in expert_ids]
    needed = list(dict.fromkeys(e for e in ids if e >= 0))
    if len(needed) > self.capacity:
      raise MixieError(f"a batch needs {len(needed)} distinct experts but the expert cache has "
                       f"{self.capacity} slots (generate.cache_experts); split the batch")
    pinned = set(needed)
    errors: dict[int, str] = {}
    for e in needed:
      if e in self._lru:
        self.hits += 1
        self._lru.move_to_end(e)
        continue
      self.misses += 1
      try:
        expert = check_expert(self.load_fn(e), self.shapes, f"expert {e}")
      except MixieError as err:
        errors[e] = str(err)
        continue
      except (OSError, ValueError, KeyError, TypeError) as err:  # a store that let a parse error through
        errors[e] = f"expert {e}: could not be loaded ({type(err).__name__}: {err})"
        continue
      slot = self._take_slot(pinned)
      self.slots_c = _write_slot(self.slots_c, jnp.int32(slot), expert)
      self._lru[e] = slot
      self.loaded.append(e)
    slot_n = np.array([self._lru[e] if e >= 0 and e not in errors else -1 for e in ids], np.int32)
    return slot_n, errors

  def drop(self, expert_ids: Iterable[int]) -> None:
    """Forgets cached experts (their slots become free): the next use loads them again."""
    for e in expert_ids:
      slot = self._lru.pop(int(e), None)
      if slot is not None:
        self._free.append(slot)

  def _take_slot(self, pinned: set[int]) -> int:
    if self._free:
      return self._free.pop(0)
    victim = next(e for e in self._lru if e not in pinned)
    self.evictions += 1
    return self._lru.pop(victim)

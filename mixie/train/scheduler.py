"""The expert scheduler: E slots, many more topics; each expert trains to its token budget, then its slot
takes the next topic.

Host-side and tiny: the state is a JSON-able dict saved in every checkpoint. Topics are queued largest
budget first (longest-processing-time order, so the last wave is short), ties by topic id.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from mixie.errors import ConfigError, MixieError, check

BUDGETS = ("fixed", "proportional")


def token_budgets(topic_tokens: Mapping[int, int], mode: str, tokens_per_expert: int,
                  min_tokens: int = 1) -> dict[int, int]:
  """Token budget of every topic.

  "fixed": `tokens_per_expert` each. "proportional": `tokens_per_expert * K * size / sum(size)` (the
  mean budget is `tokens_per_expert`), at least `min_tokens` (one batch).
  """
  check(mode in BUDGETS, f"train.budget={mode!r}: must be one of {', '.join(BUDGETS)}", ConfigError)
  check(tokens_per_expert > 0, f"train.tokens_per_expert={tokens_per_expert}: must be > 0", ConfigError)
  if mode == "fixed":
    return {int(t): int(tokens_per_expert) for t in topic_tokens}
  total = sum(int(v) for v in topic_tokens.values())
  check(total > 0, "proportional budgets: the topics hold no tokens")
  k = len(topic_tokens)
  return {int(t): max(int(min_tokens), int(round(tokens_per_expert * k * int(n) / total)))
          for t, n in topic_tokens.items()}


class ExpertScheduler:
  """Which topic each slot trains, how many tokens it has seen, and which experts are done."""

  def __init__(self, budgets: Mapping[int, int], n_slots: int):
    check(n_slots > 0, f"train.slots={n_slots}: must be > 0", ConfigError)
    check(len(budgets) > 0, "the expert scheduler got no topics to train")
    self.budgets = {int(t): int(b) for t, b in budgets.items()}
    self.order = sorted(self.budgets, key=lambda t: (-self.budgets[t], t))
    self.n_slots = n_slots
    self.next = 0  # index into order of the next topic to start
    self.slot_topic = [-1] * n_slots
    self.slot_tokens = [0] * n_slots
    self.done: list[int] = []

  # --- state -----------------------------------------------------------------------------------------
  def state(self) -> dict[str, Any]:
    """JSON-able state, saved with each checkpoint."""
    return {"next": self.next, "slot_topic": list(self.slot_topic), "slot_tokens": list(self.slot_tokens),
            "done": list(self.done), "order": list(self.order)}

  def restore(self, s: Mapping[str, Any]) -> None:
    """Restores a `state()`; refuses one from different topics or slots."""
    if list(s["order"]) != self.order or len(s["slot_topic"]) != self.n_slots:
      raise MixieError("scheduler state in the checkpoint does not match this run's topics/slots "
                       "(the dataset, budgets or train.slots changed since it was saved)")
    self.next = int(s["next"])
    self.slot_topic = [int(t) for t in s["slot_topic"]]
    self.slot_tokens = [int(t) for t in s["slot_tokens"]]
    self.done = [int(t) for t in s["done"]]

  # --- scheduling ------------------------------------------------------------------------------------
  @property
  def finished(self) -> bool:
    """Every topic trained to its budget (and released)."""
    return self.next >= len(self.order) and all(t < 0 for t in self.slot_topic)

  def fill(self) -> dict[int, int]:
    """Assigns queued topics to empty slots; returns {slot: topic} of the new assignments."""
    new = {}
    for e in range(self.n_slots):
      if self.slot_topic[e] < 0 and self.next < len(self.order):
        t = self.order[self.next]
        self.next += 1
        self.slot_topic[e], self.slot_tokens[e] = t, 0
        new[e] = t
    return new

  def add_tokens(self, tokens_e: Sequence[int]) -> list[int]:
    """Counts a step's tokens per slot; returns the slots whose expert reached its budget."""
    out = []
    for e, n in enumerate(np.asarray(tokens_e).tolist()):
      t = self.slot_topic[e]
      if t < 0:
        continue
      self.slot_tokens[e] += int(n)
      if self.slot_tokens[e] >= self.budgets[t]:
        out.append(e)
    return out

  def release(self, e: int) -> int:
    """Marks slot e's expert done and empties the slot; returns its topic."""
    t = self.slot_topic[e]
    check(t >= 0, f"slot {e} holds no expert")
    self.done.append(t)
    self.slot_topic[e] = -1
    return t

  def horizon_steps(self, topic: int, tokens_per_step: int) -> int:
    """Steps the expert of `topic` needs at `tokens_per_step` (its LR schedule's horizon)."""
    return max(1, math.ceil(self.budgets[topic] / max(1, tokens_per_step)))

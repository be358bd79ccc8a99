"""Routing prefix P in (8, 16, 32, 64): the tokens sweep's middle point evaluated again, routing every
held-out document on its first P tokens and scoring the tokens after them, all P on the same documents
(those longer than 64 tokens). An evaluation-only point: its experts and baselines are tok_<n>'s.
Arg: the variant (see configs/sweeps/common.py). CPU time: one evaluation, ~4 min (plus tok_<n> when
the tokens sweep has not trained it yet).
"""

from configs.sweeps import common


def get_config(arg: str = ""):
  """The prefix sweep of variant `arg`."""

  def points(flags):
    return [("prefix", {**common.tok(common.mid_budget(flags)), "eval.prefix_tokens": (8, 16, 32, 64)})]

  return common.sweep("prefix", arg, points, x="eval.prefix_tokens", series=())

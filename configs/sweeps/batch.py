"""Rows per step at the middle budget: is the experts' deficit the noise of their small batches? Each
expert trains on 2 rows per step (the CPU variants), lora_all on all slots' rows at once (6 x 2 = 12), for
the same number of steps. The point `slots_1` trains one slot at a time: the experts one after another
(each still on 2 rows per step: a replication of tok_<n>'s experts under another slot layout) and
lora_all on 2 rows per step, six times the steps, the same tokens. If lora_all still beats the experts at
the experts' own batch, batch noise is not the reason. Baselines: lora_all only. Arg: the variant (see
configs/sweeps/common.py). CPU time: ~15 min (slots = 6 is the tokens sweep's tok_8192).
"""

from configs.sweeps import common


def get_config(arg: str = ""):
  """The batch sweep of variant `arg`."""

  def points(flags):
    n = common.mid_budget(flags)
    return [(f"tok_{n}", common.tok(n)),
            ("slots_1", {**common.tok(n), "train.slots": 1, "train.baselines": ("lora_all",)})]

  return common.sweep("batch", arg, points, x="train.slots", series=())

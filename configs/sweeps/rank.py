"""LoRA rank r in (4, 8, 16) at the middle budget, alpha = 2r (the LoRA scale stays 2); lora_all_wide is
then at rank 6r. Arg: the variant (see configs/sweeps/common.py). CPU time: ~40 min (r = 8 is the
tokens sweep's tok_8192; r = 4 and 16 each train ~3 x 49k tokens and are evaluated).
"""

from configs.sweeps import common


def get_config(arg: str = ""):
  """The rank sweep of variant `arg`."""

  def points(flags):
    n = common.mid_budget(flags)
    # r = 8 is the tokens sweep's point of the same budget (the same name and overrides: one run)
    return [(f"rank_{r}", {**common.tok(n, full=False), "lora.rank": r, "lora.alpha": 2.0 * r}) if r != 8 else
            (f"tok_{n}", common.tok(n)) for r in (4, 8, 16)]

  return common.sweep("rank", arg, points, x="lora.rank", series=())

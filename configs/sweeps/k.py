"""Number of topics k in (3, 6, 12) at a fixed total token budget (6 x the middle budget: 49,152 tokens on
a CPU), so each expert gets total / k tokens. The slots (6) and rows per step stay those of every other
sweep, so lora_all and lora_all_wide train the same way at every k (k = 12 takes two waves of experts).
Arg: the variant (see configs/sweeps/common.py). CPU time: ~35 min (k = 6 is the tokens sweep's
tok_8192, reused as it is; k = 3 and 12 each cluster the corpus again and train ~4 x 49k tokens).
"""

from configs.sweeps import common


def get_config(arg: str = ""):
  """The k sweep of variant `arg`."""

  def points(flags):
    total = 6 * common.mid_budget(flags)
    # k = 6 is the tokens sweep's point of the same budget (the same name and overrides: one run)
    return [(f"k_{k}", {"cluster.k": k, **common.tok(total // k, full=False)}) if k != 6 else
            (f"tok_{total // 6}", common.tok(total // 6)) for k in (3, 6, 12)]

  return common.sweep("k", arg, points, x="cluster.k", series=())

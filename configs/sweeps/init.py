"""How experts start: from scratch, or branched from a seed adapter trained on a fraction f of the same
total tokens (f in 0.25, 0.5, 0.75), at the middle budget. Arg: the variant (see
configs/sweeps/common.py). CPU time: ~15 min (scratch and f = 0.5 are the tokens sweep's tok_8192 and
tok_8192_seed; f = 0.25 and 0.75 each train 49k tokens and are evaluated).
"""

from configs.sweeps import common


def get_config(arg: str = ""):
  """The init sweep of variant `arg`."""

  def points(flags):
    n = common.mid_budget(flags)
    return [(f"tok_{n}", common.tok(n))] + [
        (f"tok_{n}_seed" if f == 0.5 else f"tok_{n}_seed{int(f * 100)}", common.seed_tok(n, f))
        for f in (0.25, 0.5, 0.75)]

  return common.sweep("init", arg, points, x="train.seed_fraction", series=("train.init",))

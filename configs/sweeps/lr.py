"""Peak learning rate at the middle budget, the experts and lora_all alike: the variant's lr divided and
multiplied by 3 (1e-3, 3e-3, 9e-3 on a CPU). Was one lr fair to both rows, whose batches differ (2 rows
per expert per step, 12 for lora_all)? Read each row's best lr off its end-of-training loss (`train_loss`
in the table: every step trains on new data), never off the held-out perplexity the table also shows.
Baselines: lora_all only (lora_all_wide is not the question here). Arg: the variant (see
configs/sweeps/common.py). CPU time: ~20 min (the middle lr is the tokens sweep's tok_8192; the two
others each train ~2 x 49k tokens and are evaluated).
"""

from configs.sweeps import common


def get_config(arg: str = ""):
  """The learning-rate sweep of variant `arg`."""

  def points(flags):
    n, lr = common.mid_budget(flags), float(common.run_base(flags).train.lr)
    # a diverged run is a result here (the lr is too high), marked in the table, not a failed point
    return [(f"lr_{f * lr:g}", {**common.tok(n), "train.lr": f * lr, "train.baselines": ("lora_all",),
                                "train.allow_divergence": True})
            if f != 1 else (f"tok_{n}", common.tok(n)) for f in (1 / 3, 1, 3)]

  return common.sweep("lr", arg, points, x="train.lr", series=())

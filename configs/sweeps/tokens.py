"""Tokens per expert: where (if anywhere) routed experts beat one LoRA on all data at equal tokens.

Points: `tok_<n>` trains the experts from scratch at n tokens per expert (2k to 32k on a CPU), with
lora_all and lora_all_wide on the same total tokens; `tok_<n>_seed` branches the experts from a seed
adapter trained on half of that total (train.seed_fraction = 0.5), at three of the budgets.
Arg: the variant ("", "stdlib", "accel", "tinyllama"; see configs/sweeps/common.py).

CPU time (2-core machine, measured rates of the whole-corpus presweep: ~185 tokens/s for the experts,
~200 for lora_all, evaluation of 200 documents ~3.5 min per point): ~2.5 h in all; the names match the
presweep's points/tok_<n>/, which `--adopt` takes over (then ~1.3 h remains: lora_all_wide, the seed
rows and the evaluations).
"""

from configs.sweeps import common


def get_config(arg: str = ""):
  """The tokens sweep of variant `arg`."""

  def points(flags):
    out = [(f"tok_{n}", common.tok(n)) for n in common.budgets(flags)]
    b = common.budgets(flags)
    out += [(f"tok_{n}_seed", common.seed_tok(n)) for n in (b[0], b[len(b) // 2], b[-1])]
    return out

  return common.sweep("tokens", arg, points, x="train.tokens_per_expert", series=("train.init",))

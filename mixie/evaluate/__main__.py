"""`python -m mixie.evaluate --config=configs/demo.py [--workdir=DIR | --config.workdir=DIR]`.

Prefix-routed held-out perplexity of the run in the work directory (base, baselines, routed experts
per mode, oracle; one table per P in `eval.prefix_tokens`); prints the tables and writes
`workdir/eval/results.json`, `per_doc.npz` and `ppl.png`. See `mixie.evaluate.run`.
"""

from __future__ import annotations

from absl import app

from mixie.cli import config_from_flags
from mixie.errors import run_cli


@run_cli
def main(argv) -> int:
  """CLI entry: prefix-routed held-out perplexity of the work directory's experts."""
  config = config_from_flags(argv)
  from mixie.evaluate.run import evaluate, format_table, validate_eval_config

  validate_eval_config(config)  # before the base is loaded
  print(format_table(evaluate(config)))
  return 0


if __name__ == "__main__":
  app.run(main)

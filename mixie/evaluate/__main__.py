"""`python -m mixie.evaluate --config=configs/demo.py [--workdir=DIR | --config.workdir=DIR]`.

Prefix-routed held-out perplexity of the run in the work directory (base, baselines, routed experts
per mode, oracle; one table per P in `eval.prefix_tokens`); prints the tables and writes
`workdir/eval/results.json`, `per_doc.npz` and `ppl.png`. See `mixie.evaluate.run`.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from mixie.errors import ConfigError, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (overrides config.workdir)")


@run_cli
def main(argv) -> int:
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    raise ConfigError("--config is required (e.g. --config=configs/demo.py)")
  if _WORKDIR.value:
    config.workdir = _WORKDIR.value
  from mixie.evaluate.run import evaluate, format_table, validate_eval_config

  validate_eval_config(config)  # before the base is loaded
  print(format_table(evaluate(config)))
  return 0


if __name__ == "__main__":
  app.run(main)

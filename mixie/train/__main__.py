"""`python -m mixie.train --config=configs/demo.py [--workdir=DIR | --config.workdir=DIR]`.

Runs what is missing in the work directory, trains the experts and the baselines (resuming from the
last checkpoint), and prints the held-out perplexity table; see `mixie.train.main`. SIGTERM saves a
checkpoint and exits 0; rerun the same command to continue.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from mixie.errors import ConfigError, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py:tiny",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (overrides config.workdir)")


@run_cli
def main(argv) -> int:
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # no INFO lines from jax/orbax/tfds
  config = _CONFIG.value
  if config is None:
    raise ConfigError("--config is required (e.g. --config=configs/demo.py)")
  if _WORKDIR.value:
    config.workdir = _WORKDIR.value
  from mixie.train.main import run

  run(config)
  return 0


if __name__ == "__main__":
  app.run(main)

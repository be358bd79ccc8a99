"""`python -m mixie.cluster --config=configs/demo.py [--workdir=DIR]`: embed, cluster, write the dataset.

Runs only the steps whose output is missing (see `mixie.cluster.topics`) and prints a JSON summary.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from mixie.cluster.topics import run_cluster, summary_line
from mixie.errors import run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py:tiny",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (overrides config.workdir)")


@run_cli
def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # no INFO lines from jax/tfds
  config = _CONFIG.value
  if config is None:
    from mixie.errors import ConfigError
    raise ConfigError("--config is required (e.g. --config=configs/demo.py)")
  if _WORKDIR.value:
    config.workdir = _WORKDIR.value
  summary = run_cluster(config)
  print(summary_line(summary), flush=True)
  print(json.dumps(summary, indent=2, default=str), flush=True)


if __name__ == "__main__":
  app.run(main)

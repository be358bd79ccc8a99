"""`python -m mixie.train --config=configs/demo.py [--workdir=DIR | --config.workdir=DIR]`.

Runs what is missing in the work directory, trains the experts and the baselines (resuming from the
last checkpoint), and prints the held-out perplexity table; see `mixie.train.main`. SIGTERM saves a
checkpoint and exits 0; rerun the same command to continue.
"""

from __future__ import annotations

from absl import app

from mixie.cli import config_from_flags
from mixie.errors import run_cli


@run_cli
def main(argv) -> int:
  """CLI entry: runs every missing stage of the config (topics, experts, evaluation)."""
  config = config_from_flags(argv)
  from mixie.train.main import run

  run(config)
  return 0


if __name__ == "__main__":
  app.run(main)

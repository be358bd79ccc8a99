"""What every `python -m mixie.<stage>` CLI shares: the `--config` / `--workdir` flags and their reading.

Importing this module defines the two absl flags once per process; a CLI then calls `config_from_flags`.
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from mixie.distributed import maybe_initialize
from mixie.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file[:arg], e.g. configs/demo.py:tiny; override fields with "
    "--config.section.field=value", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (overrides config.workdir)")


def config_from_flags(argv):
  """The config from `--config` (with overrides) and `--workdir`; ConfigError on stray args or none.

  Also quiets INFO logging from jax/orbax/tfds, and starts the multi-process runtime when this process
  is one of a multi-process run (`mixie.distributed.maybe_initialize`), before any device is touched.
  """
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  maybe_initialize()
  config = _CONFIG.value
  if config is None:
    raise ConfigError("--config is required (e.g. --config=configs/demo.py)")
  if _WORKDIR.value:
    config.workdir = _WORKDIR.value
  return config

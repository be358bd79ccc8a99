"""`python -m mixie.import --config=... --adapter DIR [--adapter DIR ...] [--docs FILE ...] [--workdir DIR]`.

Brings PEFT LoRA adapters trained elsewhere into the run's expert store as experts with new topic ids;
`--docs` (one per adapter, in order: .jsonl, .txt with one document per line, or a directory of .txt)
gives each its routing centroid. See `mixie.interop`. (The module is named `import`, a Python keyword:
run it with `python -m`, or call `mixie.interop.import_run`.)
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from mixie.errors import ConfigError, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py:tiny",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (overrides config.workdir)")
_ADAPTER = flags.DEFINE_multi_string("adapter", [], "a PEFT LoRA adapter directory (repeatable)")
_DOCS = flags.DEFINE_multi_string("docs", [], "documents of the adapter at the same position "
                                  "(.jsonl / .txt / directory of .txt); optional for mixie exports")


@run_cli
def main(argv) -> int:
  """The CLI entry point (see the module docstring)."""
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    raise ConfigError("--config is required (e.g. --config=configs/demo.py)")
  if _WORKDIR.value:
    config.workdir = _WORKDIR.value
  from mixie.interop import import_run

  import_run(config, _ADAPTER.value, _DOCS.value)
  return 0


if __name__ == "__main__":
  app.run(main)

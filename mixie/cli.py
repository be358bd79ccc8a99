"""What every `python -m mixie.<stage>` CLI shares: the `--config` / `--workdir` flags, their reading, and
how a CLI runs (`run`).

Every stage is a package with a `__main__.py` that defines `main(argv)` and ends with
`if __name__ == "__main__": cli.run(main)`. A mistake on the command line (an unknown flag, a typo in a
config override such as `--config.train.slotz=3`, a value of the wrong type, a config file that does not
load) and every `MixieError` end as one line `mixie: error: <message>` on stderr and exit status 2.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from mixie.errors import ConfigError, exit_with_error, run_cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file[:arg], e.g. configs/demo.py:tiny; override fields with "
    "--config.section.field=value", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "work directory (overrides config.workdir)")
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"\?')


def config_from_flags(argv, *, positional: int = 0):
  """The config from `--config` (with overrides) and `--workdir`; ConfigError on a config that does not
  load, on none, or on more than `positional` positional arguments.

  Also quiets INFO logging from jax/orbax/tfds.
  """
  if len(argv) > 1 + positional:
    raise ConfigError(f"unexpected arguments: {argv[1 + positional:]}")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    raise ConfigError("--config is required (e.g. --config=configs/demo.py)")
  try:
    config.keys()  # a config file that failed to load raises its error here (ml_collections defers it)
  except Exception as e:  # whatever loading the file raised (OSError, SyntaxError, ...)
    last = [line.strip() for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
    raise ConfigError(f"--config: {last[0]}") from None
  if _WORKDIR.value:
    config.workdir = _WORKDIR.value
  return config


def flag_error_message(argv: Sequence[str], e: BaseException) -> str:
  """One line saying what is wrong with the command line `argv`, from the exception absl or
  ml_collections raised while parsing it; a misspelt config field names the override and the field
  it was probably meant to be."""
  while e.args and isinstance(e.args[0], BaseException):  # ml_collections wraps its KeyError
    e = e.args[0]
  text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
  m = _DID_YOU_MEAN.search(text)
  if m:
    right, wrong = m.groups()
    for a in argv[1:]:
      path = a.lstrip("-").split("=", 1)[0].split(".")
      if a.startswith("--config.") and wrong in path[1:]:
        parent = ".".join(path[:path.index(wrong, 1)])
        return f"{a}: {parent} has no field {wrong!r} (did you mean {right!r}?)"
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):  # a config file raised: its first and last line
    lines = [lines[0], lines[-1]]
  return " ".join(lines) or type(e).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with any mistake on the command line ending as one `mixie: error:` line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl and ml_collections raise many types (flags.Error, KeyError, ...) for these
    exit_with_error(flag_error_message(argv, e))


def run(main: Callable[[list[str]], int | None]) -> None:
  """Runs a CLI's `main(argv)` (see the module docstring); its return value is the exit status."""
  app.run(run_cli(main), flags_parser=parse_flags)

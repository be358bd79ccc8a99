"""User-facing errors: one clear message, no traceback noise.

Anything a user can cause (missing file, bad config value, corrupt checkpoint, empty corpus) raises
`MixieError`. CLIs wrap their entry point in `run_cli`, which prints the message and exits with status 2.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable


class MixieError(Exception):
  """An error the user can fix; its message says what and where (file, tensor, config field)."""


class ConfigError(MixieError):
  """A bad configuration value; the message names the field."""


def check(cond: bool, msg: str, cls: type[MixieError] = MixieError) -> None:
  """Raises `cls(msg)` unless `cond`."""
  if not cond:
    raise cls(msg)


def run_cli(main: Callable[..., int | None]) -> Callable[..., int | None]:
  """Decorates a CLI main: a `MixieError` becomes `mixie: error: <message>` on stderr and exit code 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except MixieError as e:
      print(f"mixie: error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  return wrapped

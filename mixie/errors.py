"""User-facing errors: one clear message, no traceback noise.

Anything a user can cause (missing file, bad config value, corrupt checkpoint, empty corpus) raises
`MixieError`. CLIs wrap their entry point in `run_cli`, which prints the message and exits with status 2.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn


class MixieError(Exception):
  """An error the user can fix; its message says what and where (file, tensor, config field)."""


class ConfigError(MixieError):
  """A bad configuration value; the message names the field."""


def check(cond: bool, msg: str, cls: type[MixieError] = MixieError) -> None:
  """Raises `cls(msg)` unless `cond`."""
  if not cond:
    raise cls(msg)


def exit_with_error(message: str) -> NoReturn:
  """Prints `mixie: error: <message>` on stderr and exits with status 2 (what a user's error ends in)."""
  print(f"mixie: error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def run_cli(main: Callable[..., int | None]) -> Callable[..., int | None]:
  """Decorates a CLI main: a `MixieError` ends as `exit_with_error(message)`."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except MixieError as e:
      exit_with_error(str(e))

  return wrapped

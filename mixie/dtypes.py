"""The one list of floating-point dtypes a base may be stored in and computed in (`model.dtype`,
`model.param_dtype`), shared by the loader and the config checks of every stage."""

from __future__ import annotations

from mixie.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def check_model_dtypes(model_cfg) -> None:
  """Raises `ConfigError` naming `model.dtype` / `model.param_dtype` when either is not in `DTYPES`."""
  for field in ("dtype", "param_dtype"):
    if model_cfg[field] not in DTYPES:
      raise ConfigError(f"model.{field} must be one of {DTYPES}, got {model_cfg[field]!r}")

"""Multi-host start-up, gated so single-host and CPU runs are unaffected.

`launch/tpu.py` sets `MIXIE_DISTRIBUTED=1` on multi-host TPU slices; then `maybe_initialize()` calls
`jax.distributed.initialize()` (which discovers the coordinator on Cloud TPU by itself). Call it before
anything touches a device.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize() -> bool:
  """Initialises JAX's multi-host runtime when `MIXIE_DISTRIBUTED=1`; returns whether it did."""
  if os.environ.get("MIXIE_DISTRIBUTED", "") not in ("1", "true", "yes"):
    return False
  jax.distributed.initialize()
  return True


def is_main_process() -> bool:
  """True on process 0, the one that writes metrics, logs and the expert store."""
  return jax.process_index() == 0

"""Multi-process runs through JAX's multi-controller runtime, gated so single-process runs are unaffected.

Every process of a run executes the same program on its share of the devices (`jax.devices()` are
global, `jax.local_devices()` this process's); global arrays are assembled from what each process holds.
The start-up is gated by `MIXIE_DISTRIBUTED=1`:

- on a multi-host TPU slice (`launch/tpu.py`), `jax.distributed.initialize()` finds the coordinator, the
  process count and this process's id by itself;
- on one machine (`launch/local.py`), the launcher also sets `JAX_COORDINATOR_ADDRESS` (read by JAX),
  `MIXIE_NUM_PROCESSES` and `MIXIE_PROCESS_ID` (passed on here), and the CPU settings JAX reads from its
  own environment variables: `JAX_PLATFORMS=cpu`, `JAX_NUM_CPU_DEVICES` (devices per process) and
  `JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo` (collectives between processes).

`maybe_initialize()` runs in every CLI before anything touches a device (`mixie.cli`). The helpers below
are what the stages use to stay correct with several processes: who writes (`is_main_process`), waiting
for the writer (`barrier`, `on_main`), and moving host data between processes (`to_host`,
`allgather_rows`, `allgather_strings`, `broadcast_json`).
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any, Callable

import jax
import numpy as np

from mixie.errors import ConfigError, MixieError

ENV_FLAG = "MIXIE_DISTRIBUTED"  # "1": start the multi-controller runtime
ENV_NUM_PROCESSES = "MIXIE_NUM_PROCESSES"  # set by launch/local.py (TPU slices find it themselves)
ENV_PROCESS_ID = "MIXIE_PROCESS_ID"  # set by launch/local.py
ENV_FAULT = "MIXIE_FAULT_KILL"  # "P:S": process P dies after step S (tests only; `fault_point`)


def enabled() -> bool:
  """Whether this process was started as one of a multi-process run (`MIXIE_DISTRIBUTED=1`)."""
  return os.environ.get(ENV_FLAG, "") in ("1", "true", "yes")


def maybe_initialize() -> bool:
  """Starts JAX's multi-controller runtime when `MIXIE_DISTRIBUTED=1` (once); returns whether it runs.

  Explicit settings from the environment (`launch/local.py`) are passed on; without them JAX detects
  the cluster (Cloud TPU, Slurm, Open MPI).
  """
  if not enabled():
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if os.environ.get(ENV_NUM_PROCESSES):
    kwargs = {"num_processes": int(os.environ[ENV_NUM_PROCESSES]),
              "process_id": int(os.environ[ENV_PROCESS_ID])}
  jax.distributed.initialize(**kwargs)
  return True


def is_main_process() -> bool:
  """True on process 0, the one that writes the expert store, metrics, tables and plots."""
  return jax.process_index() == 0


def multi_process() -> bool:
  """Whether more than one process runs this program."""
  return jax.process_count() > 1


def barrier(name: str) -> None:
  """Waits until every process reached the barrier `name` (no-op with one process). Used after process 0
  wrote files that the others read next."""
  if multi_process():
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _spread(x) -> bool:
  return isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated


def to_host(tree):
  """A (global) array, or a pytree of them, as numpy on every process: arrays spread over other
  processes' devices are all-gathered in one call (every process must call this with the same tree)."""
  leaves, treedef = jax.tree.flatten(tree)
  spread = [i for i, x in enumerate(leaves) if _spread(x)]
  if spread:
    from jax.experimental import multihost_utils
    got = multihost_utils.process_allgather([leaves[i] for i in spread], tiled=True)
    for i, g in zip(spread, got):
      leaves[i] = g
  return jax.tree.unflatten(treedef, [np.asarray(jax.device_get(x)) for x in leaves])


def shard_range(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
  """The contiguous `[lo, hi)` share of `n` items that process `index` of `count` handles (balanced:
  the first `n % count` processes get one more)."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  base, extra = divmod(n, count)
  lo = index * base + min(index, extra)
  return lo, lo + base + (index < extra)


def allgather_rows(local: np.ndarray) -> np.ndarray:
  """Concatenates every process's rows (same trailing shape and dtype, any number of rows), in process
  order; with one process, `local` itself."""
  local = np.asarray(local)
  if not multi_process():
    return local
  if local.dtype == np.bool_:  # gathered as bytes
    return allgather_rows(local.astype(np.uint8)).astype(bool)
  from jax.experimental import multihost_utils
  counts = np.asarray(multihost_utils.process_allgather(np.asarray([local.shape[0]], np.int64)))
  counts = counts.reshape(-1)
  if counts.max() == 0:
    return local
  pad = np.zeros((int(counts.max()) - local.shape[0],) + local.shape[1:], local.dtype)
  rows = np.asarray(multihost_utils.process_allgather(np.concatenate([local, pad]), tiled=False))
  return np.concatenate([rows[p, :int(c)] for p, c in enumerate(counts)])


def allgather_strings(local: list[str]) -> list[str]:
  """Every process's strings concatenated in process order (UTF-8 through `allgather_rows`)."""
  if not multi_process():
    return list(local)
  blobs = [s.encode("utf-8") for s in local]
  lens = allgather_rows(np.asarray([len(b) for b in blobs], np.int64))
  data = allgather_rows(np.frombuffer(b"".join(blobs), np.uint8))
  ends = np.cumsum(lens)
  return [bytes(data[e - n:e]).decode("utf-8") for n, e in zip(lens.tolist(), ends.tolist())]


def broadcast_json(obj=None):
  """Process 0's JSON-able `obj` on every process (the others' argument is ignored)."""
  if not multi_process():
    return obj
  from jax.experimental import multihost_utils
  blob = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8) if is_main_process() else None
  n = multihost_utils.broadcast_one_to_all(np.asarray([0 if blob is None else blob.size], np.int64))
  buf = blob if blob is not None else np.zeros(int(n[0]), np.uint8)
  out = multihost_utils.broadcast_one_to_all(buf)
  return json.loads(bytes(np.asarray(out, np.uint8)).decode("utf-8"))


def on_main(fn: Callable[[], Any]) -> Any:
  """Runs `fn()` on process 0 only and returns its (JSON-able) result on every process, which wait for
  it. A `MixieError` raised there is raised on every process (same class and message), so all of them
  stop with the same clear message. With one process: `fn()`."""
  if not multi_process():
    return fn()
  out = None
  if is_main_process():
    try:
      out = {"ok": fn()}
    except MixieError as e:
      out = {"error": str(e), "config": isinstance(e, ConfigError)}
  out = broadcast_json(out)
  if "error" in out:
    raise (ConfigError if out["config"] else MixieError)(out["error"])
  return out["ok"]


def fault_point(step: int, flush: Callable[[], None]) -> None:
  """Fault injection for the resumption tests, off unless `MIXIE_FAULT_KILL="P:S"` is set: once step S
  ran, every process flushes (`flush`: waits for pending checkpoint writes) and meets at a barrier, so
  which checkpoint exists is known; then process P SIGKILLs itself, as a host that dies (no clean-up)."""
  spec = os.environ.get(ENV_FAULT)
  if not spec:
    return
  proc, at = (int(v) for v in spec.split(":"))
  if step != at:
    return
  flush()
  barrier(f"mixie_fault_{step}")
  if jax.process_index() == proc:
    os.kill(os.getpid(), signal.SIGKILL)

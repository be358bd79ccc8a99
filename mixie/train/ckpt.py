"""Train checkpoints with orbax `CheckpointManager`: the sharded train state plus a JSON of host state.

A checkpoint at step n holds everything needed to continue exactly: slot parameters and optimizer state
(orbax/tensorstore, each process writing its own shards), and a JSON item with the data-loader state,
the expert-scheduler state and the step. Restoring takes an abstract target whose leaves carry the
shardings of the *current* mesh, so a run saved on one device count continues on another.
Orbax writes into a temporary directory and renames it when complete: a killed save is never restored.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from mixie.errors import MixieError
from mixie.io import PathLike, path as _path


class TrainCheckpointer:
  """Saves and restores `(train_state, host_state)` pairs under `directory/<step>`."""

  def __init__(self, directory: PathLike, max_to_keep: int = 2):
    self.dir = _path(directory)
    self._mgr = ocp.CheckpointManager(
        self.dir, item_names=("state", "host"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             cleanup_tmp_directories=True,  # a killed save's leftovers
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._mgr.latest_step()

  def save(self, step: int, state: Any, host: dict[str, Any]) -> None:
    """Starts saving (asynchronously once the arrays are on the host); `wait` blocks until written."""
    self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 host=ocp.args.JsonSave(host)), force=True)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._mgr.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The state of `step` in the shardings carried by `abstract_state` (ShapeDtypeStructs), and the
    host JSON."""
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                            host=ocp.args.JsonRestore()))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise MixieError(f"{self.dir / str(step)}: cannot restore this checkpoint into the current setup "
                       f"({type(e).__name__}: {str(e)[:300]}); delete it to start over") from None
    return out["state"], out["host"]

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._mgr.wait_until_finished()
    self._mgr.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """`ShapeDtypeStruct`s of `abstract` carrying `shardings` (the restore target)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

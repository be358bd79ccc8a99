"""Training metrics: one JSON line per logged step (per expert inside), and TensorBoard when installed.

Only process 0 writes. On resume, lines of steps after the restored checkpoint (written by the run
that was interrupted) are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax

from mixie.io import PathLike, atomic_write_text, note_write, path as _path


class MetricsWriter:
  """Appends JSON lines to `path`; mirrors scalars to TensorBoard (`tb_dir`) when `tensorboard` exists."""

  def __init__(self, path: PathLike, tb_dir: PathLike | None = None):
    self.path = _path(path)
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled and tb_dir is not None:
      try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        import tensorboard  # noqa: F401
        self._tb = SummaryWriter(str(tb_dir))
      except ImportError:
        self._tb = None

  def truncate_after(self, mode: str, step: int) -> None:
    """Drops the lines of `mode` with a step > `step` (left by an interrupted run)."""
    if not self.enabled or not self.path.exists():
      return
    keep = []
    for line in self.path.read_text().splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a kill
      if rec.get("mode") == mode and rec.get("step", 0) > step:
        continue
      keep.append(line)
    atomic_write_text(self.path, "".join(l + "\n" for l in keep))

  def write(self, rec: Mapping[str, Any]) -> None:
    """Appends one record to the JSONL file (and its scalars to TensorBoard); no-op off process 0."""
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    note_write(self.path)
    with self.path.open("a") as f:
      f.write(json.dumps(rec, sort_keys=True) + "\n")
    if self._tb is not None:
      step = int(rec.get("step", 0))
      for k, v in rec.items():
        if isinstance(v, (int, float)) and k != "step":
          self._tb.add_scalar(f"{rec.get('mode', 'train')}/{k}", v, step)

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer, if any."""
    if self._tb is not None:
      self._tb.close()

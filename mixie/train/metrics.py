"""Training metrics: one JSON line per logged step (per expert inside), and TensorBoard when installed.

The TensorBoard mirror is written by `tensorboardX` (no TensorFlow, no torch); without it the mirror is
skipped with one log line and `metrics.jsonl` holds everything. Only process 0 writes. On resume, lines of steps after the restored checkpoint (written by the run
that was interrupted) are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Mapping

from mixie.distributed import is_main_process
from mixie.io import PathLike, atomic_write_text, path as _path


def tensorboard_writer_class():
  """`tensorboardX.SummaryWriter`, imported without torch; None when tensorboardX is not installed.

  tensorboardX's writer module tries `import torch` at import time (only to widen a type check), which
  would pull all of torch into a JAX job wherever torch happens to be installed: that import is made to
  fail for the duration, unless torch is already loaded.
  """
  block = "torch" not in sys.modules
  if block:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
  try:
    from tensorboardX import SummaryWriter  # deferred: optional dependency
  except ImportError:
    return None
  finally:
    if block:
      del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Appends JSON lines to `path`; mirrors scalars to TensorBoard event files in `tb_dir` when
  tensorboardX is installed (else says so once through `log`)."""

  def __init__(self, path: PathLike, tb_dir: PathLike | None = None, log: Callable[[str], Any] = print):
    self.path = _path(path)
    self.enabled = is_main_process()
    self._tb = None
    if self.enabled and tb_dir is not None:
      cls = tensorboard_writer_class()
      if cls is None:
        log(f"mixie.train: TensorBoard mirror off (tensorboardX is not installed); metrics go to {self.path}")
      else:
        self._tb = cls(str(tb_dir))

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

"""Training metrics: one JSON line per logged step (per expert inside), and TensorBoard when installed.

The TensorBoard mirror is written by `tensorboardX` (no TensorFlow, no torch); without it the mirror is
skipped with one log line and `metrics.jsonl` holds everything. Only process 0 writes. On resume,
lines of steps after the restored checkpoint (written by the run that was interrupted) are dropped, so
the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Mapping

import numpy as np

from mixie.distributed import is_main_process
from mixie.io import PathLike, atomic_write_text, note_write, path as _path


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
        note_write(tb_dir)  # tensorboardX writes its event files itself
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


def read_curves(path: PathLike) -> dict[str, dict[int, dict[str, np.ndarray]]] | None:
  """The training curves of a `metrics.jsonl`: `{mode: {topic: {"step", "tokens", "loss", "lr",
  "grad_norm"}}}` (arrays in step order; `tokens` are the expert's cumulative tokens). Runs other than
  "experts" have one curve, under topic 0. None when the file does not exist; lines cut by a kill are
  skipped."""
  p = _path(path)
  if not p.exists():
    return None
  rows: dict[str, dict[int, list]] = {}
  for line in p.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if not isinstance(rec, dict) or "experts" not in rec:
      continue
    mode = str(rec.get("mode", "train"))
    for e in rec["experts"]:
      topic = int(e.get("topic", 0)) if mode == "experts" else 0
      rows.setdefault(mode, {}).setdefault(topic, []).append(
          (int(rec["step"]), int(e.get("tokens", 0)), float(e["loss"]), float(e.get("lr", np.nan)),
           float(e.get("grad_norm", np.nan))))
  out: dict[str, dict[int, dict[str, np.ndarray]]] = {}
  for mode, per in rows.items():
    out[mode] = {}
    for topic, r in sorted(per.items()):
      r.sort()
      a = np.asarray(r, np.float64)
      out[mode][topic] = {"step": a[:, 0].astype(np.int64), "tokens": np.cumsum(a[:, 1]).astype(np.int64),
                          "loss": a[:, 2], "lr": a[:, 3], "grad_norm": a[:, 4]}
  return out


def final_loss(curves: Mapping[int, Mapping[str, np.ndarray]], fraction: float = 0.25) -> float | None:
  """The training loss at the end of a run: over each curve's last `fraction` of steps (at least one),
  the mean loss weighted by the tokens of each step, pooled over the curves (the experts of a run).
  Every step trains on new data, so this is a held-out estimate on the training split: the number to
  choose hyper-parameters by. None without steps."""
  num = den = 0.0
  for c in curves.values():
    n = len(c["loss"])
    if not n:
      continue
    k = max(1, int(round(n * fraction)))
    step_tokens = np.diff(np.concatenate([[0], c["tokens"]]))[-k:]
    num += float(np.sum(c["loss"][-k:] * step_tokens))
    den += float(np.sum(step_tokens))
  return num / den if den else None

"""The metrics writer: JSON lines always; a TensorBoard mirror through tensorboardX (never torch) when
tensorboardX is installed, else one log line saying it is off."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the main job's module and the writer, two records, then what got loaded.
_SCRIPT = """
import json, sys
import mixie.train.main  # noqa: F401  (everything the main job imports at the top)
from mixie.train.metrics import MetricsWriter, tensorboard_writer_class
lines = []
w = MetricsWriter(sys.argv[1] + "/metrics.jsonl", tb_dir=sys.argv[1] + "/tb", log=lines.append)
w.write({"mode": "experts", "step": 1, "loss_mean": 2.5, "tokens": 64})
w.write({"mode": "experts", "step": 2, "loss_mean": 1.5, "tokens": 128})
w.close()
print(json.dumps({"torch": "torch" in sys.modules, "tensorflow": "tensorflow" in sys.modules,
                  "tbx": tensorboard_writer_class() is not None, "log": lines}))
"""


def _records(data: bytes):
  """The payloads of a TFRecord file (length, length crc, payload, payload crc)."""
  out, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(data[i + 12:i + 12 + n])
    i += 12 + n + 4
  return out


def test_metrics_mirror_without_torch(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert not got["torch"] and not got["tensorflow"]
  recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in recs] == [1, 2] and recs[1]["loss_mean"] == 1.5
  if not got["tbx"]:  # the mirror is optional: off, said once, nothing written
    assert len(got["log"]) == 1 and "TensorBoard mirror off" in got["log"][0]
    assert not (tmp_path / "tb").exists()
    return
  assert got["log"] == []
  from tensorboardX.proto.event_pb2 import Event  # the writer's own schema decodes what it wrote

  files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {}
  for payload in _records(files[0].read_bytes()):
    ev = Event.FromString(payload)
    for v in ev.summary.value:
      scalars[(v.tag, ev.step)] = v.simple_value
  assert scalars == {("experts/loss_mean", 1): 2.5, ("experts/tokens", 1): 64.0,
                     ("experts/loss_mean", 2): 1.5, ("experts/tokens", 2): 128.0}

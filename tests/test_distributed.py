"""`mixie.distributed`: the helpers alone (one process) and across 2 real processes (`launch/local.py`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from mixie import distributed as dist
from mixie.errors import ConfigError

SCRIPT = r'''
import json, sys
import jax
import numpy as np
from mixie import distributed as dist
from mixie.errors import ConfigError, MixieError
assert dist.maybe_initialize() and dist.multi_process()
p = jax.process_index()
out = {"rows": dist.allgather_rows(np.arange(2 + p) * 10 + p).tolist(),
       "mask": dist.allgather_rows(np.asarray([p == 0, True])).tolist(),
       "strings": dist.allgather_strings(["héllo", f"p{p}", ""]),
       "json": dist.broadcast_json({"from": p}),
       "main": dist.on_main(lambda: {"ran_on": jax.process_index()}),
       "share": list(dist.shard_range(11)),
       "devices": [len(jax.devices()), len(jax.local_devices())]}
sh = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("x",)),
                                jax.sharding.PartitionSpec("x"))
g = np.arange(16, dtype=np.float32)
x = jax.make_array_from_callback(g.shape, sh, lambda i: g[i])
out["to_host"] = dist.to_host({"a": x, "b": np.ones(2)})["a"].tolist()
print("RESULT " + json.dumps(out), flush=True)
def bad():
  raise ConfigError("train.slots: only process 0 looked")
try:
  dist.on_main(bad)
except ConfigError as e:
  print("RAISED " + str(e), flush=True)
'''


def test_one_process_helpers():
  assert not dist.multi_process() and dist.is_main_process()
  assert dist.on_main(lambda: 7) == 7
  x = np.arange(5)
  assert dist.allgather_rows(x) is x and dist.allgather_strings(["a"]) == ["a"]
  assert dist.broadcast_json({"a": 1}) == {"a": 1}
  np.testing.assert_array_equal(dist.to_host({"a": x})["a"], x)
  with pytest.raises(ConfigError, match="boom"):
    dist.on_main(lambda: (_ for _ in ()).throw(ConfigError("boom")))


@pytest.mark.parametrize("n,count", [(11, 2), (3, 4), (0, 3), (16, 4)])
def test_shard_range_partitions(n, count):
  parts = [dist.shard_range(n, i, count) for i in range(count)]
  assert parts[0][0] == 0 and parts[-1][1] == n
  assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
  sizes = [hi - lo for lo, hi in parts]
  assert max(sizes) - min(sizes) <= 1


def test_helpers_across_two_processes(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2", "--devices-per-process", "2",
         "--", sys.executable, "-c", SCRIPT]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout[-4000:]
  res = {int(l[2]): json.loads(l.split("RESULT ", 1)[1]) for l in r.stdout.splitlines() if "RESULT " in l}
  assert sorted(res) == [0, 1]
  for p, out in res.items():
    assert out["rows"] == [0, 10, 1, 11, 21]  # process order, uneven row counts
    assert out["mask"] == [True, True, False, True]
    assert out["strings"] == ["héllo", "p0", "", "héllo", "p1", ""]
    assert out["json"] == {"from": 0} and out["main"] == {"ran_on": 0}
    assert out["share"] == ([0, 6] if p == 0 else [6, 11])
    assert out["devices"] == [4, 2]
    assert out["to_host"] == list(range(16))
  raised = [l for l in r.stdout.splitlines() if "RAISED " in l]
  assert len(raised) == 2 and all(l.endswith("train.slots: only process 0 looked") for l in raised)

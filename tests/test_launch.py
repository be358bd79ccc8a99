"""The TPU launcher's dry run prints the full command sequence and runs nothing."""

import importlib.util
import pathlib
import shlex

import pytest

_spec = importlib.util.spec_from_file_location(
    "tpu_launch", pathlib.Path(__file__).parents[1] / "launch" / "tpu.py")
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)


def _dry(capsys, *argv):
  assert tpu.main([*argv, "--dry-run"]) == 0
  return [shlex.split(l[2:]) for l in capsys.readouterr().out.splitlines() if l.startswith("+ ")]


def test_v5e16_all_four_workers(capsys):
  cmds = _dry(capsys, "all", "--name", "m", "--zone", "us-west4-a", "--type", "v5litepod-16", "--spot",
              "--config", "configs/tinyllama_moin5k.py", "--workdir", "gs://b/run")
  verbs = [c[3:5] for c in cmds]
  assert verbs == [["tpu-vm", "create"], ["tpu-vm", "ssh"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"],
                   ["tpu-vm", "ssh"]]
  create, _, scp, install, run = cmds
  assert "--accelerator-type=v5litepod-16" in create and "--spot" in create
  assert "--worker=all" in scp and all("--worker=all" in c for c in cmds[1:])
  install_cmd = next(a for a in install if a.startswith("--command="))
  assert "jax[tpu]" in install_cmd and "--no-deps -r requirements-assets.txt" in install_cmd
  run_cmd = next(a for a in run if a.startswith("--command="))
  assert "MIXIE_DISTRIBUTED=1" in run_cmd  # 4 hosts: multi-host start
  assert "python3 -m mixie.train --config=configs/tinyllama_moin5k.py" in run_cmd
  assert "--config.workdir=gs://b/run" in run_cmd
  assert "train_$(hostname).log" in run_cmd and "restart" in run_cmd  # per-worker logs, restart loop
  assert tpu.hosts(tpu.parser().parse_args(["run", "--name", "m", "--zone", "z"])) == 4


def test_single_host_is_not_distributed(capsys):
  cmds = _dry(capsys, "run", "--name", "m", "--zone", "z", "--type", "v5litepod-8")
  assert len(cmds) == 1
  assert "MIXIE_DISTRIBUTED" not in " ".join(cmds[0])


def test_queued_resource_and_git(capsys):
  cmds = _dry(capsys, "all", "--name", "m", "--zone", "z", "--type", "v4-32", "--queued", "--git",
              "https://example.invalid/mixie.git")
  assert cmds[0][3:5] == ["queued-resources", "create"] and "--node-id=m" in cmds[0]
  assert any("git clone" in a for a in cmds[1])
  assert cmds[-1][3:5] == ["tpu-vm", "ssh"]


def test_unknown_type_needs_hosts():
  with pytest.raises(SystemExit):
    tpu.hosts(tpu.parser().parse_args(["run", "--name", "m", "--zone", "z", "--type", "v9-1"]))


def test_distributed_gate(monkeypatch):
  from mixie import distributed
  monkeypatch.delenv("MIXIE_DISTRIBUTED", raising=False)
  assert distributed.maybe_initialize() is False

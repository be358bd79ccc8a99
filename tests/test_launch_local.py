"""`launch/local.py`: the environment each process gets, prefixed output, failure propagation, SIGTERM
forwarding (children are small Python scripts, no JAX)."""

import importlib.util
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).parents[1]
LAUNCH = ROOT / "launch" / "local.py"
_spec = importlib.util.spec_from_file_location("local_launch", LAUNCH)
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)


def _launch(*args, **kw):
  return subprocess.Popen([sys.executable, str(LAUNCH), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kw)


def test_process_env_is_a_pod_workers_plus_the_local_coordinator():
  env = local.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1", "A": "b"},
                          1, 2, 4, 12345)
  assert env["MIXIE_DISTRIBUTED"] == "1" and env["MIXIE_NUM_PROCESSES"] == "2"
  assert env["MIXIE_PROCESS_ID"] == "1" and env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:12345"
  assert env["JAX_NUM_CPU_DEVICES"] == "4" and env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
  assert env["JAX_PLATFORMS"] == "cpu" and env["A"] == "b"
  assert env["XLA_FLAGS"] == "--xla_foo=1"  # the fake device count is per process now


def test_prefixed_output_and_log_files(tmp_path):
  code = "import os; print('hello from', os.environ['MIXIE_PROCESS_ID'])"
  p = _launch("--processes", "3", "--log-dir", str(tmp_path), "--", sys.executable, "-c", code)
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 0, out
  for i in range(3):
    assert f"[p{i}] hello from {i}" in out
    assert (tmp_path / f"process_{i}.log").read_text() == f"hello from {i}\n"


def test_one_failure_stops_the_others(tmp_path):
  code = ("import os, sys, time\n"
          "if os.environ['MIXIE_PROCESS_ID'] == '1': sys.exit(3)\n"
          "time.sleep(120)\n")
  t0 = time.time()
  p = _launch("--processes", "2", "--grace", "2", "--", sys.executable, "-c", code)
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 3, out
  assert time.time() - t0 < 30  # process 0 did not sleep its 120 s
  assert "process 1 exited with exit code 3; stopping the others" in out


def test_a_killed_process_gives_128_plus_signal():
  code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
  p = _launch("--processes", "1", "--", sys.executable, "-c", code)
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 128 + signal.SIGKILL, out
  assert "signal SIGKILL" in out


def test_sigterm_is_forwarded(tmp_path):
  code = ("import os, signal, sys, time, pathlib\n"
          "def bye(*_):\n"
          f"  pathlib.Path({str(tmp_path)!r}, 'saved_' + os.environ['MIXIE_PROCESS_ID']).write_text('ok')\n"
          "  sys.exit(0)\n"
          "signal.signal(signal.SIGTERM, bye)\n"
          "print('ready', flush=True)\n"
          "time.sleep(120)\n")
  p = _launch("--processes", "2", "--", sys.executable, "-c", code)
  ready = 0
  while ready < 2:  # both children installed their handler
    line = p.stdout.readline()
    assert line, "the launcher ended early"
    ready += "ready" in line
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 0, out
  assert sorted(f.name for f in tmp_path.iterdir()) == ["saved_0", "saved_1"]


def test_needs_a_command():
  assert local.main(["--processes", "2"]) == 2


def test_dry_run_prints_each_process(capsys):
  assert local.main(["--processes", "2", "--port", "999", "--dry-run", "--", "echo", "hi"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 and all(l.endswith("echo hi") for l in lines)
  assert "MIXIE_PROCESS_ID=1" in lines[1] and "JAX_COORDINATOR_ADDRESS=127.0.0.1:999" in lines[0]



def test_processes_do_not_block_when_the_output_is_gone(tmp_path):
  """The launcher's reader goes away (a closed pipe): the processes still run to the end."""
  code = ("import sys, pathlib\n"
          "for i in range(20000): print('x' * 100)\n"  # far more than a pipe buffer
          f"pathlib.Path({str(tmp_path)!r}, 'done_' + __import__('os').environ['MIXIE_PROCESS_ID']).touch()\n")
  p = _launch("--processes", "2", "--", sys.executable, "-c", code)
  p.stdout.readline()
  p.stdout.close()  # nobody reads the launcher any more
  assert p.wait(timeout=120) == 0
  assert sorted(f.name for f in tmp_path.iterdir()) == ["done_0", "done_1"]

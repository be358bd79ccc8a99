#!/usr/bin/env python3
"""Runs a command as N processes of one multi-process JAX job on this machine, the way a pod runs it.

    python launch/local.py --processes 2 --devices-per-process 4 -- \
        python -m mixie.train --config=configs/demo.py:tiny --workdir=/tmp/mp

Every process gets the environment a pod worker gets (`MIXIE_DISTRIBUTED=1`), plus what a single
machine needs to stand in for the pod: a coordinator on localhost (`JAX_COORDINATOR_ADDRESS`), the
process count and id (`MIXIE_NUM_PROCESSES`, `MIXIE_PROCESS_ID`, read by `mixie.distributed`), CPU
devices per process (`JAX_NUM_CPU_DEVICES`) and CPU collectives through gloo
(`JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo`). JAX's multi-controller runtime does the rest
(`jax.distributed.initialize`); this script only starts and watches processes.

- Output: every line of process i is printed with a `[pi] ` prefix; `--log-dir DIR` also writes
  `DIR/process_<i>.log` (unprefixed).
- Failures: when a process exits non-zero (or is killed), the others are sent SIGTERM, then SIGKILL
  after `--grace` seconds, and the launcher exits with the failed process's code (128 + signal for a
  signal). Collectives cannot finish without every process, so a job never limps on.
- SIGTERM / SIGINT to the launcher are forwarded to every process (a preemption: `mixie.train` saves a
  checkpoint and exits 0); a second one kills them.

Standard library only; `--dry-run` prints each process's environment and command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

FORCE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port that was free on localhost a moment ago (for the coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, index: int, count: int, devices: int, port: int) -> dict:
  """The environment of process `index` of `count`: `base` plus the multi-process settings. A fake
  device count in XLA_FLAGS (as the tests set) is dropped: `JAX_NUM_CPU_DEVICES` says it per process."""
  env = dict(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(FORCE_FLAG)]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  env.update({
      "MIXIE_DISTRIBUTED": "1",
      "MIXIE_NUM_PROCESSES": str(count),
      "MIXIE_PROCESS_ID": str(index),
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_PLATFORMS": "cpu",
      "JAX_NUM_CPU_DEVICES": str(devices),
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
  })
  return env


class Job:
  """N child processes with prefixed, streamed output, failure propagation and signal forwarding."""

  def __init__(self, cmd: list[str], count: int, devices: int, *, port: int = 0, log_dir: str = "",
               grace: float = 10.0, out=None):
    self.cmd, self.count, self.devices, self.grace = cmd, count, devices, grace
    self.port = port or free_port()
    self.log_dir = log_dir
    self.out = out or sys.stdout
    self.procs: list[subprocess.Popen] = []
    self._lock = threading.Lock()
    self._threads: list[threading.Thread] = []
    self._signalled = 0
    self._out_ok = True  # False once writing to `out` failed

  def _pump(self, i: int, stream) -> None:
    """Copies process i's output, prefixed; keeps draining it when our own output is gone (a closed
    pipe), so that the process never blocks on a full pipe."""
    log = open(os.path.join(self.log_dir, f"process_{i}.log"), "a") if self.log_dir else None
    for line in iter(stream.readline, ""):
      with self._lock:
        if self._out_ok:
          try:
            self.out.write(f"[p{i}] {line}" if line.endswith("\n") else f"[p{i}] {line}\n")
            self.out.flush()
          except (BrokenPipeError, OSError, ValueError):
            self._out_ok = False
      if log is not None:
        log.write(line)
        log.flush()
    if log is not None:
      log.close()

  def start(self) -> None:
    """Starts every process (each in its own session, so a terminal's Ctrl-C reaches only us)."""
    if self.log_dir:
      os.makedirs(self.log_dir, exist_ok=True)
    for i in range(self.count):
      env = process_env(os.environ, i, self.count, self.devices, self.port)
      p = subprocess.Popen(self.cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           errors="replace", bufsize=1, start_new_session=True)
      self.procs.append(p)
      t = threading.Thread(target=self._pump, args=(i, p.stdout), daemon=True)
      t.start()
      self._threads.append(t)

  def signal_all(self, sig: int) -> None:
    """Sends `sig` to every process still running."""
    for p in self.procs:
      if p.poll() is None:
        try:
          p.send_signal(sig)
        except ProcessLookupError:
          pass

  def on_signal(self, signum, _frame) -> None:
    """SIGTERM/SIGINT handler: forward SIGTERM once; a second signal kills."""
    self._signalled += 1
    self.signal_all(signal.SIGTERM if self._signalled == 1 else signal.SIGKILL)

  def stop_rest(self) -> None:
    """SIGTERM to the processes still running, SIGKILL after the grace period."""
    self.signal_all(signal.SIGTERM)
    deadline = time.time() + self.grace
    while time.time() < deadline and any(p.poll() is None for p in self.procs):
      time.sleep(0.05)
    self.signal_all(signal.SIGKILL)

  def wait(self) -> int:
    """Waits for every process; returns 0, or the exit code of the first process that failed."""
    failed = None
    while True:
      codes = [p.poll() for p in self.procs]
      for i, c in enumerate(codes):
        if c not in (None, 0) and failed is None:
          failed = (i, c)
          if any(x is None for x in codes):
            self._note(f"process {i} exited with {_describe(c)}; stopping the others")
            self.stop_rest()
      if all(p.poll() is not None for p in self.procs):
        break
      time.sleep(0.05)
    for t in self._threads:
      t.join(timeout=5)
    if failed is None:
      return 0
    i, c = failed
    self._note(f"process {i} failed ({_describe(c)})")
    return c if c > 0 else 128 - c

  def _note(self, msg: str) -> None:
    with self._lock:
      try:
        self.out.write(f"[launch] {msg}\n")
        self.out.flush()
      except (BrokenPipeError, OSError, ValueError):
        self._out_ok = False


def _describe(code: int) -> str:
  if code < 0:
    try:
      return f"signal {signal.Signals(-code).name}"
    except ValueError:
      return f"signal {-code}"
  return f"exit code {code}"


def parser() -> argparse.ArgumentParser:
  """The launcher's arguments (the command follows `--`)."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--processes", type=int, default=2, help="processes N (>= 1)")
  p.add_argument("--devices-per-process", type=int, default=4, help="CPU devices of each process")
  p.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  p.add_argument("--log-dir", default="", help="also write DIR/process_<i>.log")
  p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
  p.add_argument("--dry-run", action="store_true", help="print the environment and command, run nothing")
  p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command every process runs")
  return p


def main(argv=None) -> int:
  """CLI entry: runs the job and returns its exit code."""
  args = parser().parse_args(argv)
  cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
  if not cmd:
    print("local.py: give the command after --, e.g. -- python -m mixie.train --config=...",
          file=sys.stderr)
    return 2
  if args.processes < 1 or args.devices_per_process < 1:
    print("local.py: --processes and --devices-per-process must be >= 1", file=sys.stderr)
    return 2
  job = Job(cmd, args.processes, args.devices_per_process, port=args.port, log_dir=args.log_dir,
            grace=args.grace)
  if args.dry_run:
    for i in range(args.processes):
      env = process_env({}, i, args.processes, args.devices_per_process, job.port)
      print(" ".join(f"{k}={v}" for k, v in sorted(env.items())) + " " + shlex.join(cmd))
    return 0
  signal.signal(signal.SIGTERM, job.on_signal)
  signal.signal(signal.SIGINT, job.on_signal)
  job.start()
  return job.wait()


if __name__ == "__main__":
  sys.exit(main())

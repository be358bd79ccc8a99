#!/usr/bin/env python3
"""TPU VM launcher: create, install, sync, run on all workers, logs, delete. Standard library only.

    python launch/tpu.py all --name mixie-v5e16 --zone us-west4-a --type v5litepod-16 \
        --config configs/tinyllama_moin5k.py --workdir gs://BUCKET/mixie/moin5k --spot --dry-run

Subcommands:
  create   a TPU VM (`--queued` asks for a queued resource instead; `--spot` for spot capacity)
  install  jax[tpu] + mixie on every worker (`--worker=all`)
  sync     copy this checkout to every worker (`--git URL` clones/pulls instead)
  run      `python -m mixie.train --config=...` on all workers at once, inside a restart loop that
           resumes from the last checkpoint after preemption; one log per worker in ~/mixie_logs/
  logs     print the tail of every worker's log
  delete   delete the VM (or the queued resource)
  all      create, install, sync, run

`--dry-run` prints every command without running it. Multi-host runs set MIXIE_DISTRIBUTED=1, so
`mixie.train` calls `jax.distributed.initialize()`; single-host and CPU runs never do.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

# Hosts per accelerator type (chips / chips per host). Unknown types: pass --hosts.
_HOSTS = {
    "v5litepod-1": 1, "v5litepod-4": 1, "v5litepod-8": 1, "v5litepod-16": 4, "v5litepod-32": 8,
    "v5litepod-64": 16, "v5litepod-128": 32, "v5litepod-256": 64,
    "v4-8": 1, "v4-16": 2, "v4-32": 4, "v4-64": 8, "v4-128": 16,
    "v6e-1": 1, "v6e-4": 1, "v6e-8": 1, "v6e-16": 4, "v6e-32": 8, "v6e-64": 16, "v6e-256": 64,
}
_RUNTIME = {"v5litepod": "v2-alpha-tpuv5-lite", "v4": "tpu-ubuntu2204-base", "v6e": "v2-alpha-tpuv6e"}

REMOTE_DIR = "~/mixie"
LOG_DIR = "~/mixie_logs"


def hosts(args) -> int:
  """Number of TPU VM hosts (workers) of the accelerator type."""
  if args.hosts:
    return args.hosts
  if args.type not in _HOSTS:
    sys.exit(f"tpu.py: unknown accelerator type {args.type!r}; pass --hosts N")
  return _HOSTS[args.type]


def runtime(args) -> str:
  """TPU software version for the accelerator family."""
  return args.runtime or _RUNTIME.get(args.type.split("-")[0], "tpu-ubuntu2204-base")


def _gcloud_tpu(args, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", *rest, f"--zone={args.zone}"] + (
      [f"--project={args.project}"] if args.project else [])


def _ssh(args, command: str) -> list[str]:
  return _gcloud_tpu(args, "tpu-vm", "ssh", args.name) + ["--worker=all", f"--command={command}"]


def create_cmds(args) -> list[list[str]]:
  """Commands creating the VM (or a queued resource)."""
  if args.queued:
    cmd = _gcloud_tpu(args, "queued-resources", "create", args.name) + [
        f"--node-id={args.name}", f"--accelerator-type={args.type}", f"--runtime-version={runtime(args)}"]
  else:
    cmd = _gcloud_tpu(args, "tpu-vm", "create", args.name) + [
        f"--accelerator-type={args.type}", f"--version={runtime(args)}"]
  if args.spot:
    cmd.append("--spot")
  return [cmd]


def sync_cmds(args) -> list[list[str]]:
  """Commands putting this checkout (or a git clone) on every worker."""
  if args.git:
    repo = shlex.quote(args.git)
    return [_ssh(args, f"if [ -d {REMOTE_DIR}/.git ]; then git -C {REMOTE_DIR} pull --ff-only; "
                       f"else git clone {repo} {REMOTE_DIR}; fi")]
  return [_ssh(args, f"mkdir -p {REMOTE_DIR}"),
          _gcloud_tpu(args, "tpu-vm", "scp", "--recurse", "--worker=all", "mixie", "configs", "launch",
                      "requirements.txt", "requirements-assets.txt", "pyproject.toml", "README.md",
                      f"{args.name}:{REMOTE_DIR}/")]


def install_cmds(args) -> list[list[str]]:
  """Commands installing jax[tpu] and mixie on every worker."""
  steps = [
      "python3 -m pip install -q --upgrade pip",
      "python3 -m pip install -q 'jax[tpu]'",
      f"cd {REMOTE_DIR}",
      "python3 -m pip install -q -r requirements.txt",
      "python3 -m pip install -q --no-deps -r requirements-assets.txt",
      "python3 -m pip install -q --no-deps -e .",
  ]
  return [_ssh(args, " && ".join(steps))]


def run_cmds(args) -> list[list[str]]:
  """The training command on all workers, in a restart loop, logging per worker."""
  n = hosts(args)
  env = "MIXIE_DISTRIBUTED=1 " if n > 1 else ""
  train = (f"{env}python3 -m mixie.train --config={shlex.quote(args.config)}"
           + (f" --config.workdir={shlex.quote(args.workdir)}" if args.workdir else ""))
  # Exit 0 = finished; anything else (preemption, crash) restarts and resumes from the checkpoint.
  loop = (f"cd {REMOTE_DIR} && mkdir -p {LOG_DIR} && "
          f"log={LOG_DIR}/train_$(hostname).log && "
          f"for i in $(seq 1 {args.max_restarts}); do "
          f"{train} >> $log 2>&1 && break; echo \"restart $i\" >> $log; sleep 30; done")
  return [_ssh(args, f"nohup bash -c {shlex.quote(loop)} > /dev/null 2>&1 &")]


def logs_cmds(args) -> list[list[str]]:
  """Tail of every worker's log."""
  return [_ssh(args, f"tail -n {args.lines} {LOG_DIR}/train_$(hostname).log")]


def delete_cmds(args) -> list[list[str]]:
  """Delete the VM or the queued resource."""
  if args.queued:
    return [_gcloud_tpu(args, "queued-resources", "delete", args.name) + ["--force", "--quiet"]]
  return [_gcloud_tpu(args, "tpu-vm", "delete", args.name) + ["--quiet"]]


STEPS = {"create": create_cmds, "install": install_cmds, "sync": sync_cmds, "run": run_cmds,
         "logs": logs_cmds, "delete": delete_cmds}


def plan(args) -> list[list[str]]:
  """Every command the subcommand runs, in order."""
  names = ["create", "sync", "install", "run"] if args.cmd == "all" else [args.cmd]
  return [c for n in names for c in STEPS[n](args)]


def parser() -> argparse.ArgumentParser:
  """The argument parser of the launch CLI (subcommands and their flags)."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("cmd", choices=[*STEPS, "all"])
  p.add_argument("--name", required=True, help="TPU VM (node) name")
  p.add_argument("--zone", required=True, help="GCP zone, e.g. us-west4-a")
  p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  p.add_argument("--type", default="v5litepod-16", help="accelerator type, e.g. v5litepod-16")
  p.add_argument("--hosts", type=int, default=0, help="workers, for types not in the table")
  p.add_argument("--runtime", default="", help="TPU software version (default by family)")
  p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  p.add_argument("--queued", action="store_true", help="use a queued resource")
  p.add_argument("--git", default="", help="clone/pull this repository URL instead of copying")
  p.add_argument("--config", default="configs/tinyllama_moin5k.py", help="mixie config file[:arg]")
  p.add_argument("--workdir", default="", help="work directory override (gs:// recommended)")
  p.add_argument("--max-restarts", type=int, default=100, help="restarts after preemption")
  p.add_argument("--lines", type=int, default=50, help="log lines shown by `logs`")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  return p


def main(argv=None) -> int:
  """CLI entry: runs (or with --dry-run prints) the chosen subcommand's commands."""
  args = parser().parse_args(argv)
  for cmd in plan(args):
    print("+ " + shlex.join(cmd), flush=True)
    if not args.dry_run:
      rc = subprocess.call(cmd)
      if rc:
        print(f"tpu.py: command failed with exit code {rc}", file=sys.stderr)
        return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())

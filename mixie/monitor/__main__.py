"""`python -m mixie.monitor --config=configs/demo.py [--log=PATH]`.

Summarises the run's request log (see `mixie.monitor.summary`): traffic per expert and unused experts,
the low-confidence share and drift per time window; writes `workdir/monitor/summary.json` and
`monitor.png`, and prints the flags (drift, dead experts) with the numbers behind each.
"""

from __future__ import annotations

from absl import flags

from mixie import cli

_LOG = flags.DEFINE_string("log", None, "request log to read (default: monitor.log_path, else "
                                        "serve.log_path)")


def main(argv) -> int:
  """CLI entry: summarises the request log and prints the flags."""
  config = cli.config_from_flags(argv)
  # deferred: --help and command-line errors answer at once (the library imports jax through
  # mixie.cluster.topics: ~3 s)
  from mixie.monitor.run import format_summary, monitor_dir, run_monitor

  summary = run_monitor(config, _LOG.value)
  print(format_summary(summary))
  print(f"summary and plot in {monitor_dir(config.workdir)}")
  return 0


if __name__ == "__main__":
  cli.run(main)

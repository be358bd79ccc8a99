"""`python -m mixie.sweep --config=configs/sweeps/NAME.py[:variant] [--workdir=DIR] [--adopt] [--report_only]`.

Runs every point of the sweep that is not finished (see `mixie.sweep.runner`), then writes the combined
table and plots into `<workdir>/reports/<name>/`. A killed or SIGTERM-ed sweep resumes with the same
command. `--adopt` takes work directories already in `<workdir>/points/` that this runner did not make
as the points of the same names; `--report_only` only rewrites the report of finished points.
"""

from __future__ import annotations

from absl import app, flags

from mixie.cli import config_from_flags
from mixie.errors import run_cli

_ADOPT = flags.DEFINE_bool("adopt", False, "take existing points/<name>/ work directories as those points")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "only write the table and plots of finished points")


@run_cli
def main(argv) -> int:
  """CLI entry: runs the sweep's missing points, then writes its report."""
  sweep = config_from_flags(argv)
  from mixie.sweep import report, runner

  if _REPORT_ONLY.value:
    points = runner.validate(sweep)
    paths = report.write_report(runner.sweep_dir(sweep), sweep, points)
    print(f"mixie.sweep: report in {paths['dir']}")
    return 0
  summary = runner.run_sweep(sweep, adopt=_ADOPT.value)
  return 0 if summary["status"] in ("finished", "preempted") else 1


if __name__ == "__main__":
  app.run(main)

"""A sweep directory's combined table and its plots, for notebooks (`notebooks/sweep.ipynb`).

`python -m mixie.sweep` writes `<sweep dir>/reports/<name>/table.json` through `mixie.sweep.report`,
which owns the table's format and figures, and `mixie.sweep.findings` (the answers in numbers); they
are read and drawn from here under the analysis package's name, as a work directory's are (`loaders`,
`plots`).
"""

from __future__ import annotations

from mixie.sweep.findings import findings
from mixie.sweep.findings import markdown as findings_markdown
from mixie.sweep.report import (build_table, load_table, markdown, plot_all, plot_vs_compute,
                                plot_vs_prefix, plot_vs_setting, several_prefixes, swept_setting)

__all__ = ["build_table", "findings", "findings_markdown", "load_table", "markdown", "plot_all", "plot_vs_compute", "plot_vs_prefix",
           "plot_vs_setting", "several_prefixes", "swept_setting"]

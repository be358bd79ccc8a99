"""matplotlib figures outside pyplot's global state: creating, saving, and the file name of each figure.

Every plot function (`mixie.analysis.plots`, `mixie.evaluate.plots`) returns a `matplotlib.figure.Figure`
and, given `save_dir`, also writes `<save_dir>/<FIGURE_NAMES[function]>.png` atomically (local or
gs://). A notebook shows the figures after `%matplotlib inline`.
"""

from __future__ import annotations

import io

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mixie import io as mio

FIGURE_NAMES = {
    "plot_topic_sizes": "topic_sizes", "plot_topic_map": "topic_map", "plot_top_terms": "top_terms",
    "plot_label_agreement": "label_agreement", "plot_training_curves": "training_curves",
    "plot_perplexity": "perplexity", "plot_routing_confusion": "routing_confusion",
    "plot_prefix_effect": "prefix_effect",
}
MANY = 40  # from this many topics on, figures switch from one bar / row per topic to summaries


def new_figure(width: float, height: float) -> Figure:
  """A `Figure` with an Agg canvas and constrained layout, outside pyplot's global state."""
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def png_bytes(fig: Figure, *, dpi: int = 110) -> bytes:
  """`fig` as PNG bytes."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  return buf.getvalue()


def save_figure(fig: Figure, save_dir, name: str, *, dpi: int = 110):
  """Writes `fig` as `<save_dir>/<name>.png` (atomic; local or gs://); returns the path."""
  p = mio.path(save_dir) / f"{name}.png"
  mio.atomic_write_bytes(p, png_bytes(fig, dpi=dpi))
  return p


def figure_dir(workdir, figdir: str = "") -> str:
  """Where a notebook writes its figures: `figdir`, or `<workdir>/figures` when empty."""
  return str(figdir) if figdir else f"{str(workdir).rstrip('/')}/figures"


def finish(fig: Figure, save_dir, func: str) -> Figure:
  """Saves `fig` as the figure of plot function `func` when `save_dir` is given; returns it."""
  if save_dir is not None:
    save_figure(fig, save_dir, FIGURE_NAMES[func])
  return fig


def message(fig: Figure, text: str) -> None:
  """Fills `fig` with a centred message (a figure whose input is missing says so instead of failing)."""
  ax = fig.add_subplot()
  ax.axis("off")
  ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11)


def palette(n: int) -> list:
  """`n` distinct colours (tab10, or tab20 beyond ten, cycling)."""
  cmap = colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]

"""Analysis of a work directory (what the notebooks call)."""

from mixie.analysis.plots import *  # noqa: F401,F403  (until the split into loaders and plots)
from mixie.analysis.plots import FIGURE_NAMES  # noqa: F401

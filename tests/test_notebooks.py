"""The notebooks run headless (nbclient) on the work directory of a tiny run and write their figures;
the committed notebooks are what `notebooks/make_notebooks.py` generates, without outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixie.figures import FIGURE_NAMES

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# run after the notebook in its kernel: what its figures were drawn from (not a "missing input" placeholder)
PROBE = {
    "topics.ipynb": 'print(json.dumps({"topics": topics["num_topics"], "labelled": agreement is not None, '
                    '"terms": sum(bool(r["terms"]) for r in terms)}))',
    "experts.ipynb": 'print(json.dumps({"metrics": sorted(metrics), "ppl": ppl["source"], '
                     '"routes": routes["source"]}))',
}
EXPECTED = {
    "topics.ipynb": ["plot_topic_sizes", "plot_topic_map", "plot_top_terms", "plot_label_agreement"],
    "experts.ipynb": ["plot_training_curves", "plot_perplexity", "plot_routing_confusion",
                      "plot_prefix_effect"],
}


def test_committed_notebooks_are_generated_and_clean():
  r = subprocess.run([sys.executable, str(NB_DIR / "make_notebooks.py"), "--check"], capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  for name in EXPECTED:
    nb = json.loads((NB_DIR / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert "google.colab" in "".join(code[0]["source"])  # the install cell comes first
    assert code[1]["metadata"].get("tags") == ["parameters"]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory, monkeypatch_module):
  """A kernel spec running this interpreter (whatever `python3` kernels the machine has), found
  through JUPYTER_PATH."""
  d = tmp_path_factory.mktemp("jupyter")
  spec = d / "kernels" / "mixie-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "mixie test", "language": "python"}))
  monkeypatch_module.setenv("JUPYTER_PATH", os.pathsep.join([str(d), os.environ.get("JUPYTER_PATH", "")]))
  return "mixie-test"


@pytest.fixture(scope="module")
def monkeypatch_module():
  mp = pytest.MonkeyPatch()
  yield mp
  mp.undo()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_notebook_runs_and_writes_its_figures(name, tiny_run, kernel, monkeypatch, tmp_path):
  nbclient = pytest.importorskip("nbclient")
  import nbformat

  figdir = tmp_path / "figures"
  monkeypatch.setenv("MIXIE_WORKDIR", str(tiny_run["workdir"]))
  monkeypatch.setenv("MIXIE_FIGDIR", str(figdir))
  monkeypatch.delenv("MIXIE_SOURCE", raising=False)
  nb = nbformat.read(NB_DIR / name, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=300,
                                   resources={"metadata": {"path": str(tmp_path)}})
  probe = nbformat.v4.new_code_cell("import json\n" + PROBE[name])
  nb.cells.append(probe)
  client.execute()  # raises CellExecutionError on the first failing cell
  seen = json.loads("".join(o.get("text", "") for o in probe.outputs))
  if name == "topics.ipynb":
    assert seen == {"topics": 4, "labelled": True, "terms": 4}
  else:
    assert seen["metrics"] == ["experts"]
    assert seen["ppl"].endswith("eval/results.json") and seen["routes"].endswith("eval/per_doc.npz")
  written = sorted(p.name for p in figdir.iterdir())
  assert written == sorted(f"{FIGURE_NAMES[f]}.png" for f in EXPECTED[name])
  for p in figdir.iterdir():
    data = p.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000, p
  # every figure cell displayed its figure inline; the setup cell printed the directories
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert len(images) == len(EXPECTED[name])
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert str(tiny_run["workdir"]) in text and str(figdir) in text


# --- the sweep notebook (mixie.sweep.report) on the tiny two-point sweep ------------------------------

SWEEP_FIGURES = ["ppl_vs_tokens", "ppl_vs_flops", "ppl_vs_init", "ppl_vs_prefix", "routing_vs_prefix"]


def test_sweep_notebook_runs_and_writes_its_figures(tiny_sweep, kernel, monkeypatch, tmp_path):
  nbclient = pytest.importorskip("nbclient")
  import nbformat

  nb = nbformat.read(NB_DIR / "sweep.ipynb", as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  assert "google.colab" in code[0].source and code[1].metadata.get("tags") == ["parameters"]
  figdir = tmp_path / "figures"
  monkeypatch.setenv("MIXIE_SWEEP", str(tiny_sweep["dir"]))
  monkeypatch.setenv("MIXIE_SWEEP_NAME", "tiny")
  monkeypatch.setenv("MIXIE_FIGDIR", str(figdir))
  monkeypatch.delenv("MIXIE_SOURCE", raising=False)
  probe = nbformat.v4.new_code_cell('import json\nprint(json.dumps({"points": table["points"], '
                                    '"rows": len(table["rows"]), "setting": setting}))')
  nb.cells.append(probe)
  nbclient.NotebookClient(nb, kernel_name=kernel, timeout=300,
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  seen = json.loads("".join(o.get("text", "") for o in probe.outputs))
  assert seen == {"points": ["scratch", "seed"], "rows": 18, "setting": "init"}
  assert sorted(p.name for p in figdir.iterdir()) == sorted(f"{f}.png" for f in SWEEP_FIGURES)
  for p in figdir.iterdir():
    assert p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 5000, p
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) == len(SWEEP_FIGURES)
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "| scratch | init=scratch | scratch | 8 |" in text and str(figdir) in text

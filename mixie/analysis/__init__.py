"""Analysis of a work directory (what `notebooks/` call), one module per concern:

- `mixie.analysis.loaders`: a run's artefacts (topics, texts, training metrics, the evaluation, routes)
  read into plain numpy arrays and dicts;
- `mixie.analysis.summaries`: top words and titles per topic, agreement with reference labels, 2-D
  projections;
- `mixie.analysis.plots`: figures of the topics and the training curves;
- `mixie.analysis.sweeps`: a sweep directory's combined table and its figures (`mixie.sweep.report`).

The held-out evaluation's figures are `mixie.evaluate.plots`, the ones `python -m mixie.evaluate` writes;
figure creation and saving is `mixie.figures`.
"""

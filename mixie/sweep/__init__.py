"""Sweeps: one command runs a list of config overrides, sharing the stages points have in common.

    python -m mixie.sweep --config=configs/sweeps/tokens.py[:variant] [--workdir=SWEEP_DIR] [--adopt]

`mixie.sweep.spec` reads a sweep config (a base run config + named points of overrides) and keys what
points share; `mixie.sweep.runner` runs the points into one sweep directory (shared topics + dataset,
shared seed adapters, evaluation-only points), resumably; `mixie.sweep.report` writes and loads the
combined table and its plots.
"""

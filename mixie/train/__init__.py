"""Training: the stacked train step, per-expert optimizer, expert scheduler, loop, checkpoints and the
`python -m mixie.train` main job."""

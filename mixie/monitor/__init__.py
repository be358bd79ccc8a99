"""`python -m mixie.monitor`: summaries, plots and flags from the serving request log."""

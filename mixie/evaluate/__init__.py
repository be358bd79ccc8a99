"""Evaluation: prefix-routed held-out perplexity of the base, the baselines and the routed experts
(`run.evaluate`, `python -m mixie.evaluate`); per-token scoring of (document, expert) pairs (`ppl`)."""

"""Evaluation: held-out perplexity of the base, baselines and experts (`ppl`)."""

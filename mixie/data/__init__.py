"""Corpus sources, the clustered TFDS dataset (ArrayRecord) and the packed per-topic loader."""

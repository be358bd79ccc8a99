"""Every input a run will read, checked before the first stage computes: the base checkpoint (its
headers and metadata only: no weight is read), its tokenizer and the corpus.

A corrupt or truncated base, a missing tokenizer or a wrong corpus path then fails in the first
seconds with one `MixieError` naming the file, instead of after the cluster stage has spent its minutes.
`check_run_inputs` is called by the cluster stage's config check (`mixie.cluster.topics.validate_config`),
which the main job runs whenever its topics or dataset are missing.
"""

from __future__ import annotations

import functools
import pathlib

from mixie import assets
from mixie.data.corpus import check_corpus
from mixie.model import checkpoint
from mixie.model.load import load_tokenizer


def _stamp(path: pathlib.Path) -> tuple:
  """(size, mtime) of a file or a directory's files: a changed checkpoint is checked again."""
  files = sorted(path.iterdir()) if path.is_dir() else [path]
  return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


@functools.lru_cache(maxsize=8)
def _check_headers(source: str, path: str, stamp: tuple) -> None:
  """Every tensor the base needs is listed with its shape, its metadata gives a supported architecture
  and no tensor lies past the end of its file. Headers only (`mixie.model.checkpoint.check_headers`: the
  same checks `load_hf` / `load_gguf` run before they read any weight)."""
  del stamp  # only part of the cache key
  checkpoint.check_headers(source, path)


def check_base(model_cfg) -> None:
  """The base named by the `model` section can be loaded and tokenizes: checkpoint headers and metadata
  (gguf, hf) and the tokenizer (every source). `MixieError` / `ConfigError` naming the file or field."""
  source, path = model_cfg.source, model_cfg.path
  if source == "gguf" and not path:
    path = str(assets.smollm2_gguf())
  if source in ("gguf", "hf") and path:
    p = pathlib.Path(path)
    _check_headers(source, path, _stamp(p) if p.exists() else ())
  load_tokenizer(model_cfg.source, model_cfg.path, model_cfg.get("preset", ""))  # cached: reused later


def check_run_inputs(config) -> None:
  """The corpus (`data`) and the base (`model`) of a run that builds its topics and dataset are there
  and readable; nothing is computed."""
  check_corpus(config.data)
  check_base(config.model)

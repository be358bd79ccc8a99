"""The `Server` of a run: base, tokenizer, topics embedder, router and expert store of its work directory."""

from __future__ import annotations

from mixie.cluster.embed import load_embedder
from mixie.cluster.topics import topics_dir
from mixie.errors import ConfigError, MixieError
from mixie.model.load import load_base
from mixie.route.run import load_router
from mixie.serve.server import Server
from mixie.store import run_store


def make_server(config, loaded=None) -> Server:
  """The `Server` of the run in `config.workdir`, routing with the run's router (`load_router`).

  `loaded`: an already loaded `(LlamaConfig, params, Tokenizer)` (default: `load_base(config.model)`).
  """
  store = run_store(config.workdir)
  if not store.topics():
    raise MixieError(f"{store.dir}: no trained experts; run `python -m mixie.train --config=...` first")
  cfg, params, tokenizer = loaded if loaded is not None else load_base(config.model)
  if tokenizer is None:
    raise ConfigError("model: this base has no tokenizer; mixie.generate needs one")
  embedder = load_embedder(topics_dir(config.workdir) / "embedder", base=(cfg, params, tokenizer),
                           batch=int(config.cluster.embed_batch))
  return Server(cfg, params, tokenizer, store, load_router(config, store), embedder,
                cache_slots=int(config.generate.cache_experts))

"""The `Server` of a run: base, tokenizer, topics embedder, router and expert store of its work directory,
with the run's fallback rule and request log.

`make_server(config)` builds it; `configure_server(server, config)` sets what `route.fallback` /
`route.confidence` / `route.calibrate*` / `route.min_confidence` ask (the threshold calibrated on the
run's training documents when asked: `mixie.route.calibrate.serving_policy`), the all-data LoRA of
`workdir/lora_all` for the "lora_all" fallback, and `serve.log_path`.
"""

from __future__ import annotations

from mixie.cluster.embed import load_embedder
from mixie.cluster.topics import topics_dir
from mixie.errors import ConfigError, MixieError, check
from mixie.model.load import load_base
from mixie.route.calibrate import serving_policy
from mixie.route.run import load_router
from mixie.serve.request_log import RequestLog, log_path
from mixie.serve.server import Server
from mixie.store import run_store


def make_server(config, loaded=None) -> Server:
  """The `Server` of the run in `config.workdir`, routing with the run's router (`load_router`), with
  the run's fallback and request log (`configure_server`).

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
  return configure_server(Server(cfg, params, tokenizer, store, load_router(config, store), embedder,
                                 cache_slots=int(config.generate.cache_experts)), config)


def configure_server(server: Server, config, *, source: str = "generate", log=print) -> Server:
  """Sets `server`'s fallback and request log from `config` (see the module docstring); returns it."""
  policy = serving_policy(config, server.router, server.embedder, server.tokenizer, log=log)
  lora_all = None
  if policy.fallback == "lora_all":
    lora_all = run_store(config.workdir, "lora_all")
    check(0 in lora_all, f"route.fallback='lora_all' but {lora_all.dir} holds no all-data LoRA; train "
                         "it (train.baselines includes 'lora_all') or choose route.fallback='base'",
          ConfigError)
  server.set_fallback(policy, lora_all)
  path = log_path(config)
  server.request_log = RequestLog(path) if path else None
  server.log_source = source
  return server

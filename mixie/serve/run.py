"""A run's serving settings on a `Server`: the fallback rule and model, and the request log.

`configure_server(server, config)` reads `route.fallback` / `route.confidence` / `route.calibrate*` /
`route.min_confidence` (the threshold calibrated on the run's training documents when asked:
`mixie.route.calibrate.serving_policy`), the all-data LoRA of `workdir/lora_all` for the "lora_all"
fallback, and `serve.log_path`. `mixie.generate` calls it on the server it builds.
"""

from __future__ import annotations

from mixie import io as mio
from mixie.errors import ConfigError, check
from mixie.route.calibrate import serving_policy
from mixie.serve.request_log import RequestLog, log_path
from mixie.serve.server import Server
from mixie.store import ExpertStore


def configure_server(server: Server, config, *, source: str = "generate", log=print) -> Server:
  """Sets `server`'s fallback and request log from `config` (see the module docstring); returns it."""
  policy = serving_policy(config, server.router, server.embedder, server.tokenizer, log=log)
  lora_all = None
  if policy.fallback == "lora_all":
    lora_all = ExpertStore(mio.path(config.workdir) / "lora_all")
    check(0 in lora_all, f"route.fallback='lora_all' but {lora_all.dir} holds no all-data LoRA; train "
                         "it (train.baselines includes 'lora_all') or choose route.fallback='base'",
          ConfigError)
  server.set_fallback(policy, lora_all)
  path = log_path(config)
  server.request_log = RequestLog(path) if path else None
  server.log_source = source
  return server

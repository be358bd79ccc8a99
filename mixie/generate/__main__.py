"""`python -m mixie.generate --config=configs/demo.py --prompt "..." [--prompt "..."]`.

Loads the run's base, topics embedder, router and expert store from the work directory, routes each
prompt on its first `route.route_tokens` tokens and decodes all prompts in one mixed-expert batch
(`mixie.serve.server.Server`). Prints one block per prompt; a prompt whose expert could not be loaded
prints its error (exit status 1), the others are still answered.
"""

from __future__ import annotations

import sys

from absl import app, flags

from mixie.cli import config_from_flags
from mixie.errors import ConfigError, MixieError, run_cli

_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt (repeat for a batch)")
_SEED = flags.DEFINE_integer("seed", None, "sampling seed (default: config.seed)")


def make_server(config, loaded=None):
  """The `Server` of a run: base, tokenizer, topics embedder, router and expert store of `workdir`.

  `loaded`: an already loaded `(LlamaConfig, params, Tokenizer)` (default: `load_base(config.model)`).
  """
  from mixie import io as mio
  from mixie.cluster.embed import load_embedder
  from mixie.cluster.topics import topics_dir
  from mixie.model.load import load_base
  from mixie.route.run import load_router
  from mixie.serve.server import Server
  from mixie.store import ExpertStore

  store = ExpertStore(mio.path(config.workdir) / "experts")
  if not store.topics():
    raise MixieError(f"{store.dir}: no trained experts; run `python -m mixie.train --config=...` first")
  cfg, params, tokenizer = loaded if loaded is not None else load_base(config.model)
  if tokenizer is None:
    raise ConfigError("model: this base has no tokenizer; mixie.generate needs one")
  embedder = load_embedder(topics_dir(config.workdir) / "embedder", base=(cfg, params, tokenizer),
                           batch=int(config.cluster.embed_batch))
  router = load_router(config, store)
  return Server(cfg, params, tokenizer, store, router, embedder,
                cache_slots=int(config.generate.cache_experts))


@run_cli
def main(argv) -> int:
  """CLI entry: routes each `--prompt` to its expert and prints the completions."""
  config = config_from_flags(argv)
  if not _PROMPT.value:
    raise ConfigError("give at least one --prompt")
  g = config.generate
  server = make_server(config)
  results = server.generate(list(_PROMPT.value), max_new_tokens=int(g.max_new_tokens),
                            temperature=float(g.temperature), top_p=float(g.top_p), top_k=int(g.top_k),
                            seed=int(config.seed if _SEED.value is None else _SEED.value))
  failed = 0
  for i, (prompt, r) in enumerate(zip(_PROMPT.value, results)):
    who = "base" if r.expert < 0 else f"expert {r.expert}"
    if len(r.experts) > 1:
      who = ", ".join(f"expert {e} ({w:.2f})" for e, w in r.experts)
    print(f"=== prompt {i} [{who}] ===")
    if r.error:
      failed += 1
      print(f"mixie: error: prompt {i}: {r.error}", file=sys.stderr)
    else:
      print(prompt + r.text)
  return 1 if failed else 0


if __name__ == "__main__":
  app.run(main)

"""`python -m mixie.generate --config=configs/demo.py --prompt "..." [--prompt "..."]`.

Loads the run's base, topics embedder, router and expert store from the work directory
(`mixie.serve.run.make_server`), routes each prompt on its first `route.route_tokens` tokens and decodes
all prompts in one mixed-expert batch (`mixie.serve.server.Server`). Prints one block per prompt; a
prompt whose expert could not be loaded prints its error (exit status 1), the others are still answered.
"""

from __future__ import annotations

import sys

from absl import flags

from mixie import cli
from mixie.errors import ConfigError

_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt (repeat for a batch)")
_SEED = flags.DEFINE_integer("seed", None, "sampling seed (default: config.seed)")


def main(argv) -> int:
  """CLI entry: routes each `--prompt` to its expert and prints the completions."""
  config = cli.config_from_flags(argv)
  if not _PROMPT.value:
    raise ConfigError("give at least one --prompt")
  # deferred: --help and command-line errors answer in 0.2 s, not 4 s (jax and the stage load)
  from mixie.serve.run import make_server

  g = config.generate
  results = make_server(config).generate(
      list(_PROMPT.value), max_new_tokens=int(g.max_new_tokens), temperature=float(g.temperature),
      top_p=float(g.top_p), top_k=int(g.top_k), seed=int(config.seed if _SEED.value is None else _SEED.value))
  failed = 0
  for i, (prompt, r) in enumerate(zip(_PROMPT.value, results)):
    who = "base" if r.expert < 0 else f"expert {r.expert}"
    if r.fallback:
      who = f"{r.fallback} (fallback: routing confidence below route.min_confidence)"
    elif len(r.experts) > 1:
      who = ", ".join(f"expert {e} ({w:.2f})" for e, w in r.experts)
    print(f"=== prompt {i} [{who}] ===")
    if r.error:
      failed += 1
      print(f"mixie: error: prompt {i}: {r.error}", file=sys.stderr)
    else:
      print(prompt + r.text)
  return 1 if failed else 0


if __name__ == "__main__":
  cli.run(main)

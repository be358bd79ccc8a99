"""`python -m mixie.experts COMMAND --config=... [--workdir DIR]`: the run's expert store.

Commands:
- `import --adapter DIR [--adapter DIR ...] [--docs FILE ...]`: brings PEFT LoRA adapters trained
  elsewhere into the store as experts with new ids; `--docs` (one per adapter, in order: .jsonl, .txt
  with one document per line, or a directory of .txt) gives each its routing centroid (an adapter
  exported by mixie may bring its own). See `mixie.interop.importer`.
- `list`: one line per expert (id, kind, LoRA shape, tokens, loss, routing); see `mixie.store`.
"""

from __future__ import annotations

from absl import flags

from mixie import cli
from mixie.errors import ConfigError

_ADAPTER = flags.DEFINE_multi_string("adapter", [], "import: a PEFT LoRA adapter directory (repeatable)")
_DOCS = flags.DEFINE_multi_string("docs", [], "import: documents of the adapter at the same position "
                                  "(.jsonl / .txt / directory of .txt); optional for mixie exports")


def import_adapters(config) -> int:
  """`import`: the adapters of `--adapter` into the run's store."""
  # deferred: --help and command-line errors answer in 0.2 s, not 4 s (jax and the stage load)
  from mixie.interop.importer import import_run

  import_run(config, _ADAPTER.value, _DOCS.value)
  return 0


def list_experts(config) -> int:
  """`list`: prints one line per expert of the run's store."""
  # deferred: --help and command-line errors answer in 0.2 s, not 4 s (jax and the stage load)
  from mixie.store import run_store

  store = run_store(config.workdir)
  metas = store.metas()
  print(f"{store.dir}: {len(metas)} expert(s)")
  for t, m in metas.items():
    loss = "-" if m.final_loss is None else f"{m.final_loss:.4f}"
    merged = f", merged topics {list(m.merged_topics)}" if m.merged_topics else ""
    routed = "centroid" if m.centroid is not None else "no centroid"
    print(f"{t:>6}  {m.kind:<9} rank {m.rank} alpha {m.alpha:g} {','.join(m.targets)}  "
          f"tokens {m.tokens_seen if m.tokens_seen is not None else '-'}  loss {loss}  {routed}{merged}")
  return 0


COMMANDS = {"import": import_adapters, "list": list_experts}


def main(argv) -> int:
  """CLI entry: runs the command named by the first positional argument."""
  if len(argv) < 2 or argv[1] not in COMMANDS:
    got = f" (got {argv[1]!r})" if len(argv) > 1 else ""
    raise ConfigError(f"give a command: {' or '.join(COMMANDS)}{got}, e.g. python -m mixie.experts import "
                      "--config=configs/demo.py --adapter DIR --docs docs.jsonl")
  return COMMANDS[argv[1]](cli.config_from_flags(argv, positional=1))


if __name__ == "__main__":
  cli.run(main)

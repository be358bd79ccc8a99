"""`python -m mixie.experts COMMAND --config=... [--workdir DIR]`: the run's expert store and the experts'
lifecycle. Each command that changes something commits one new generation of the store
(`mixie.store`); a running server picks it up before its next batch.

Commands:
- `list`: the current generation: one line per expert (id, kind, active / RETIRED, weights hash, size,
  LoRA shape, tokens, loss, routing).
- `history`: one line per generation (number, time, experts, retired, what changed); `<- current`.
- `add --docs FILE`: documents (.jsonl, .txt with one per line, or a directory of .txt) join the topics
  they are near, the rest form new topics with fresh experts; only those train (with
  `--config.lifecycle.retrain_joined=True` also the joined topics' experts); every other expert keeps
  its file. See `mixie.lifecycle.add` for the rule.
- `retrain --topic N`: trains expert N again, fresh, on its topic's documents plus any added to it.
- `retire --topic N [--topic M ...]`: the router stops sending queries to them (in every mode: they go
  to the next nearest expert, or to the fallback when that route is not confident); weights kept.
- `restore --topic N [...]`: undoes `retire`.
- `rollback --to GEN`: generation GEN made current again (as a new generation: undo it by rolling back
  to the one before).
- `import --adapter DIR [--adapter DIR ...] [--docs FILE ...]`: brings PEFT LoRA adapters trained
  elsewhere into the store as experts with new ids; `--docs` (one per adapter, in order) gives each its
  routing centroid (an adapter exported by mixie may bring its own). See `mixie.interop.importer`.
"""

from __future__ import annotations

from absl import flags

from mixie import cli
from mixie.errors import ConfigError, check

_ADAPTER = flags.DEFINE_multi_string("adapter", [], "import: a PEFT LoRA adapter directory (repeatable)")
_DOCS = flags.DEFINE_multi_string("docs", [], "add: the documents to add; import: documents of the "
                                  "adapter at the same position (.jsonl / .txt / directory of .txt)")
_TOPIC = flags.DEFINE_multi_integer("topic", [], "retrain / retire / restore: an expert id (repeatable "
                                    "for retire and restore)")
_TO = flags.DEFINE_integer("to", None, "rollback: the generation to make current again")


def import_adapters(config) -> int:
  """`import`: the adapters of `--adapter` into the run's store."""
  # deferred: --help and command-line errors answer in 0.2 s, not 4 s (jax and the stage load)
  from mixie.interop.importer import import_run

  import_run(config, _ADAPTER.value, _DOCS.value)
  return 0


def list_experts(config) -> int:
  """`list`: prints the current generation, one line per expert."""
  # deferred: --help and command-line errors answer in 0.2 s, not 4 s (jax and the stage load)
  from mixie.lifecycle.ops import list_lines
  from mixie.store import run_store

  print("\n".join(list_lines(run_store(config.workdir))))
  return 0


def history(config) -> int:
  """`history`: prints one line per generation."""
  from mixie.lifecycle.ops import history_lines  # deferred: as in list_experts
  from mixie.store import run_store

  print("\n".join(history_lines(run_store(config.workdir))))
  return 0


def add(config) -> int:
  """`add --docs FILE`: adds documents (new topics, their experts trained)."""
  from mixie.lifecycle.add import add_documents  # deferred: as in list_experts

  check(len(_DOCS.value) == 1, "add: give one documents file: --docs FILE", ConfigError)
  res = add_documents(config, _DOCS.value[0])
  return 0 if res["status"] in ("finished", "already added") else 1


def _one_topic(command: str) -> int:
  check(len(_TOPIC.value) == 1, f"{command}: give one expert: --topic N", ConfigError)
  return _TOPIC.value[0]


def retrain(config) -> int:
  """`retrain --topic N`: trains expert N again."""
  from mixie.lifecycle.ops import retrain as retrain_topic  # deferred: as in list_experts

  retrain_topic(config, _one_topic("retrain"))
  return 0


def retire(config) -> int:
  """`retire --topic N`: the router stops sending queries to expert N."""
  from mixie.lifecycle.ops import retire as retire_topics  # deferred: as in list_experts

  retire_topics(config, _TOPIC.value)
  return 0


def restore(config) -> int:
  """`restore --topic N`: undoes `retire`."""
  from mixie.lifecycle.ops import restore as restore_topics  # deferred: as in list_experts

  restore_topics(config, _TOPIC.value)
  return 0


def rollback(config) -> int:
  """`rollback --to GEN`: makes generation GEN current again."""
  from mixie.lifecycle.ops import rollback as rollback_to  # deferred: as in list_experts

  check(_TO.value is not None, "rollback: give the generation: --to GEN (see history)", ConfigError)
  rollback_to(config, _TO.value)
  return 0


COMMANDS = {"list": list_experts, "history": history, "add": add, "retrain": retrain, "retire": retire,
            "restore": restore, "rollback": rollback, "import": import_adapters}


def main(argv) -> int:
  """CLI entry: runs the command named by the first positional argument."""
  if len(argv) < 2 or argv[1] not in COMMANDS:
    got = f" (got {argv[1]!r})" if len(argv) > 1 else ""
    raise ConfigError(f"give a command: {', '.join(COMMANDS)}{got}, e.g. python -m mixie.experts list "
                      "--config=configs/demo.py")
  return COMMANDS[argv[1]](cli.config_from_flags(argv, positional=1))


if __name__ == "__main__":
  cli.run(main)

"""`python -m mixie.import --config=... --adapter DIR [--adapter DIR ...] [--docs FILE ...] [--workdir DIR]`.

Brings PEFT LoRA adapters trained elsewhere into the run's expert store as experts with new topic ids;
`--docs` (one per adapter, in order: .jsonl, .txt with one document per line, or a directory of .txt)
gives each its routing centroid. See `mixie.interop`. (The module is named `import`, a Python keyword:
run it with `python -m`, or call `mixie.interop.import_run`.)
"""

from __future__ import annotations

from absl import app, flags

from mixie.cli import config_from_flags
from mixie.errors import run_cli

_ADAPTER = flags.DEFINE_multi_string("adapter", [], "a PEFT LoRA adapter directory (repeatable)")
_DOCS = flags.DEFINE_multi_string("docs", [], "documents of the adapter at the same position "
                                  "(.jsonl / .txt / directory of .txt); optional for mixie exports")


@run_cli
def main(argv) -> int:
  """The CLI entry point (see the module docstring)."""
  config = config_from_flags(argv)
  from mixie.interop.export import import_run

  import_run(config, _ADAPTER.value, _DOCS.value)
  return 0


if __name__ == "__main__":
  app.run(main)

"""`python -m mixie.export --config=... --out DIR [--topics 0,3,7] [--workdir DIR]`.

Writes the run's experts (all, or `--topics`) as standard PEFT LoRA adapters plus the router
(centroids, embedder, `router.json`) and a README into `--out`; see `mixie.interop.export`.
"""

from __future__ import annotations

from absl import flags

from mixie import cli
from mixie.errors import ConfigError

_OUT = flags.DEFINE_string("out", None, "export directory (created)")
_TOPICS = flags.DEFINE_string("topics", "", "comma-separated topic ids to export (default: every expert)")


def parse_topics(s: str) -> list[int] | None:
  """'0,3,7' -> [0, 3, 7]; '' -> None (all)."""
  if not s.strip():
    return None
  try:
    return [int(x) for x in s.split(",") if x.strip()]
  except ValueError:
    raise ConfigError(f"--topics={s!r}: expected comma-separated topic ids, e.g. 0,3,7") from None


def main(argv) -> int:
  """CLI entry: exports the run (see the module docstring)."""
  config = cli.config_from_flags(argv)
  if not _OUT.value:
    raise ConfigError("--out is required (the export directory)")
  # deferred: --help and command-line errors answer in 0.2 s, not 4 s (jax and the stage load)
  from mixie.interop.export import export_run

  spec = export_run(config, _OUT.value, parse_topics(_TOPICS.value))
  print(f"mixie.export: {len(spec['adapters'])} adapter(s), router of {spec['router']['num_rows']} rows "
        f"({spec['router']['metric']}, embedder {spec['embedder']['kind']}) in {_OUT.value}", flush=True)
  return 0


if __name__ == "__main__":
  cli.run(main)

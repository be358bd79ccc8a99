"""The frozen base from a config section: `load_base(c.model) -> (LlamaConfig, params, Tokenizer)`.

`c.model.source` picks the reader: "gguf" (a `.gguf` file; an empty path means the shipped
SmolLM2-135M-Instruct), "hf" (a `config.json` + safetensors directory with its `tokenizer.json`), or
"random" (a preset from `mixie.model.llama.PRESETS`, random weights, created already sharded; its
tokenizer is the shipped SmolLM2 one when the vocabulary sizes agree, else None).
"""

from __future__ import annotations

import functools
import pathlib

import jax

from mixie import assets
from mixie.dtypes import DTYPES as _DTYPES  # the one list of dtypes
from mixie.errors import ConfigError, MixieError
from mixie.model import checkpoint
from mixie.model.llama import PRESETS, LlamaConfig, Params, init_params, param_axes
from mixie.model.tokenizer import Tokenizer
from mixie.sharding import tree_shardings


def _numerics(mc) -> dict:
  for field in ("dtype", "param_dtype"):
    if mc[field] not in _DTYPES:
      raise ConfigError(f"model.{field} must be one of {_DTYPES}, got {mc[field]!r}")
  impl = mc.get("attention_impl", "") or None
  if impl not in (None, "xla", "cudnn"):
    raise ConfigError(f"model.attention_impl must be '', 'xla' or 'cudnn', got {impl!r}")
  return dict(dtype=mc.dtype, param_dtype=mc.param_dtype, attention_impl=impl)


def _preset(name: str) -> LlamaConfig:
  if name not in PRESETS:
    raise ConfigError(f"model.preset must be one of {sorted(PRESETS)} with source='random', got {name!r}")
  return PRESETS[name]


def has_shipped_vocab(cfg: LlamaConfig) -> bool:
  """Whether `cfg`'s vocabulary is the shipped SmolLM2 tokenizer's: the only tokenizer a random-weight
  preset can have."""
  return cfg.vocab_size == PRESETS["smollm2_135m"].vocab_size


@functools.lru_cache(maxsize=1)
def _shipped_tokenizer() -> Tokenizer:
  """The shipped SmolLM2 tokenizer, read once per process (reading it from the GGUF takes seconds)."""
  return Tokenizer.from_gguf(assets.smollm2_gguf())


def _shipped_tokenizer_for(cfg: LlamaConfig) -> Tokenizer | None:
  """The shipped SmolLM2 tokenizer when `cfg`'s vocabulary is its own (random presets), else None."""
  return _shipped_tokenizer() if has_shipped_vocab(cfg) else None


def _unknown_source(source) -> ConfigError:
  return ConfigError(f"model.source must be 'gguf', 'hf' or 'random', got {source!r}")


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str, path: str = "", preset: str = "") -> Tokenizer:
  """The tokenizer of a base given as `model.source`, `model.path`, `model.preset`, without its weights.

  A random-weight preset gets the shipped SmolLM2 tokenizer when the vocabulary sizes agree (as
  `load_base`), and `MixieError` otherwise.
  """
  if source == "gguf":
    return Tokenizer.from_gguf(pathlib.Path(path)) if path else _shipped_tokenizer()
  if source == "hf":
    if not path:
      raise ConfigError("model.path: source='hf' needs a checkpoint directory")
    return Tokenizer.from_file(pathlib.Path(path) / "tokenizer.json")
  if source == "random":
    tok = _shipped_tokenizer_for(_preset(preset))
    if tok is None:
      raise MixieError(f"model.preset={preset!r} has no tokenizer (its vocabulary is not SmolLM2's)")
    return tok
  raise _unknown_source(source)


def load_gguf(path: pathlib.Path, *, shardings=None, **numerics) -> tuple[LlamaConfig, Params, Tokenizer]:
  """The config, weights and tokenizer of GGUF file `path`, from one read of its metadata (`numerics`:
  dtype, param_dtype, attention_impl as `checkpoint.load_gguf` takes them)."""
  reader = checkpoint.open_gguf(path)
  cfg, params = checkpoint.load_gguf(path, reader=reader, shardings=shardings, **numerics)
  return cfg, params, Tokenizer.from_gguf(path, reader=reader)


def load_base(mc, *, mesh: jax.sharding.Mesh | None = None, rules=(), seed: int = 0
              ) -> tuple[LlamaConfig, Params, Tokenizer | None]:
  """Loads the base named by config section `mc` (fields source, path, preset, dtype, param_dtype,
  attention_impl).

  With a `mesh`, parameters are placed by the logical sharding `rules` (`c.mesh.rules`) as they are
  read; without, on the first local device. Raises `ConfigError`/`MixieError` naming the field or file.
  """
  num = _numerics(mc)

  def shardings(cfg):
    return None if mesh is None else tree_shardings(param_axes(cfg), mesh, rules)

  source = mc.source
  if source == "gguf":  # weights and tokenizer from one read of the file's metadata
    return load_gguf(pathlib.Path(mc.path) if mc.path else assets.smollm2_gguf(), shardings=shardings, **num)
  if source == "hf":
    tok = load_tokenizer("hf", mc.path)  # checks model.path; fails before the weights are read
    cfg, params = checkpoint.load_hf(mc.path, shardings=shardings, **num)
    return cfg, params, tok
  if source == "random":
    cfg = _preset(mc.preset).replace(**num)
    params = random_params(cfg, jax.random.key(seed), shardings(cfg))
    return cfg, params, _shipped_tokenizer_for(cfg)
  raise _unknown_source(source)


def random_params(cfg: LlamaConfig, key: jax.Array, shardings=None) -> Params:
  """`init_params` compiled with `out_shardings`, so the weights are born sharded."""
  if shardings is None:
    return jax.jit(init_params, static_argnums=0)(cfg, key)
  return jax.jit(init_params, static_argnums=0, out_shardings=shardings)(cfg, key)


def abstract_params(cfg: LlamaConfig) -> Params:
  """`ShapeDtypeStruct`s of the base (no memory): `jax.eval_shape` of `init_params`."""
  return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))

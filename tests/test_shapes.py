"""Full-size bases checked without memory: `jax.eval_shape` of the real initialiser."""

import jax
import pytest

from mixie.model.llama import PRESETS, count_params, param_shapes
from mixie.model.load import abstract_params


@pytest.mark.parametrize("preset, billions, exact", [
    ("tinyllama_1b", 1.10, 1_100_048_384),  # TinyLlama-1.1B: 22 layers, d 2048, 4 kv heads, untied
    ("llama2_7b", 6.74, 6_738_415_616),  # Llama-2-7B: 32 layers, d 4096, MHA, untied
    ("smollm2_135m", 0.13, 134_515_008),  # SmolLM2-135M: 30 layers, d 576, tied embeddings
])
def test_param_count(preset, billions, exact):
  cfg = PRESETS[preset]
  abstract = abstract_params(cfg)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  n = count_params(abstract)
  assert round(n / 1e9, 2) == billions
  assert n == exact
  shapes = jax.tree.map(lambda x: x.shape, abstract)
  assert shapes == param_shapes(cfg)

"""Golden PartitionSpecs: every parameter kind (from the variables' logical-axis metadata) and every
activation kind, under the demo's and the TinyLlama config's `mesh.rules`.

Two meshes per config: its own shape on the 8 test devices, and a 2x2x2 (expert, data, model) mesh on
which every rule shows (mesh axes of size 1 are replicated)."""

import jax
import pytest
from jax.sharding import AbstractMesh

from configs import demo, tinyllama_moin5k
from mixie.model.config import PRESETS
from mixie.model.llama import ACTIVATION_AXES, param_at, param_axes
from mixie.model.load import abstract_params
from mixie.model.lora import LoraConfig
from mixie.sharding import logical_to_spec, make_mesh, mesh_from_config
from mixie.train import optim
from mixie.train.step import TrainSpec, abstract_state, is_axes, state_axes

# kind -> spec on the 2x2x2 mesh (the rules of both configs: heads, kv_heads and mlp on "model",
# batch on "data", experts on "expert", everything else replicated)
PARAMS_222 = {
    "embed": (None, None), "final_norm": (None,), "lm_head": (None, None),
    "attn_norm": (None, None), "mlp_norm": (None, None),
    "q": (None, None, "model"), "k": (None, None, "model"), "v": (None, None, "model"),
    "o": (None, "model", None), "gate": (None, None, "model"), "up": (None, None, "model"),
    "down": (None, "model", None),
}
EXPERT_222 = {"a": ("expert", None, None, None), "b": ("expert", None, None, None)}
ACTIVATIONS_222 = {"tokens": ("expert", "data", None), "slot": ("expert",)}
CONFIGS = [(demo, "", "smollm2_135m"), (tinyllama_moin5k, "", "tinyllama_1b")]


def _spec(names, rules, mesh):
  return tuple(logical_to_spec(names, rules, mesh))


@pytest.mark.parametrize("module, arg, preset", CONFIGS)
def test_parameter_and_activation_specs_on_a_2x2x2_mesh(module, arg, preset):
  c = module.get_config(arg)
  rules = tuple(tuple(r) for r in c.mesh.rules)
  mesh = AbstractMesh((2, 2, 2), tuple(c.mesh.axes))
  cfg = PRESETS[preset]
  axes = param_axes(cfg)
  for kind, want in PARAMS_222.items():
    names = param_at(axes, kind)
    if kind == "lm_head" and cfg.tie_embeddings:
      assert names is None  # tied: the embedding is the head
      continue
    assert _spec(names, rules, mesh) == want, kind
  lora = LoraConfig.from_config(c.lora)
  spec = TrainSpec(cfg=cfg, lora=lora, opt=optim.OptConfig(), slots=4)
  st_axes = state_axes(spec, abstract_state(spec, abstract_params(cfg)))
  for p in lora.targets:
    for k in ("a", "b"):
      assert _spec(st_axes["params"][p][k], rules, mesh) == EXPERT_222[k], (p, k)
  # optimizer state: the Adam moments mirror their parameters, counters and steps are per slot
  opt = jax.tree.leaves(st_axes["opt"], is_leaf=is_axes)
  assert sum(1 for names in opt if _spec(names, rules, mesh) == EXPERT_222["a"]) == 4 * len(lora.targets)
  assert all(_spec(names, rules, mesh)[0] == "expert" for names in opt)
  assert _spec(st_axes["topic"], rules, mesh) == ("expert",)
  assert set(ACTIVATION_AXES) == set(ACTIVATIONS_222)
  for kind, want in ACTIVATIONS_222.items():
    assert _spec(ACTIVATION_AXES[kind], rules, mesh) == want, kind


@pytest.mark.parametrize("module, arg, preset", CONFIGS)
def test_specs_on_the_configs_own_mesh(module, arg, preset):
  """(-1, 1, 1) on 8 devices: experts and their batches split 8 ways, the base replicated."""
  c = module.get_config(arg)
  rules = tuple(tuple(r) for r in c.mesh.rules)
  mesh = mesh_from_config(c.mesh)
  assert dict(mesh.shape) == {"expert": 8, "data": 1, "model": 1}
  cfg = PRESETS[preset]
  for kind, names in jax.tree_util.tree_flatten_with_path(
      param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))[0]:
    assert _spec(names, rules, mesh) == (None,) * len(names), kind
  for k, names in {"a": ("expert", "layers", "lora_in", "lora_rank"),
                   "b": ("expert", "layers", "lora_rank", "lora_out")}.items():
    assert _spec(names, rules, mesh) == ("expert", None, None, None)
  assert _spec(ACTIVATION_AXES["tokens"], rules, mesh) == ("expert", None, None)
  assert _spec(ACTIVATION_AXES["slot"], rules, mesh) == ("expert",)


def test_rules_stay_config_data():
  """The same logical names under other rules give other specs: nothing is hard-coded per kind."""
  mesh = make_mesh((2, 2, 2), ("expert", "data", "model"))
  rules = (("vocab", "model"), ("embed", "data"), ("expert", "expert"))
  axes = param_axes(PRESETS["tinyllama_1b"])
  assert _spec(param_at(axes, "embed"), rules, mesh) == ("model", "data")
  assert _spec(param_at(axes, "lm_head"), rules, mesh) == ("data", "model")
  assert _spec(param_at(axes, "q"), rules, mesh) == (None, "data", None)


def test_the_train_step_is_jitted_with_these_specs():
  """`compile_fns` places the base, the state, the batch and the per-slot values by the same specs."""
  from mixie.train.step import compile_fns
  from train_utils import TINY, tiny_spec

  c = demo.get_config("")
  rules = tuple(tuple(r) for r in c.mesh.rules)
  mesh = make_mesh((2, 2, 2), tuple(c.mesh.axes))
  comp = compile_fns(tiny_spec(4), mesh, rules, abstract_params(TINY))
  assert tuple(param_at(comp.base_shardings, "q").spec) == PARAMS_222["q"]
  assert tuple(param_at(comp.base_shardings, "down").spec) == PARAMS_222["down"]
  assert tuple(comp.state_shardings["params"]["gate"]["b"].spec) == EXPERT_222["b"]
  assert tuple(comp.state_shardings["topic"].spec) == ACTIVATIONS_222["slot"]
  assert tuple(comp.batch_shardings["tokens"].spec) == ACTIVATIONS_222["tokens"]

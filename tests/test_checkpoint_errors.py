"""Bad checkpoints end in one `MixieError` naming the file and the tensor, before any state is built."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from mixie import assets
from mixie.errors import MixieError
from mixie.model import checkpoint

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  path = tmp_path_factory.mktemp("good")
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
  return path


@pytest.fixture
def copy_of(good, tmp_path):
  """A fresh copy of the good checkpoint to break, plus a guard that nothing gets built or written."""

  def make(name="ckpt"):
    d = tmp_path / name
    d.mkdir()
    for f in good.iterdir():
      (d / f.name).write_bytes(f.read_bytes())
    return d

  return make


def _tree(root: pathlib.Path):
  return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


@pytest.fixture
def nothing_built(monkeypatch, tmp_path):
  """Fails the test if a parameter array is created or a file appears/changes under tmp_path."""
  calls = []
  real = jax.make_array_from_callback
  monkeypatch.setattr(checkpoint.jax, "make_array_from_callback",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  before = _tree(tmp_path)
  yield lambda: before
  assert not calls, "parameter arrays were built before the error"


def _raises(fn, *needles):
  with pytest.raises(MixieError) as e:
    fn()
  msg = str(e.value)
  for n in needles:
    assert str(n) in msg, f"{n!r} not in {msg!r}"
  assert "\n" not in msg
  return msg


def test_good_checkpoint_loads(good):
  cfg, params = checkpoint.load_hf(good)
  assert params["layers"]["attn"]["q"]["kernel"].shape == (2, 32, 32)


def test_missing_directory(tmp_path, nothing_built):
  _raises(lambda: checkpoint.load_hf(tmp_path / "no_such_dir"), tmp_path / "no_such_dir", "not found")
  assert _tree(tmp_path) == nothing_built()


def test_missing_config(copy_of, tmp_path, nothing_built):
  d = copy_of()
  (d / "config.json").unlink()
  before = _tree(tmp_path)
  _raises(lambda: checkpoint.load_hf(d), d / "config.json", "not found")
  assert _tree(tmp_path) == before


def test_unknown_architecture(copy_of, tmp_path, nothing_built):
  d = copy_of()
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
  (d / "config.json").write_text(json.dumps(cfg))
  before = _tree(tmp_path)
  _raises(lambda: checkpoint.load_hf(d), d / "config.json", "GPT2LMHeadModel", "unsupported architecture")
  assert _tree(tmp_path) == before


def test_missing_tensor(copy_of, tmp_path, nothing_built):
  d = copy_of()
  f = d / "model.safetensors"
  tensors = load_file(f)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, f)
  before = _tree(tmp_path)
  _raises(lambda: checkpoint.load_hf(d), f, "'model.layers.1.mlp.up_proj.weight'", "missing")
  assert _tree(tmp_path) == before


def test_wrong_shaped_tensor(copy_of, tmp_path, nothing_built):
  d = copy_of()
  f = d / "model.safetensors"
  tensors = load_file(f)
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)  # kv heads: 16 rows
  save_file(tensors, f)
  before = _tree(tmp_path)
  _raises(lambda: checkpoint.load_hf(d), f, "'model.layers.0.self_attn.k_proj.weight'", "[32, 32]",
          "expected [16, 32]")
  assert _tree(tmp_path) == before


def test_truncated_safetensors(copy_of, tmp_path, nothing_built):
  d = copy_of()
  f = d / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[:len(data) - 1000])
  before = _tree(tmp_path)
  msg = _raises(lambda: checkpoint.load_hf(d), f, "truncated")
  assert "tensor '" in msg
  assert _tree(tmp_path) == before


def test_index_names_missing_shard(copy_of, tmp_path, nothing_built):
  d = copy_of()
  names = list(load_file(d / "model.safetensors"))
  (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
  weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
  weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
  (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  _raises(lambda: checkpoint.load_hf(d), d / "model-00002-of-00002.safetensors", "not found")


def test_gguf_missing(tmp_path, nothing_built):
  _raises(lambda: checkpoint.load_gguf(tmp_path / "x.gguf"), tmp_path / "x.gguf", "not found")


@pytest.mark.parametrize("keep, needles", [
    (0.5, ("truncated", "tensor 'blk.")),  # cut in the tensor data: names the first tensor it lost
    (2000, ("truncated or corrupt",)),  # cut in the metadata
])
def test_truncated_gguf(tmp_path, nothing_built, keep, needles):
  src = assets.smollm2_gguf()
  n = int(os.path.getsize(src) * keep) if keep < 1 else keep
  bad = tmp_path / "cut.gguf"
  with open(src, "rb") as f:
    bad.write_bytes(f.read(n))
  before = _tree(tmp_path)
  _raises(lambda: checkpoint.load_gguf(bad), bad, *needles)
  assert _tree(tmp_path) == before


def _model_section(**kw):
  from configs.common import base_config

  c = base_config().model
  c.update(kw)
  return c


@pytest.mark.parametrize("kw, needle", [
    (dict(source="onnx"), "model.source"),
    (dict(dtype="float8"), "model.dtype"),
    (dict(param_dtype="int4"), "model.param_dtype"),
    (dict(attention_impl="flash"), "model.attention_impl"),
    (dict(source="random", preset="gpt5"), "model.preset"),
    (dict(source="hf", path=""), "model.path"),
])
def test_load_base_config_errors(kw, needle):
  from mixie.errors import ConfigError
  from mixie.model.load import load_base

  with pytest.raises(ConfigError, match=needle):
    load_base(_model_section(**kw))


def test_load_base_hf_without_tokenizer(good, nothing_built):
  from mixie.model.load import load_base

  _raises(lambda: load_base(_model_section(source="hf", path=str(good))), good / "tokenizer.json",
          "not found")


def test_load_base_hf(good, tmp_path):
  """source="hf": weights, numerics from the config, and the directory's tokenizer.json."""
  import tokenizers

  from mixie.model.load import load_base

  d = tmp_path / "ckpt"
  d.mkdir()
  for f in good.iterdir():
    (d / f.name).write_bytes(f.read_bytes())
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<s>": 0, "</s>": 1, "a": 2}, unk_token="a"))
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  cfg, params, t = load_base(_model_section(source="hf", path=str(d), param_dtype="bfloat16",
                                            attention_impl="xla"))
  # EOS: tokenizer_config's "</s>" (1) and config.json's / generation_config.json's eos_token_id (2)
  assert (cfg.param_dtype, cfg.attention_impl, t.bos_id, t.eos_ids) == ("bfloat16", "xla", 0, (1, 2))
  assert params["layers"]["attn"]["q"]["kernel"].dtype == jax.numpy.bfloat16

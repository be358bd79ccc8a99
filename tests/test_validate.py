"""Every input of a run is checked before the first stage computes: a corrupt base fails before any
embedding, with one clean message naming the file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs.common import base_config
from mixie import assets
from mixie.cluster import embed as embed_lib
from mixie.cluster import topics as topics_lib
from mixie.errors import ConfigError, MixieError
from mixie.train import main as train_main
from mixie.validate import check_base, check_run_inputs
from run_utils import write_tiny_hf_llama

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, **model):
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"text": f"Document {i} is about subject {i % 3}."}) + "\n"
                          for i in range(24)))
  c = base_config()
  c.workdir = str(tmp_path / "w")
  c.data.source, c.data.path = "jsonl", str(docs)
  c.cluster.embedder, c.cluster.tfidf_dim, c.cluster.k = "tfidf", 8, 2
  c.train.slots = 8  # one per fake device
  c.model.update(model)
  return c


def _truncated_gguf(tmp_path) -> Path:
  """The shipped GGUF cut after 64 KiB, as a broken download leaves it (inside its metadata, so that
  the reader gives up early: a later cut is the same check after a longer parse)."""
  p = tmp_path / "broken.gguf"
  with assets.smollm2_gguf().open("rb") as f:
    p.write_bytes(f.read(64 << 10))
  return p


GGUF_ERROR = "truncated or corrupt GGUF file"


@pytest.fixture
def no_embedding(monkeypatch):
  """Fails the test if anything is embedded (the first compute of a run)."""
  def boom(*a, **k):
    raise AssertionError("an embedder was made before the inputs were checked")
  monkeypatch.setattr(embed_lib, "make_embedder", boom)
  monkeypatch.setattr(topics_lib, "make_embedder", boom, raising=False)  # if imported at the top


def test_corrupt_base_fails_before_any_embedding(tmp_path, no_embedding):
  gguf = _truncated_gguf(tmp_path)
  c = _config(tmp_path, source="gguf", path=str(gguf))
  for run in (train_main.run, topics_lib.run_cluster):  # the main job and the cluster stage alone
    with pytest.raises(MixieError, match=f"{gguf}: {GGUF_ERROR}"):
      run(c, log=lambda *_: None)
    assert not (tmp_path / "w" / "topics").exists()

  hf = write_tiny_hf_llama(tmp_path / "hf")
  ok = _config(tmp_path, source="hf", path=str(hf))
  st, tok = hf / "model.safetensors", hf / "tokenizer.json"
  tok.rename(hf / "elsewhere.json")
  with pytest.raises(MixieError, match="tokenizer.json"):
    check_run_inputs(ok)
  (hf / "elsewhere.json").rename(tok)
  check_run_inputs(ok)  # an intact base and a good corpus pass
  weights = st.read_bytes()
  st.write_bytes(weights[:len(weights) // 2])
  with pytest.raises(MixieError, match=f"{st}: tensor '.*' lies past the end of the file"):
    topics_lib.run_cluster(ok, log=lambda *_: None)
  cfg = json.loads((hf / "config.json").read_text())
  (hf / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
  with pytest.raises(MixieError, match="config.json: attention_bias=True is not supported for the llama family"):
    check_base(ok.model)
  with pytest.raises(ConfigError, match="model.source"):
    check_base(_config(tmp_path, source="onnx").model)
  c = _config(tmp_path)
  c.data.path = str(tmp_path / "missing.jsonl")
  with pytest.raises(MixieError, match="missing.jsonl.*no such file"):
    train_main.validate_config(c)
  assert not (tmp_path / "w" / "topics").exists()


def test_cli_corrupt_base_is_one_error_line(tmp_path):
  gguf = _truncated_gguf(tmp_path)
  c = _config(tmp_path)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "mixie.train", "--config=configs/demo.py:tiny",
                      f"--workdir={tmp_path / 'w'}", f"--config.model.path={gguf}",
                      f"--config.data.source=jsonl", f"--config.data.path={c.data.path}",
                      "--config.cluster.embedder=tfidf", "--config.cluster.k=2"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"mixie: error: {gguf}: {GGUF_ERROR}")
  assert r.stdout == "" and not (tmp_path / "w" / "topics").exists()

"""The expert lifecycle through its CLI (`python -m mixie.experts`) on a tiny trained run whose topics come
from MiniLM embeddings of 240 Wikipedia summaries: `add` of standard-library code (a new domain) makes new
experts, its documents (and unseen code) route to them, and every other expert keeps its file, bytes and
hash; `retire` takes an expert out of centroid, kNN and top-k routing and `restore` brings it back;
`history` and `rollback`; a commit SIGKILLed between its weight writes and the generation switch leaves
the current generation whole, and a running server keeps serving it, then follows the next commit;
`retrain` in a run of branched experts (`train.init = "seed"`) starts from the run's seed adapter."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs.demo import get_config
from conftest import ROOT, TINY_RUN_OVERRIDES
from mixie.cluster.embed import load_embedder
from mixie.cluster.topics import topics_dir
from mixie.data import stdlib_corpus
from mixie.model.checkpoint import fingerprint
from mixie.model.load import load_base
from mixie.route.run import build_router
from mixie.serve.run import make_server
from mixie.store import ExpertMeta, ExpertStore, run_store
from mixie.store_versions import CURRENT, PAUSE_ENV, manifest_path
from run_utils import write_tiny_hf_llama

pytestmark = pytest.mark.slow

# the tiny run of conftest with MiniLM topics (tf-idf over 240 summaries knows too few words to tell code
# from prose); 4 topics, 4 experts
OVERRIDES = {**TINY_RUN_OVERRIDES, "cluster.embedder": "minilm", "cluster.embed_tokens": 32}
MODES = ("centroid", "knn", "topk")


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device in the subprocesses
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return env


def _cli(life, module, *args, env=None, check=True):
  """Runs `python -m module` with the command and flags of `args` on the run (config flags first)."""
  cmd = [sys.executable, "-m", module, *[a for a in args if not a.startswith("--")],
         "--config=configs/demo.py:tiny", f"--workdir={life['wd']}"] + [
      f"--config.{k}={v}" for k, v in life["over"].items()] + [a for a in args if a.startswith("--")]
  r = subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=900)
  assert not check or r.returncode == 0, f"{module} {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
  return r


def _config(life):
  c = get_config("tiny")
  c.workdir = str(life["wd"])
  for k, v in life["over"].items():  # the values of TINY_RUN_OVERRIDES, tuples written for the command line
    section, field = k.split(".")
    c[section][field] = tuple(int(x) for x in v.strip("()").split(",") if x) if str(v).startswith("(") else v
  return c


def _code(lo, hi):
  docs, _ = stdlib_corpus.stdlib_documents(str(stdlib_corpus.stdlib_root()))
  return [text for text, label, *_ in docs if label == "stdlib/code"][lo:hi]


def _weights(store):
  return {t: (store.weights_file(t), store.weights_file(t).read_bytes(), store.sha256(t))
          for t in store.topics()}


@pytest.fixture(scope="module")
def life(tmp_path_factory):
  """The run trained, then `add --docs` of 80 pieces of standard-library code, each a subprocess."""
  tmp = tmp_path_factory.mktemp("lifecycle")
  hf = write_tiny_hf_llama(tmp / "hf")
  life = {"wd": tmp / "wd", "over": {**OVERRIDES, "model.path": str(hf)}, "tmp": tmp}
  _cli(life, "mixie.train")
  life["before"] = _weights(run_store(life["wd"]))
  life["gen_before"] = run_store(life["wd"]).generation
  life["docs"] = _code(0, 80)
  (tmp / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in life["docs"]))
  life["add"] = _cli(life, "mixie.experts", "add", f"--docs={tmp / 'code.jsonl'}")
  c = _config(life)
  cfg, params, tok = load_base(c.model)
  life.update(config=c, loaded=(cfg, params, tok),
              embedder=load_embedder(topics_dir(life["wd"]) / "embedder"))
  return life


def _routes(life, texts, mode):
  r = build_router(life["config"], mode=mode).route_queries(life["embedder"], life["loaded"][2], texts=texts)
  return r.expert_ids


def test_add_of_a_new_domain_makes_new_experts_and_keeps_every_other_file(life):
  store = run_store(life["wd"])
  assert store.generation == life["gen_before"] + 1 and "new expert(s)" in life["add"].stdout
  new = sorted(set(store.topics()) - set(life["before"]))
  assert new and min(new) >= 4 and all(store.meta(t).centroid is not None for t in new)
  after = _weights(store)
  for t, (f, data, sha) in life["before"].items():  # the very same file, bytes and hash
    assert after[t][0] == f and after[t][1] == data and after[t][2] == sha
  # the added documents, and code the run never saw, route to the new experts in every mode
  unseen = _code(80, 120)
  for mode in MODES:
    for texts in (life["docs"], unseen):
      top1 = _routes(life, texts, mode)[:, 0]
      assert np.isin(top1, new).mean() >= 0.95, (mode, np.bincount(top1))
  batch = json.loads(next((life["wd"] / "added").glob("*/batch.json")).read_text())
  assert sum(t["docs"] for t in batch["new_topics"]) >= 0.9 * len(life["docs"])
  assert sorted(t["topic"] for t in batch["new_topics"]) == new


def test_retire_restore_history_and_rollback_through_the_cli(life):
  store = run_store(life["wd"])
  g0, new = store.generation, sorted(set(store.topics()) - set(life["before"]))
  docs = life["docs"]
  victim = int(np.bincount(_routes(life, docs, "centroid")[:, 0]).argmax())  # the expert most code goes to
  r = _cli(life, "mixie.experts", "retire", f"--topic={victim}")
  assert f"generation {g0 + 1}" in r.stdout and store.retired() == {victim}
  assert store.meta(victim) is not None and store.load(victim, None)[0]  # weights kept
  for mode in MODES:
    ids = _routes(life, docs, mode)
    assert victim not in ids, mode  # no query reaches it, top-k columns and kNN votes included
    assert len(new) == 1 or np.isin(ids[:, 0], new).any(), mode  # another new expert takes code
  listing = _cli(life, "mixie.experts", "list").stdout.splitlines()
  assert any(line.split()[:3] == [str(victim), "expert", "RETIRED"] for line in listing)
  r = _cli(life, "mixie.experts", "restore", f"--topic={victim}")
  assert f"generation {g0 + 2}" in r.stdout and store.retired() == set()
  assert victim in _routes(life, docs, "centroid")
  hist = _cli(life, "mixie.experts", "history").stdout.splitlines()
  assert hist[-1].split()[0] == str(g0 + 2) and hist[-1].endswith("<- current")
  assert "retire expert(s)" in hist[-2] and len(hist) == g0 + 2
  # rollback to the generation before `add`: the new experts and the added documents leave routing
  r = _cli(life, "mixie.experts", "rollback", f"--to={life['gen_before']}")
  assert f"generation {g0 + 3} = generation {life['gen_before']}" in r.stdout
  assert store.topics() == sorted(life["before"]) and _weights(store) == life["before"]
  for mode in MODES:
    assert not np.isin(_routes(life, docs, mode), new).any(), mode
  r = _cli(life, "mixie.experts", "rollback", f"--to={g0 + 2}")  # and back again
  assert sorted(store.topics()) == sorted(life["before"]) + new


def test_sigkill_between_weight_writes_and_switch_keeps_the_generation_served(life):
  store = run_store(life["wd"])
  g = store.generation
  server = make_server(life["config"], loaded=life["loaded"])
  prompts = life["docs"][:4]
  first = server.generate(prompts, max_new_tokens=2)
  assert all(x.error is None for x in first) and server.view.generation == g
  before = _weights(store)
  marker = life["tmp"] / "pause"
  # retrain an expert with another seed (other bytes), paused right before the switch, then SIGKILLed
  env = {**_env(), PAUSE_ENV: str(marker)}
  cmd = [sys.executable, "-m", "mixie.experts", "retrain", f"--topic={min(life['before'])}",
         "--config=configs/demo.py:tiny", f"--workdir={life['wd']}", "--config.seed=1"] + [
             f"--config.{k}={v}" for k, v in life["over"].items()]
  p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  t0 = time.time()
  while not marker.exists():
    assert p.poll() is None, "retrain ended before its switch"
    assert time.time() - t0 < 600, "retrain never reached its switch"
    time.sleep(0.2)
  os.kill(p.pid, signal.SIGKILL)
  p.wait()
  assert marker.read_text().strip() == str(g + 1)
  assert manifest_path(life["wd"] / "experts", g + 1).exists()  # written, never made current
  blobs = {f.name for f in (life["wd"] / "experts" / "blobs").iterdir()}
  assert len(blobs - {b[0].name for b in before.values()}) >= 1  # the new weights were written
  assert (life["wd"] / "experts" / CURRENT).read_text().strip() == str(g)
  assert store.generation == g and _weights(store) == before and store.history()[-1].number == g
  for t in store.topics():
    store.load(t, None)  # every expert of the current generation loads, hash-checked
  again = server.generate(prompts, max_new_tokens=2)
  assert server.view.generation == g and [x.tokens for x in again] == [x.tokens for x in first]
  marker.unlink()
  # the next commit takes the orphan's number, and the server follows it before its next batch
  victim = first[0].expert
  _cli(life, "mixie.experts", "retire", f"--topic={victim}")
  assert store.generation == g + 1 and store.retired() == {victim}
  last = server.generate(prompts, max_new_tokens=2)
  assert server.view.generation == g + 1
  assert all(x.error is None and x.expert != victim for x in last)


def test_retrain_in_a_branched_run_starts_from_its_seed_adapter(life):
  store = run_store(life["wd"])
  t = min(life["before"])
  old = store.meta(t)
  cfg, params, _ = life["loaded"]
  seed_dir = life["tmp"] / "seed"
  seed = {p: {k: np.full_like(v, 0.01) for k, v in ab.items()} for p, ab in store.load(t, None)[0].items()}
  ExpertStore(seed_dir).write(0, seed, ExpertMeta.new(old.lora, fingerprint(cfg, params), kind="seed",
                                                       tokens_seen=1234, seq_len=32))
  _cli(life, "mixie.experts", "retrain", f"--topic={t}", "--config.train.init=seed",
       f"--config.train.seed_dir={seed_dir}")
  new = store.meta(t)
  assert new.extra["init"] == "seed" and new.extra["seed"]["dir"] == str(seed_dir)
  assert new.extra["seed"]["tokens_seen"] == 1234
  assert new.budget == round(0.5 * old.budget) and new.tokens_seen < old.tokens_seen  # the branch's share
  assert store.sha256(t) != life["before"][t][2]

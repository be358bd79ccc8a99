"""Shared helpers of the training tests: a tiny random base and a synthetic checkpointable loader."""

from __future__ import annotations

import jax
import numpy as np

from mixie.model.llama import LlamaConfig, init_params
from mixie.model.lora import LoraConfig
from mixie.sharding import make_mesh
from mixie.train import optim
from mixie.train.step import TrainSpec

TINY = LlamaConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, rope_theta=1e4)
RULES = (("expert", "expert"), ("batch", "data"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"))


def tiny_base(seed=0, cfg=TINY):
  return init_params(cfg, jax.random.PRNGKey(seed))


def tiny_spec(slots, *, mode="experts", dropout=0.0, wd=0.0, lr=1e-2, clip=1.0, cfg=TINY, rank=4,
              targets=("q", "k", "v", "o", "gate", "up", "down"), warmup=2, seed=0):
  return TrainSpec(cfg=cfg, lora=LoraConfig(rank=rank, alpha=2.0 * rank, dropout=dropout, targets=targets),
                   opt=optim.OptConfig(lr=lr, warmup_steps=warmup, weight_decay=wd, grad_clip=clip),
                   slots=slots, mode=mode, seed=seed)


def mesh(shape=(1, 1, 1)):
  n = int(np.prod(shape))
  return make_mesh(shape, ("expert", "data", "model"), jax.devices()[:n])


def topic_rows(topic: int, step: int, b: int, T: int, vocab: int):
  """Deterministic token rows of `topic` at its own step (a topic-specific token distribution)."""
  rng = np.random.default_rng([topic, step])
  lo = (topic * 13) % (vocab - 20)
  return rng.integers(lo, lo + 20, (b, T + 1)).astype(np.int32)


def batch_for(topics, steps, b, T, vocab, empty=()):
  """A `[E, b, T]` batch for slots holding `topics`, each at its own step; slots in `empty` get no data."""
  rows = np.stack([topic_rows(t, s, b, T, vocab) for t, s in zip(topics, steps)])
  mask = np.ones((len(topics), b, T), np.float32)
  for e in empty:
    mask[e] = 0
  return {"tokens": rows[:, :, :-1], "targets": rows[:, :, 1:], "loss_mask": mask}


class SyntheticLoader:
  """The loader protocol of `mixie.train.loop` over synthetic per-topic streams (JSON-able state)."""

  def __init__(self, n_slots, b, T, vocab, nan_topic=None):
    self.b, self.T, self.vocab = b, T, vocab
    self.slots = [{"topic": -1, "step": 0} for _ in range(n_slots)]

  def set_slot(self, e, topic):
    self.slots[e] = {"topic": int(topic), "step": 0}

  def state(self):
    return {"slots": [dict(s) for s in self.slots]}

  def restore(self, s):
    self.slots = [dict(x) for x in s["slots"]]

  def next_batch(self):
    E = len(self.slots)
    inputs = np.zeros((E, self.b, self.T), np.int32)
    targets = np.zeros((E, self.b, self.T), np.int32)
    mask = np.zeros((E, self.b, self.T), np.float32)
    for e, s in enumerate(self.slots):
      if s["topic"] < 0:
        continue
      rows = topic_rows(s["topic"], s["step"], self.b, self.T, self.vocab)
      inputs[e], targets[e], mask[e] = rows[:, :-1], rows[:, 1:], 1.0
      s["step"] += 1
    return {"inputs": inputs, "targets": targets, "loss_mask": mask,
            "slot_tokens": mask.sum((1, 2)).astype(np.int32)}

"""Compute accounting (`mixie.compute`) against independent counts: the FLOPs per token equal the matmuls of
the compiled train step, built with remat "none" (counted from their shapes in XLA's optimised HLO,
`hlo_flops.dot_flops`), and every evaluation row's tokens and FLOPs equal the tokens the trained steps
counted on the devices (metrics.jsonl) times that count.

Tolerance: none for FLOPs per token (both sides count the same integer multiply-adds; the test fails
the day XLA computes more or fewer matmuls than the formulas say, e.g. a recomputation); 1e-9 relative
for a row's FLOPs (a sum of float products)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from mixie import compute
from mixie.model.checkpoint import config_from_hf
from mixie.model.llama import init_params
from mixie.model.lora import LoraConfig
from mixie.train.step import compile_fns, create_state
from hlo_flops import dot_flops
from train_utils import RULES, TINY, mesh, tiny_base, tiny_spec

B, T = 2, 16


def _step_flops_per_token(spec, cfg, base, b=B, t=T) -> float:
  """Matmul FLOPs of one compiled train step per token position, from XLA's optimised HLO. The step
  keeps every activation (remat "none"): model FLOPs leave recomputation out (`mixie.compute`)."""
  spec = dataclasses.replace(spec, remat="none")
  m = mesh()
  comp = compile_fns(spec, m, RULES, jax.eval_shape(lambda: base))
  n = spec.slots
  state = create_state(spec, m, RULES, base, np.arange(n), np.full(n, 5), comp)
  batch = {"tokens": np.zeros((n, b, t), np.int32), "targets": np.zeros((n, b, t), np.int32),
           "loss_mask": np.ones((n, b, t), np.float32)}
  hlo = comp.step.lower(state, base if spec.lora_mode else None, batch).compile().as_text()
  return dot_flops(hlo) / (n * b * t)


@pytest.mark.parametrize("kw", [{}, {"targets": ("gate", "up", "down")}, {"targets": ("o", "v")},
                                {"rank": 12, "slots": 1}, {"mode": "full", "slots": 1}],
                         ids=["all-targets", "mlp", "o-v", "rank12-E1", "full"])
def test_flops_per_token_equal_the_compiled_steps_matmuls(kw):
  kw = dict(kw)
  spec = tiny_spec(kw.pop("slots", 2), **kw)
  want = _step_flops_per_token(spec, TINY, tiny_base())
  got = compute.train_flops_per_token(TINY, T, spec.lora if spec.lora_mode else None)
  assert got == want


def test_the_textbook_totals():
  """4N (frozen) and 6N (full) plus attention and LoRA, as the module docstring derives them."""
  n = compute.matmul_params(TINY)
  attn = TINY.n_layers * 12 * T * TINY.n_heads * TINY.head_dim
  assert compute.train_flops_per_token(TINY, T, None) == 6 * n + attn
  lora = LoraConfig(rank=4, targets=("q", "down"))
  d, f, qd = TINY.d_model, TINY.d_ff, TINY.n_heads * TINY.head_dim
  assert compute.train_flops_per_token(TINY, T, lora) == 4 * n + attn + TINY.n_layers * 6 * 4 * (d + qd + f + d)


def _device_tokens(workdir, mode):
  """Tokens the train steps of `mode` counted on the devices (the loss mask), from metrics.jsonl."""
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return sum(e["tokens"] for l in lines if l["mode"] == mode for e in l["experts"])


@pytest.mark.slow
def test_every_rows_tokens_and_flops_equal_an_independent_count(tiny_sweep):
  points = tiny_sweep["dir"] / "points"
  hf = json.loads((tiny_sweep["hf"] / "config.json").read_text())
  cfg = config_from_hf(hf)
  base = init_params(cfg, jax.random.PRNGKey(0))  # the shapes of the sweep's base (the values do not matter)
  seq = 32  # the tiny sweep's dataset.seq_len
  per_token = {name: _step_flops_per_token(tiny_spec(slots, cfg=cfg, rank=rank, mode=mode), cfg, base, t=seq)
               for name, slots, rank, mode in (("r8", 4, 8, "experts"), ("r32", 1, 32, "lora_all"),
                                               ("full", 1, 8, "full"))}
  res = json.loads((points / "scratch" / "eval" / "results.json").read_text())
  want = {"base": (0, 0.0), "lora_all": _device_tokens(points / "scratch", "lora_all"),
          "lora_all_wide": _device_tokens(points / "scratch", "lora_all_wide"),
          "full": _device_tokens(points / "scratch", "full"),
          "centroid": _device_tokens(points / "scratch", "experts")}
  fpt = {"lora_all": per_token["r8"], "lora_all_wide": per_token["r32"], "full": per_token["full"],
         "centroid": per_token["r8"]}
  assert res["rows"] == ["base", "lora_all", "lora_all_wide", "full", "centroid", "oracle"]
  for row in res["rows"]:
    got = res["compute"][row]
    tokens = want.get(row, want["centroid"])
    if row == "base":
      assert (got["tokens"], got["flops"]) == (0, 0.0)
      continue
    assert got["tokens"] == tokens > 0, row
    assert got["flops"] == pytest.approx(tokens * fpt.get(row, fpt["centroid"]), rel=1e-9), row
  # the branched point: its experts' tokens plus, once, the seed adapter's
  seed_res = json.loads((points / "seed" / "eval" / "results.json").read_text())
  n = _device_tokens(points / "seed", "experts") + _device_tokens(points / "seed", "seed")
  for row in ("centroid", "oracle"):
    assert seed_res["compute"][row]["tokens"] == n
    assert seed_res["compute"][row]["flops"] == pytest.approx(n * per_token["r8"], rel=1e-9)

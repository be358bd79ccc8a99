"""Training speed of stacked experts vs the same experts one after another, and vs HF PEFT; prints JSON.

CPU section (always): SmolLM2-135M (the shipped GGUF, f32), E experts (default 8), LoRA rank 8 on all
seven projections, b rows x T tokens per expert per step (default 1 x 32: short sequences), AdamW.
- `mixie_stacked`: the E experts in one jitted step (`mixie.train.step`, vmapped over the slots).
- `mixie_sequential`: the same code with E = 1, the experts trained one after another.
- `peft_sequential`: transformers + peft (torch CPU) on the same weights, one LoRA adapter per expert
  (same rank, alpha, targets), trained one after another with torch AdamW.
Each side trains `--steps` timed steps per expert after one untimed warm-up step (compilation for
JAX); the sides are interleaved `--repeats` times and the best repeat is reported (the machine may be
shared). tokens/s counts scored tokens (E x b x T per stacked step).

GPU section (only when JAX sees a GPU; `--gpu-smoke` runs its code path on tiny shapes anywhere):
TinyLlama-1.1B-shaped random weights, bf16 base and compute, rank 16 on all projections, sequences of
2048, E slots x b rows; tokens/s and model TFLOP/s = tokens/s x (4 N + attention + LoRA) where N counts
the base's matmul weights (the layers and the LM head, not the input embedding): a frozen base costs a
forward (2N) plus activation gradients (2N) per token. Attention per token and layer: forward
2 x 2 x T x d_attn, backward twice that, halved for causality: 6 x T x d_attn. LoRA: 6 x its params.

    python bench/train_experts.py [--experts 8 --batch 1 --seq 32 --steps 3 --repeats 2 --threads 0]
    python bench/train_experts.py --sections gpu [--slots 8,16]

Imports only jax/flax/optax/numpy/torch/transformers/peft and mixie.model / mixie.train core /
mixie.interop.peft (etils and safetensors: orbax and transformers bring them), via bench/hf_peer.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _threads_from_argv() -> int:
  """`--threads N` is read before JAX starts: XLA's CPU thread pool is sized from XLA_FLAGS."""
  for i, a in enumerate(sys.argv):
    if a == "--threads" and i + 1 < len(sys.argv):
      return int(sys.argv[i + 1])
    if a.startswith("--threads="):
      return int(a.split("=", 1)[1])
  return 0


_THREADS = _threads_from_argv()
if _THREADS:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen="
                             f"{'true' if _THREADS > 1 else 'false'} intra_op_parallelism_threads={_THREADS}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_peer import hf_llama_config, peft_targets  # noqa: E402
from mixie.model.llama import PRESETS, init_params  # noqa: E402
from mixie.model.lora import LoraConfig  # noqa: E402
from mixie.sharding import make_mesh  # noqa: E402
from mixie.train import optim  # noqa: E402
from mixie.train.step import TrainSpec, compile_fns, create_state  # noqa: E402

RULES = (("expert", "expert"), ("batch", "data"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"))


def _batches(n_steps, E, b, T, vocab, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n_steps):
    rows = rng.integers(0, vocab, (E, b, T + 1)).astype(np.int32)
    out.append({"tokens": rows[:, :, :-1], "targets": rows[:, :, 1:],
                "loss_mask": np.ones((E, b, T), np.float32)})
  return out


# ---------------------------------------------------------------------------------------------------
# mixie


def _mixie_runner(cfg, base, E, steps, b, T, lora):
  """Returns fn() that trains E slots for `steps` steps (after a compiled warm-up) and its token count."""
  spec = TrainSpec(cfg=cfg, lora=lora, opt=optim.OptConfig(lr=1e-3, warmup_steps=1), slots=E)
  mesh = make_mesh((1, 1, 1), ("expert", "data", "model"), jax.devices()[:1])
  comp = compile_fns(spec, mesh, RULES, jax.eval_shape(lambda: base))
  batches = [jax.device_put(x, comp.batch_shardings) for x in _batches(steps + 1, E, b, T, cfg.vocab_size)]
  holder = {"state": create_state(spec, mesh, RULES, base, np.arange(E), np.full(E, steps + 1), comp)}
  holder["state"], m = comp.step(holder["state"], base, batches[0])  # warm-up: compile
  jax.block_until_ready(m)

  def run():
    st = holder["state"]
    for x in batches[1:]:
      st, m = comp.step(st, base, x)
    jax.block_until_ready((st, m))
    holder["state"] = st

  return run, steps * E * b * T


def mixie_stacked(cfg, base, E, steps, b, T, lora):
  return _mixie_runner(cfg, base, E, steps, b, T, lora)


def mixie_sequential(cfg, base, E, steps, b, T, lora):
  runs = [_mixie_runner(cfg, base, 1, steps, b, T, lora)[0] for _ in range(E)]

  def run():
    for r in runs:
      r()

  return run, steps * E * b * T


# ---------------------------------------------------------------------------------------------------
# HF PEFT


def _hf_model(cfg, base):
  import torch
  import transformers

  from mixie.model.checkpoint import hf_tensors
  model = transformers.LlamaForCausalLM(hf_llama_config(cfg))
  sd = hf_tensors(cfg, base)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
  if cfg.tie_embeddings:
    model.tie_weights()
  return model


def peft_sequential(cfg, base, E, steps, b, T, lora, hf=None):
  import peft
  import torch
  model = hf if hf is not None else _hf_model(cfg, base)
  pcfg = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                         target_modules=peft_targets(lora.targets))
  pm = peft.get_peft_model(model, pcfg, adapter_name="e0")
  for e in range(1, E):
    pm.add_adapter(f"e{e}", pcfg)
  batches = _batches(steps + 1, E, b, T, cfg.vocab_size)
  loss_fn = torch.nn.CrossEntropyLoss()
  opts = {}

  def train_one(e, xs):
    pm.set_adapter(f"e{e}")
    params = [p for n, p in pm.named_parameters() if f".e{e}." in n]
    if e not in opts:
      opts[e] = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for x in xs:
      tok = torch.from_numpy(x["tokens"][e].astype(np.int64))
      tgt = torch.from_numpy(x["targets"][e].astype(np.int64))
      logits = pm(input_ids=tok).logits
      loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
      opts[e].zero_grad(set_to_none=True)
      loss.backward()
      opts[e].step()

  pm.train()
  for e in range(E):  # warm-up step of every adapter
    train_one(e, batches[:1])

  def run():
    for e in range(E):
      train_one(e, batches[1:])

  return run, steps * E * b * T


# ---------------------------------------------------------------------------------------------------
# Sections


def cpu_section(args):
  import torch
  threads = _THREADS or os.cpu_count() or 1
  torch.set_num_threads(threads)  # the same thread budget as XLA's CPU pool
  if args.model == "gguf":
    from mixie import assets
    from mixie.model.checkpoint import load_gguf
    cfg, base = load_gguf(assets.smollm2_gguf())
  else:
    cfg = PRESETS["smollm2_135m"]
    base = init_params(cfg, jax.random.PRNGKey(0))
  lora = LoraConfig(rank=8, alpha=16.0)
  E, b, T, steps = args.experts, args.batch, args.seq, args.steps
  sides = {"mixie_stacked": mixie_stacked, "mixie_sequential": mixie_sequential,
           "peft_sequential": peft_sequential}
  runners = {}
  for name, make in sides.items():
    t0 = time.perf_counter()
    runners[name] = make(cfg, base, E, steps, b, T, lora)
    print(f"# {name}: set up + warm-up {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
  best = {k: float("inf") for k in runners}
  for _ in range(args.repeats):
    for name, (run, _) in runners.items():  # interleaved
      t0 = time.perf_counter()
      run()
      best[name] = min(best[name], time.perf_counter() - t0)
  tps = {k: runners[k][1] / best[k] for k in runners}
  return {
      "model": f"SmolLM2-135M ({args.model}), f32", "experts": E, "rows_per_expert": b, "seq_len": T,
      "timed_steps_per_expert": steps, "rank": lora.rank, "targets": list(lora.targets),
      "repeats": args.repeats, "cpu_cores": os.cpu_count(), "threads_per_side": threads,
      "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
      "seconds_best": {k: round(v, 3) for k, v in best.items()},
      "ratio_stacked_vs_sequential": round(tps["mixie_stacked"] / tps["mixie_sequential"], 2),
      "ratio_stacked_vs_peft": round(tps["mixie_stacked"] / tps["peft_sequential"], 2),
      "ratio_sequential_vs_peft": round(tps["mixie_sequential"] / tps["peft_sequential"], 2),
  }


def _flops_per_token(cfg, lora, T):
  L, D, F, V = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
  d_attn = cfg.n_heads * cfg.head_dim
  kv = cfg.n_kv_heads * cfg.head_dim
  n_matmul = L * (2 * D * d_attn + 2 * D * kv + 3 * D * F) + D * V
  attn = 6 * L * T * d_attn
  n_lora = L * sum(lora.rank * (s_in + s_out) for s_in, s_out in
                   [(D, d_attn), (D, kv), (D, kv), (d_attn, D), (D, F), (D, F), (F, D)])
  return 4 * n_matmul + attn + 6 * n_lora, n_matmul


def gpu_section(args, smoke=False):
  if smoke:
    cfg = PRESETS["tinyllama_1b"].replace(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                          vocab_size=512, head_dim=16, dtype="bfloat16",
                                          param_dtype="bfloat16")
    T, slots_list, steps = 64, [2], 2
  else:
    cfg = PRESETS["tinyllama_1b"].replace(dtype="bfloat16", param_dtype="bfloat16")
    T, slots_list, steps = args.gpu_seq, [int(s) for s in args.slots.split(",")], args.gpu_steps
  lora = LoraConfig(rank=16, alpha=32.0)
  base = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  flops_tok, n_matmul = _flops_per_token(cfg, lora, T)
  label = "tiny smoke shapes (random), bf16" if smoke else "TinyLlama-1.1B shape (random), bf16"
  out = {"device": str(jax.devices()[0].device_kind), "model": label,
         "seq_len": T, "rank": lora.rank, "base_matmul_params": n_matmul,
         "flops_per_token": flops_tok, "runs": []}
  for E in slots_list:
    for remat in (["minimal", "full"] if not smoke else ["full"]):
      spec = TrainSpec(cfg=cfg, lora=lora, opt=optim.OptConfig(lr=1e-4, warmup_steps=1), slots=E, remat=remat)
      mesh = make_mesh((1, 1, 1), ("expert", "data", "model"), jax.devices()[:1])
      rec = {"slots": E, "rows_per_slot": args.gpu_batch if not smoke else 1, "remat": remat}
      try:
        comp = compile_fns(spec, mesh, RULES, jax.eval_shape(lambda: base))
        b = rec["rows_per_slot"]
        batches = [jax.device_put(x, comp.batch_shardings) for x in _batches(2, E, b, T, cfg.vocab_size)]
        st = create_state(spec, mesh, RULES, base, np.arange(E), np.full(E, 1000), comp)
        t0 = time.perf_counter()
        st, m = comp.step(st, base, batches[0])
        jax.block_until_ready(m)
        rec["compile_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        for i in range(steps):
          st, m = comp.step(st, base, batches[i % 2])
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / steps
        tps = E * b * T / dt
        rec.update(step_s=round(dt, 4), tokens_per_s=round(tps, 1), tflops=round(tps * flops_tok / 1e12, 1))
        del st
      except Exception as e:  # out of memory at this size: report and go on
        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
      out["runs"].append(rec)
      print(f"# gpu {rec}", file=sys.stderr, flush=True)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sections", default="cpu,gpu")
  ap.add_argument("--model", default="gguf", choices=["gguf", "random"])
  ap.add_argument("--experts", type=int, default=8)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq", type=int, default=32)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--slots", default="8,16", help="GPU: slot counts")
  ap.add_argument("--gpu-batch", type=int, default=1, help="GPU: rows per slot")
  ap.add_argument("--gpu-seq", type=int, default=2048)
  ap.add_argument("--gpu-steps", type=int, default=5)
  ap.add_argument("--gpu-smoke", action="store_true", help="run the GPU code path on tiny shapes here")
  ap.add_argument("--threads", type=int, default=0,
                  help="CPU threads per side, XLA and torch alike (0: all cores); 1 on a shared machine, "
                       "where spinning thread pools distort both")
  args = ap.parse_args()
  out = {"jax": jax.__version__, "backend": jax.default_backend()}
  secs = args.sections.split(",")
  if "cpu" in secs and not args.gpu_smoke:
    out["cpu"] = cpu_section(args)
  if args.gpu_smoke:
    out["gpu_smoke"] = gpu_section(args, smoke=True)
  elif "gpu" in secs:
    if jax.default_backend() == "gpu":
      out["gpu"] = gpu_section(args)
    else:
      out["gpu"] = "skipped: no GPU visible to JAX"
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()

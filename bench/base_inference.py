"""Base-model inference speed, mixie vs transformers, side by side in one run; prints JSON.

CPU (always): SmolLM2-135M-Instruct from the shipped GGUF (both sides load the same file, f32),
prompts cut from real Wikipedia summaries, greedy decoding.
GPU (only when both JAX and torch see a GPU): TinyLlama-1.1B-shaped random weights in bf16, batch 32 x
512 prefill and batch 32 decode of 128 new tokens; transformers runs its `generate` with SDPA.

Prefill tokens/s = b * prompt / time of the prompt pass (last-position logits only, as generation
needs). Decode tokens/s = b * (new - 1) / (time of generating `new` tokens - time of generating 1):
the prefill and first token cancel out. Timings are medians of interleaved repeats after a warm-up.

    python bench/base_inference.py --batches 1,4 --prompt 128 --new 64
    python bench/base_inference.py --gpu-smoke   # the GPU code path on tiny shapes, on any device

Imports only jax/flax/numpy/torch/transformers and mixie.model, plus bench/hf_peer.py (the GPU machine
has no more).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_utils import median_seconds  # noqa: E402
from hf_peer import hf_llama_config  # noqa: E402
from mixie.model import generate as gen  # noqa: E402
from mixie.model.llama import PRESETS, LlamaConfig, init_cache, init_params  # noqa: E402


def _mixie_fns(params, cfg, tokens_bt, new):
  b, p = tokens_bt.shape
  lengths = jnp.full((b,), p, jnp.int32)
  tokens = jnp.asarray(tokens_bt, jnp.int32)
  prefill = jax.jit(lambda prm, t: gen.prefill(prm, None, t, lengths, init_cache(cfg, b, p + new), cfg)[0])

  def run_prefill():
    prefill(params, tokens).block_until_ready()

  def run_gen(n):
    return lambda: gen.generate(params, None, tokens, lengths, cfg, max_new=n)[0].block_until_ready()

  return run_prefill, run_gen(new), run_gen(1)


def _hf_fns(model, tokens_bt, new, device, threads=None):
  import torch

  ids = torch.as_tensor(np.asarray(tokens_bt), dtype=torch.long, device=device)
  mask = torch.ones_like(ids)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def setup():
    if threads is not None:
      torch.set_num_threads(threads)

  def run_prefill():
    setup()
    with torch.inference_mode():
      model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    sync()

  def run_gen(n):
    def f():
      setup()
      with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
      sync()
    return f

  return run_prefill, run_gen(new), run_gen(1)


def _compare(sides, b, p, new, repeats):
  """Interleaved medians of (prefill, generate `new`, generate 1) per side, as tokens/s, and the
  ratios of mixie over each peer and over the best peer."""
  for fns in sides.values():  # warm-up: compile / first-call allocations
    for f in fns:
      f()
  t = {name: [[], [], []] for name in sides}
  for _ in range(repeats):
    for name, fns in sides.items():
      for i, f in enumerate(fns):
        t[name][i].append(median_seconds(f, 1))
  out = {}
  for name in t:
    pre, g_new, g_one = (statistics.median(x) for x in t[name])
    out[name] = {"prefill_tok_s": round(b * p / pre, 1),
                 "decode_tok_s": round(b * (new - 1) / max(g_new - g_one, 1e-9), 1),
                 "prefill_s": round(pre, 4), "generate_s": round(g_new, 4)}
  keys = ("prefill_tok_s", "decode_tok_s")
  peers = [n for n in out if n != "mixie"]
  for n in peers:
    out[f"ratio_mixie_over_{n}"] = {k: round(out["mixie"][k] / out[n][k], 2) for k in keys}
  if len(peers) > 1:
    out["ratio_mixie_over_best_transformers"] = {
        k: round(out["mixie"][k] / max(out[n][k] for n in peers), 2) for k in keys}
  return out


def cpu_bench(batches, prompt, new, repeats, torch_threads=()):
  import torch
  import transformers

  from mixie import assets
  from mixie.model.load import load_gguf

  path = assets.smollm2_gguf()
  cfg, params, tok = load_gguf(path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32).eval()
  docs = json.loads(assets.wiki_summaries_json().read_text())
  seqs = [s for s in tok.encode_batch([d["extract"] for d in list(docs.values())[:400]])
          if len(s) >= prompt][:max(batches)]
  thread_counts = list(torch_threads) or sorted({torch.get_num_threads(), 1}, reverse=True)
  result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, f32)", "prompt_tokens": prompt,
            "new_tokens": new, "torch_default_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg()[0],
            "jax_backend": jax.default_backend(), "cpu_count": os.cpu_count()}
  for b in batches:
    tokens = np.array([s[:prompt] for s in seqs[:b]], np.int32)
    sides = {"mixie": _mixie_fns(params, cfg, tokens, new)}
    for n in thread_counts:  # torch's default thread count can lose badly on a busy machine
      sides[f"transformers_{n}threads"] = _hf_fns(hf, tokens, new, "cpu", threads=n)
    result[f"batch_{b}"] = _compare(sides, b, prompt, new, repeats)
  result["load_average_at_end"] = os.getloadavg()[0]
  return result


def gpu_bench(cfg: LlamaConfig, batch, prompt, new, repeats, device, label):
  import torch
  import transformers

  hf_cfg = hf_llama_config(cfg, max_position_embeddings=max(cfg.max_seq_len, prompt + new))
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=torch.bfloat16).eval()
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt)).astype(np.int32)
  out = {"model": label, "batch": batch, "prompt_tokens": prompt,
         "new_tokens": new, "jax_device": str(jax.devices()[0]), "torch_device": device,
         "transformers_attention": "sdpa"}
  out.update(_compare({"mixie": _mixie_fns(params, cfg, tokens, new),
                       "transformers": _hf_fns(hf, tokens, new, device)}, batch, prompt, new, repeats))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batches", default="1,4", help="CPU batch sizes, comma-separated")
  ap.add_argument("--prompt", type=int, default=128, help="CPU prompt tokens")
  ap.add_argument("--new", type=int, default=64, help="CPU new tokens")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--torch-threads", default="",
                  help="CPU thread counts to run transformers with, comma-separated (default: torch's "
                       "default and 1; on a busy machine torch's default can be many times slower)")
  ap.add_argument("--skip-cpu", action="store_true", help="only the GPU section")
  ap.add_argument("--gpu-smoke", action="store_true",
                  help="run the GPU section's code on tiny shapes on whatever device is there")
  args = ap.parse_args()

  result = {}
  if not args.skip_cpu and not args.gpu_smoke:
    threads = [int(n) for n in args.torch_threads.split(",") if n]
    result["cpu"] = cpu_bench([int(b) for b in args.batches.split(",")], args.prompt, args.new,
                              args.repeats, threads)
  import torch

  has_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  if args.gpu_smoke:
    tiny = LlamaConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                       dtype="bfloat16", param_dtype="bfloat16")
    result["gpu_smoke"] = gpu_bench(tiny, 2, 16, 8, 1, "cuda" if has_gpu else "cpu",
                                   "tiny random Llama, bf16 (smoke test of the GPU code path)")
  elif has_gpu:
    cfg = PRESETS["tinyllama_1b"].replace(dtype="bfloat16", param_dtype="bfloat16")
    result["gpu"] = gpu_bench(cfg, 32, 512, 128, args.repeats, "cuda",
                              "TinyLlama-1.1B-shaped random weights, bf16")
  else:
    result["gpu"] = "skipped: no GPU visible to both jax and torch"
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()

"""Serving and routing speed, with the peers measured side by side in the same run; prints JSON.

Sections (`--sections`, default `serve,route`; `gpu` runs only where JAX and torch both see a GPU):

- serve (CPU): prefill and decode tokens/s for a batch of B rows (default 16) that use B different
  experts (mixie's vmapped mixed batch, `mixie.serve.batched`) vs the same batch with one expert
  (the plain, non-vmapped `mixie.model.generate` path) vs the base alone, and vs HF PEFT on the same
  model: mixed-adapter batches (`adapter_names=[...]`) and one active adapter. The model is the
  shipped SmolLM2-135M (`--model gguf`) or a random model of that shape (`--model random`).
  Experts and adapters are random with non-zero B, rank 8, on all 7 projections. Greedy decoding,
  KV cache; logits only at the last prompt position on both sides (`logits_to_keep=1` for HF).
- route (CPU): routing latency and recall@1 for 5000 centroids, and kNN (k = 16) over 1M document
  vectors (d = 384): ScaNN brute force and ScaNN tree (AH + reordering) vs exact numpy.
  Synthetic data (no real embeddings of 1M documents ship): centroids are random; documents are drawn
  around 5000 topic centres (cosine ~0.7 to their centre); queries are held-out draws from the same
  distribution. Recall is against the exact numpy search; `vote_agreement`: the kNN-voted topic.
- gpu: TinyLlama-1.1B shape (random bf16 weights), rank 16, 32 rows x 512 prompt tokens, 32 different
  experts vs one expert, and PEFT mixed / one adapter on the same GPU. This section imports only jax,
  torch, transformers, peft, numpy and mixie.model / mixie.serve.batched / mixie.interop.peft (via
  bench/hf_peer.py).

Every side is warmed up first (compilation excluded), then all sides are timed interleaved, rep by
rep, so that load drifts on a shared machine hit them alike; times are medians over `--reps`.
Ratios > 1 favour the first named side. On CPU the peer runs with the faster of 1 and all-cores torch
threads (measured first). `decode_bound_mixie_mixed_over_mixie_one` is the ratio a weight-streaming
(memory-bound) decode step allows: (base + 1 expert) / (base + rows x expert) bytes.

  python bench/route_serve.py [--sections serve,route] [--model gguf|random] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# On a GPU, JAX and torch share the device: no preallocation of 75% of its memory by JAX.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_utils import median_seconds, serving_args  # noqa: E402
from hf_peer import hf_llama_config, peft_targets  # noqa: E402
from mixie.model.generate import Decoder, sample_logits  # noqa: E402
from mixie.model.llama import LlamaConfig, PRESETS, bind, init_cache, init_params  # noqa: E402
from mixie.model.lora import LoraConfig, expert_shapes  # noqa: E402
from mixie.serve.batched import gather_experts, layer_major  # noqa: E402


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def _median_time(fn, reps):
  fn()  # warm-up (compiles)
  return median_seconds(fn, reps)


def random_experts(cfg: LlamaConfig, lora: LoraConfig, n: int, key) -> dict:
  """n experts with random a and b (non-zero), stacked, in `lora.dtype`."""
  shapes = expert_shapes(cfg, lora)

  @jax.jit
  def make(key):
    out = {}
    for i, (p, ab) in enumerate(sorted(shapes.items())):
      ka, kb = jax.random.split(jax.random.fold_in(key, i))
      out[p] = {"a": jax.random.normal(ka, (n,) + ab["a"], jnp.float32) / np.sqrt(ab["a"][1]),
                "b": 0.01 * jax.random.normal(kb, (n,) + ab["b"], jnp.float32)}
    return jax.tree.map(lambda x: x.astype(lora.dtype), out)

  return make(key)


# ---------------------------------------------------------------------------------------------------
# mixie: mixed batch (vmapped rows) vs one expert (plain path) vs the base


def mixie_variants(cfg, params, lora, *, rows, prompt_len, new_tokens, seed=0):
  """mixie's mixed batch (row i uses expert i), one-expert batch and base, as timed variants.

  Returns `({name: (prefill, decode, decode_steps)}, weight_bytes)`; `prefill()` / `decode()` run once
  and return seconds (greedy decode of `new_tokens` steps from a prefilled cache).
  """
  b, t, k = rows, prompt_len, new_tokens
  experts = random_experts(cfg, lora, b, jax.random.key(seed + 1))
  experts_b = gather_experts(experts, jnp.arange(b))
  one = jax.tree.map(lambda x: x[0], experts)
  tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size, jnp.int32)
  lengths = jnp.full((b,), t, jnp.int32)
  scale = lora.scale
  unstack = jax.default_backend() == "cpu"

  def variant(kind, e):
    """Jitted prefill and k-step decode; weights and experts are arguments, not constants."""

    def decoder(params, e, step=False):  # as generate_rows for a mixed batch (rows' experts `[b, ...]`)
      if kind != "mixed":
        return Decoder.of(bind(cfg, params, e, lora_scale=scale))
      if step and unstack:
        return Decoder.of(bind(cfg, params, e, lora_scale=scale), 0)
      return Decoder.of(bind(cfg, params, layer_major(e), lora_scale=scale), 1)

    @jax.jit
    def run_prefill(params, e, tokens, lengths):
      return decoder(params, e).prefill(tokens, lengths, init_cache(cfg, b, t + k))

    @jax.jit
    def run_decode(params, e, logits, cache):
      dec = decoder(params, e, step=True)
      dec = dec.unstacked() if unstack else dec  # as generate / generate_rows on CPU

      def body(_, carry):
        logits, cache = carry
        return dec.step(sample_logits(logits, None), cache)
      return jax.lax.fori_loop(0, k, body, (logits, cache))

    state = run_prefill(params, e, tokens, lengths)
    return (_timer(lambda: jax.block_until_ready(run_prefill(params, e, tokens, lengths))),
            _timer(lambda: jax.block_until_ready(run_decode(params, e, *state))), k)

  variants = {f"mixie_{kind}": variant(kind, e) for kind, e in
              (("mixed", experts_b), ("one", one), ("base", None))}
  # Decode streams the weights every step: the base once, plus one expert (one) or b experts (mixed).
  nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))  # noqa: E731
  w, e = nbytes(params), nbytes(one)
  return variants, {"base": w, "one_expert": e, "decode_bound_mixed_over_one": (w + e) / (w + b * e)}


def _timer(fn):
  def timed():
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
  return timed


def measure(variants, *, rows, prompt_len, reps):
  """Warms every variant up, then times them interleaved (rep by rep, so that load drifts on a
  shared machine hit every side alike); medians, as tokens/s."""
  for name, (pre, dec, _) in variants.items():
    pre(), dec()
    _log(f"{name}: warm")
  times = {name: ([], []) for name in variants}
  for _ in range(reps):
    for name, (pre, dec, _) in variants.items():
      times[name][0].append(pre())
      times[name][1].append(dec())
  out = {}
  for name, (tp, td) in times.items():
    tp, td, steps = float(np.median(tp)), float(np.median(td)), variants[name][2]
    out[name] = {"prefill_tok_s": rows * prompt_len / tp, "decode_tok_s": rows * steps / td,
                 "prefill_s": tp, "decode_s": td, "decode_steps": steps}
    _log(f"{name}: prefill {tp:.2f}s decode {td:.2f}s ({steps} steps)")
  return out


# ---------------------------------------------------------------------------------------------------
# HF PEFT: mixed-adapter batches (adapter_names=) and one active adapter, same model shape


def peft_variants(hf_model, lora, *, rows, prompt_len, new_tokens, device="cpu", seed=0,
                  decode_tokens_mixed=None):
  """HF PEFT with `rows` adapters mixed in one batch (`adapter_names=`), and with one active adapter,
  as timed variants (see `mixie_variants`)."""
  import peft
  import torch

  torch.manual_seed(seed)
  targets = peft_targets(lora.targets)
  pc = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=targets, lora_dropout=0.0,
                       init_lora_weights=False)  # random A and B: no zero-B shortcut
  model = peft.get_peft_model(hf_model, pc, adapter_name="e0")
  for i in range(1, rows):
    model.add_adapter(f"e{i}", pc)
  model.eval()
  dtype = next(hf_model.parameters()).dtype
  model.to(device=device, dtype=dtype)
  names = [f"e{i}" for i in range(rows)]
  ids = torch.randint(0, hf_model.config.vocab_size, (rows, prompt_len), device=device)
  sync = (lambda: torch.cuda.synchronize()) if device != "cpu" else (lambda: None)
  # transformers 5 names the KV cache `cache`; 4.x `past_key_values`
  import inspect
  cache_kw = "cache" if "cache" in inspect.signature(type(hf_model).forward).parameters else "past_key_values"

  def run_prefill(kw):
    model.set_adapter("e0")
    t0 = time.perf_counter()
    with torch.inference_mode():
      model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
    sync()
    return time.perf_counter() - t0

  def run_decode(kw, steps):
    model.set_adapter("e0")
    with torch.inference_mode():
      out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
      kv, tok = getattr(out, cache_kw), out.logits[:, -1].argmax(-1)
      sync()
      t0 = time.perf_counter()
      for _ in range(steps):
        out = model(input_ids=tok[:, None], use_cache=True, **{cache_kw: kv}, **kw)
        kv, tok = getattr(out, cache_kw), out.logits[:, -1].argmax(-1)
      sync()
      return time.perf_counter() - t0

  out = {}
  for kind, kw in (("mixed", {"adapter_names": names}), ("one", {})):
    steps = new_tokens if kind == "one" or decode_tokens_mixed is None else decode_tokens_mixed
    out[f"peft_{kind}"] = (functools.partial(run_prefill, kw), functools.partial(run_decode, kw, steps),
                           steps)
  return out


def best_torch_threads(hf_model, rows, prompt_len) -> int:
  """The faster of 1 and all-cores torch threads for a base prefill (on a shared, loaded machine
  OpenMP spin-waiting can make all cores several times slower than one): the peer's best setting."""
  import torch
  ids = torch.randint(0, hf_model.config.vocab_size, (rows, prompt_len))
  best = None
  for n in sorted({1, os.cpu_count() or 1}):
    torch.set_num_threads(n)
    with torch.inference_mode():
      t = _median_time(lambda: hf_model(input_ids=ids, logits_to_keep=1), 2)
    _log(f"torch {n} thread(s): base prefill {t:.2f}s")
    if best is None or t < best[1]:
      best = (n, t)
  torch.set_num_threads(best[0])
  return best[0]


def serve_section(args):
  import torch
  lora = LoraConfig(rank=8, alpha=16.0)
  b, t, k = (4, 16, 4) if args.quick else (args.rows, args.prompt_len, args.new_tokens)
  if args.model == "gguf":
    import transformers
    from configs.common import base_config
    from mixie import assets
    from mixie.model.load import load_base
    mc = base_config().model
    cfg, params, _ = load_base(mc)
    path = assets.smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32)
    model_name = "SmolLM2-135M-Instruct (shipped GGUF, dequantized to f32)"
  else:
    import transformers
    cfg = PRESETS["smollm2_135m"]
    if args.quick:
      cfg = cfg.replace(n_layers=2)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg)).to(torch.float32)
    model_name = "random weights, SmolLM2-135M shape" + (" (2 layers, --quick)" if args.quick else "")
  torch_threads = best_torch_threads(hf, b, t)
  variants, weight_bytes = mixie_variants(cfg, params, lora, rows=b, prompt_len=t, new_tokens=k)
  variants.update(peft_variants(hf, lora, rows=b, prompt_len=t, new_tokens=k))
  res = measure(variants, rows=b, prompt_len=t, reps=args.reps)
  return {
      "model": model_name, "rows": b, "distinct_experts_mixed": b, "prompt_tokens": t,
      "new_tokens": k, "lora_rank": lora.rank, "targets": list(lora.targets), "dtype": "float32",
      "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "torch_threads": torch_threads,
      "weight_bytes": weight_bytes, "results": res, "ratios": _ratios(res, weight_bytes)}


def _ratios(r, weight_bytes):
  out = {"decode_bound_mixie_mixed_over_mixie_one": weight_bytes["decode_bound_mixed_over_one"]}
  for phase in ("prefill", "decode"):
    key = f"{phase}_tok_s"
    for a, b in (("mixie_mixed", "mixie_one"), ("mixie_mixed", "peft_mixed"), ("mixie_one", "peft_one"),
                 ("peft_mixed", "peft_one")):
      out[f"{phase}_{a}_over_{b}"] = r[a][key] / r[b][key]
  return out


# ---------------------------------------------------------------------------------------------------
# routing: ScaNN vs exact numpy


def _clustered(n, d, centres, spread, rng):
  """n points: a random centre's direction plus noise of norm ~`spread` (spread 1: cosine ~0.7 to
  the centre, as sentence embeddings to their topic's centroid), in chunks (1M x 384 floats)."""
  lab = rng.integers(0, len(centres), n)
  unit = centres / np.linalg.norm(centres, axis=1, keepdims=True)
  x = np.empty((n, d), np.float32)
  for s in range(0, n, 100_000):
    e = min(n, s + 100_000)
    x[s:e] = unit[lab[s:e]] + spread * rng.standard_normal((e - s, d), np.float32) / np.sqrt(d)
  return x, lab


def route_section(args):
  from mixie.route.router import Router, RouterConfig, vote
  from mixie.route.search import Index, SearchConfig

  rng = np.random.default_rng(0)
  d = 384
  out = {}
  # 5000 centroids; queries: a random centroid's direction + noise of equal norm (cos ~0.7)
  k, nq = (500, 200) if args.quick else (5000, 2000)
  cents = rng.normal(size=(k, d)).astype(np.float32)
  own = rng.integers(0, k, nq)
  q = cents[own] / np.linalg.norm(cents[own], axis=1, keepdims=True)
  q = q + rng.normal(size=(nq, d)).astype(np.float32) / np.sqrt(d)
  res = {"centroids": k, "queries": nq, "dim": d}
  exact_ids = None
  for backend in ("numpy", "brute", "tree"):
    t0 = time.perf_counter()
    r = Router(cents, RouterConfig(search=SearchConfig(backend=backend)))
    build = time.perf_counter() - t0
    t = _median_time(lambda: r.route(q), args.reps)
    ids = r.route(q).expert_ids[:, 0]
    if exact_ids is None:
      exact_ids = ids
    res[backend] = {"build_s": build, "us_per_query": 1e6 * t / nq,
                    "recall_at_1": float(np.mean(ids == exact_ids))}
    if backend == "tree":
      res[backend]["tree"] = vars(r.centroid_index.tree)
  res["speedup_brute_over_numpy"] = res["numpy"]["us_per_query"] / res["brute"]["us_per_query"]
  res["speedup_tree_over_numpy"] = res["numpy"]["us_per_query"] / res["tree"]["us_per_query"]
  out["centroid_5000"] = res

  # kNN over n document vectors around 5000 topic centres (k = 16 neighbours vote)
  n, nq, n_topics = (20000, 100, 200) if args.quick else (args.knn_docs, 1000, 5000)
  centres = rng.normal(size=(n_topics, d)).astype(np.float32)
  docs, topics = _clustered(n, d, centres, 1.0, rng)
  queries, _ = _clustered(nq, d, centres, 1.0, rng)
  res = {"documents": n, "queries": nq, "dim": d, "topics": n_topics, "knn_k": 16}
  exact = None
  for backend in ("numpy", "brute", "tree"):
    t0 = time.perf_counter()
    idx = Index(docs, 16, SearchConfig(backend=backend))
    build = time.perf_counter() - t0
    t = _median_time(lambda: idx.search(queries), max(1, args.reps // 2))
    ids, _ = idx.search(queries)
    if exact is None:
      exact = ids
    hit = np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(ids, exact)])
    votes = vote(topics[ids], np.zeros(ids.shape), n_topics)
    if backend == "numpy":
      exact_votes = votes
    res[backend] = {"build_s": build, "us_per_query": 1e6 * t / nq, "recall_at_16": float(hit),
                    "recall_at_1": float(np.mean(ids[:, 0] == exact[:, 0])),
                    "vote_agreement": float(np.mean(votes == exact_votes))}
    if backend == "tree":
      res[backend]["tree"] = vars(idx.tree)
    del idx
  res["speedup_brute_over_numpy"] = res["numpy"]["us_per_query"] / res["brute"]["us_per_query"]
  res["speedup_tree_over_numpy"] = res["numpy"]["us_per_query"] / res["tree"]["us_per_query"]
  out[f"knn_{n}"] = res
  return out


# ---------------------------------------------------------------------------------------------------
# GPU: TinyLlama-1.1B shape


def gpu_section(args):
  import torch
  import transformers

  dry = args.gpu_dry_run
  if not dry and (jax.default_backend() != "gpu" or not torch.cuda.is_available()):
    return {"skipped": f"no GPU (jax backend {jax.default_backend()}, torch cuda "
                       f"{torch.cuda.is_available()})"}
  cfg = PRESETS["tinyllama_1b"].replace(dtype="bfloat16", param_dtype="bfloat16")
  b, t, k, k_peft_mixed = 32, 512, 64, 16
  if dry:  # exercise the code on CPU with a tiny shape
    cfg = cfg.replace(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=256)
    b, t, k, k_peft_mixed = 4, 16, 4, 2
  lora = LoraConfig(rank=16, alpha=32.0, dtype="bfloat16")
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  variants, weight_bytes = mixie_variants(cfg, params, lora, rows=b, prompt_len=t, new_tokens=k)
  device = "cpu" if dry else "cuda"
  with torch.device(device):  # initialised on the GPU (a 1.1B f32 init on the host is slow)
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg))
  hf = hf.to(dtype=torch.bfloat16)
  variants.update(peft_variants(hf, lora, rows=b, prompt_len=t, new_tokens=k, device=device,
                                decode_tokens_mixed=k_peft_mixed))
  res = measure(variants, rows=b, prompt_len=t, reps=args.reps)
  return {"model": "random weights, TinyLlama-1.1B shape" + (" (tiny, dry run)" if dry else ""),
          "device": str(jax.devices()[0].device_kind), "rows": b, "prompt_tokens": t,
          "new_tokens_mixie": k, "new_tokens_peft_mixed": k_peft_mixed, "lora_rank": lora.rank,
          "dtype": "bfloat16", "weight_bytes": weight_bytes, "results": res,
          "ratios": _ratios(res, weight_bytes)}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sections", default="serve,route", help="comma list of serve, route, gpu")
  ap.add_argument("--model", default="gguf", choices=("gguf", "random"))
  serving_args(ap, reps=3, quick_help="tiny sizes (a smoke test of the script)")
  ap.add_argument("--knn-docs", type=int, default=1_000_000)
  ap.add_argument("--gpu-dry-run", action="store_true", help="run the gpu section tiny, on CPU")
  ap.add_argument("--out", default="", help="also write the JSON here")
  args = ap.parse_args()
  sections = [s for s in args.sections.split(",") if s]
  result = {"jax": jax.__version__, "backend": jax.default_backend()}
  for s in sections:
    fn = {"serve": serve_section, "route": route_section, "gpu": gpu_section}[s]
    t0 = time.perf_counter()
    result[s] = fn(args)
    result[s]["section_wall_s"] = time.perf_counter() - t0
    print(f"[{s} done in {result[s]['section_wall_s']:.0f}s]", file=sys.stderr, flush=True)
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()

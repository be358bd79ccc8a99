"""Routing and request-log overhead of a serving request vs one decode step; prints JSON.

A `mixie.serve.server.Server` over a random SmolLM2-135M-shape base (`--quick`: 2 layers) and the
shipped SmolLM2 tokenizer, with B real text prompts (shipped Wikipedia summaries, `--prompt-len`
tokens each) routed to B different experts among 5000 topic centroids (d = 384, ScaNN brute force,
the MoIN-5k router size). The embedder is a stand-in that looks each prefix's query vector up (the
topics' embedder costs the same with the log on or off and is not what is measured here). Measured, each a
median over `--reps`, sides interleaved rep by rep:

- `route_ms`: `Server.route_with_fallback` for the batch (search of the 5000 centroids with the
  confidences, the fallback rule);
- `log_ms`: building the batch's B records and appending them (`request_records` +
  `RequestLog.append`: B `os.write`s with O_APPEND);
- `generate_ms_log_on` / `_log_off`: `Server.generate` end to end with N new tokens, log on and off;
- `decode_step_ms`: (generate with N tokens - generate with 1 token) / (N - 1), log off, no stop tokens
  (every step runs).

Ratios: `log_ms / decode_step_ms` (the whole batch's log vs one step of the whole batch: the goal is
<= 0.02), the same per request (`log_ms / B`), and the route's.

  python bench/route_log.py [--rows 16] [--new-tokens 16] [--reps 5] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from bench_utils import median_seconds, serving_args  # noqa: E402
from mixie.model.llama import PRESETS, init_params  # noqa: E402
from mixie.model.lora import LoraConfig, expert_shapes  # noqa: E402
from mixie.route.fallback import Policy  # noqa: E402
from mixie import assets  # noqa: E402
from mixie import io as mio  # noqa: E402
from mixie.model.tokenizer import Tokenizer  # noqa: E402
from mixie.route.router import Router, RouterConfig, prefix_texts  # noqa: E402
from mixie.route.search import SearchConfig  # noqa: E402
from mixie.serve.request_log import RequestLog, request_records  # noqa: E402
from mixie.serve.server import Server  # noqa: E402
from mixie.store import ExpertMeta, ExpertStore  # noqa: E402

N_CENTROIDS, DIM = 5000, 384


class _LookupEmbedder:
  """Looks each prompt's query vector up by its routed prefix text: near its own topic's centroid."""

  def __init__(self, prefixes, cents_kd, topics, seed=0):
    rng = np.random.default_rng(seed)
    u = cents_kd[topics] / np.linalg.norm(cents_kd[topics], axis=1, keepdims=True)
    q = (u + rng.normal(size=u.shape) / np.sqrt(DIM)).astype(np.float32)
    self.q = dict(zip(prefixes, q))
    self.dim = DIM

  def embed(self, texts):
    return np.stack([self.q[t] for t in texts])


def build(args, workdir):
  """The server, its prompts and a request log in `workdir`."""
  cfg = PRESETS["smollm2_135m"]
  if args.quick:
    cfg = cfg.replace(n_layers=2)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  lora = LoraConfig(rank=8, alpha=16.0)
  rng = np.random.default_rng(0)
  cents = rng.normal(size=(N_CENTROIDS, DIM)).astype(np.float32)
  topics = rng.choice(N_CENTROIDS, args.rows, replace=False)
  store = ExpertStore(os.path.join(workdir, "experts"))
  meta = ExpertMeta.new(lora, "bench")
  shapes = expert_shapes(cfg, lora)
  for t in topics:
    store.write(int(t), {p: {k: (0.01 * rng.normal(size=s)).astype(np.float32) for k, s in ab.items()}
                         for p, ab in shapes.items()}, meta)
  router = Router(cents, RouterConfig(route_tokens=32, search=SearchConfig(backend="brute")))
  tok = Tokenizer.from_gguf(assets.smollm2_gguf())
  with open(assets.wiki_summaries_json()) as f:  # real text prompts of prompt_len tokens
    docs = [d["extract"] for d in json.load(f).values()]
  prompts = [tok.decode(ids[:args.prompt_len]) for ids in (tok.encode(d) for d in docs)
             if len(ids) >= args.prompt_len][:args.rows]
  embedder = _LookupEmbedder(prefix_texts(tok, 32, texts=prompts), cents, topics)
  server = Server(cfg, params, tok, store, router, embedder, cache_slots=args.rows,
                  lora=lora, base_fingerprint="bench", length_bucket=args.prompt_len,
                  policy=Policy("base", "margin", 0.0))
  return server, prompts, RequestLog(os.path.join(workdir, "requests.jsonl")), cfg


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  serving_args(ap, reps=5, quick_help="2-layer model (a smoke test of the script)")
  ap.add_argument("--out", default="", help="also write the JSON here")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as wd:
    server, prompts, log, cfg = build(args, wd)
    n = args.new_tokens
    gen = lambda k: server.generate(prompts, max_new_tokens=k, stop=())  # noqa: E731

    def with_log(on, k):
      server.request_log = log if on else None
      return lambda: gen(k)

    for fn in (with_log(True, n), with_log(False, n), with_log(False, 1)):
      fn()  # warm-up: compiles, loads every expert into the cache
    times = {"on": [], "off": [], "one": []}
    for _ in range(args.reps):
      for name, fn in (("on", with_log(True, n)), ("off", with_log(False, n)), ("one", with_log(False, 1))):
        t0 = time.perf_counter()
        fn()
        times[name].append(1e3 * (time.perf_counter() - t0))
    med = {k: float(np.median(v)) for k, v in times.items()}
    decode_step = (med["off"] - med["one"]) / (n - 1)

    ids = [server.tokenizer.encode(p) for p in prompts]
    route_ms = 1e3 * median_seconds(lambda: server.route_with_fallback(ids), 50)
    routed, served, below = server.route_with_fallback(ids)
    results = gen(n)

    def write_log():
      log.append(request_records(time_s=time.time(), source="bench", mode="centroid",
                                 prefixes=[i[:32] for i in ids], routed=routed, served=served,
                                 below_n=below, policy=server.policy, results=results,
                                 token_counts=[len(i) for i in ids], route_ms=route_ms))
    log_ms = 1e3 * median_seconds(write_log, 200)
    line_bytes = os.path.getsize(log.path) / sum(1 for _ in open(log.path))
  b = args.rows
  out = {"jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
         "model": "random weights, SmolLM2-135M shape" + (" (2 layers, --quick)" if args.quick else ""),
         "rows": b, "distinct_experts": b, "prompt_tokens": args.prompt_len, "new_tokens": n,
         "centroids": N_CENTROIDS, "dim": DIM, "search": "ScaNN brute force",
         "route_ms": route_ms, "log_ms": log_ms, "log_bytes_per_line": line_bytes,
         "generate_ms_log_on": med["on"], "generate_ms_log_off": med["off"],
         "generate_ms_one_token": med["one"], "decode_step_ms": decode_step,
         "ratios": {"log_over_decode_step": log_ms / decode_step,
                    "log_per_request_over_decode_step": log_ms / b / decode_step,
                    "route_over_decode_step": route_ms / decode_step,
                    "route_per_request_over_decode_step": route_ms / b / decode_step,
                    "generate_log_on_over_off": med["on"] / med["off"]},
         "reps": args.reps, "times_ms": times}
  print(json.dumps(out, indent=2))
  if args.out:
    mio.atomic_write_json(args.out, out)


if __name__ == "__main__":
  main()

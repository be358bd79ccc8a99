"""A run's experts out as standard PEFT LoRA adapters, plus the router (`export_run`, CLI
`python -m mixie.export`).

One export directory:

    OUT/expert_<topic>/adapter_config.json        a standard PEFT LoRA adapter (`mixie.interop.peft`):
    OUT/expert_<topic>/adapter_model.safetensors  transformers+peft, vLLM multi-LoRA and LoRAX load it
    OUT/expert_<topic>/mixie_expert.json          the expert's store metadata (ignored by PEFT/vLLM)
    OUT/router_centroids.safetensors              "centroids_kd" float32 [K, d], "expert_k" int32 [K]
                                                  (row k -> topic id of its expert, -1 = the base)
    OUT/embedder/                                 the topics' embedder files (`mixie.cluster.embed`)
    OUT/router.json                               how to embed and route a query, topic -> adapter dir
    OUT/README.md                                 loading in transformers+peft, vLLM `--lora-modules`
                                                  (rendered from the template `export_readme.md`)

`router.json` is written after everything else: its presence marks a complete export. Routing a query
outside mixie: take the first `route_tokens` ids of the base tokenizer's encoding, decode them, embed
the text with the named embedder, and pick the nearest centroid (cosine: largest dot product of unit
vectors; l2: smallest squared distance); `expert_k` of that row names the adapter. The router is the
run's (`mixie.route.run.build_router`, imported experts included), in `centroid` or `topk` mode.
"""

from __future__ import annotations

import importlib.resources
import pathlib
import string
from typing import Any, Mapping, Sequence

import numpy as np
import safetensors.numpy

from mixie import assets
from mixie import io as mio
from mixie.cluster.embed import SPEC_JSON
from mixie.cluster.topics import topics_dir
from mixie.errors import MixieError, check
from mixie.interop.peft import HF_PROJ, write_adapter
from mixie.model.lora import LoraConfig
from mixie.route.router import Router, RouterConfig
from mixie.route.run import build_router
from mixie.route.search import SearchConfig, l2_normalize
from mixie.store import ExpertStore, run_store

FORMAT = "mixie_export/1"
ROUTER_JSON = "router.json"
CENTROIDS = "router_centroids.safetensors"
EMBEDDER_DIR = "embedder"
EXPERT_JSON = "mixie_expert.json"
README = "README.md"
README_TEMPLATE = "export_readme.md"  # package data of mixie.interop (string.Template, ${name} fields)
MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"
EXPORT_MODES = ("centroid", "topk")  # router modes an export can carry (others export as centroid)


def adapter_name(topic: int) -> str:
  """The directory (and vLLM/LoRAX adapter name) of a topic's exported expert."""
  return f"expert_{int(topic)}"


def _base_description(config, fingerprint: str) -> dict[str, Any]:
  mc = config.model
  path = str(mc.path or "")
  if mc.source == "gguf" and not path:
    path = str(assets.smollm2_gguf())
  return {"source": mc.source, "path": path, "preset": mc.get("preset", ""), "fingerprint": fingerprint}


def _embedder_description(config, out) -> dict[str, Any]:
  """The topics' embedder: its spec, copied into OUT/embedder/, and where its weights live."""
  src = topics_dir(config.workdir) / "embedder"
  if (src / SPEC_JSON).exists():
    spec = mio.read_json(src / SPEC_JSON)
    for name in [SPEC_JSON] + list(spec.get("files", [])):
      mio.atomic_write_bytes(out / EMBEDDER_DIR / name, (src / name).read_bytes())
  else:  # no topics in this run (an imports-only store): the configured embedder
    cc = config.cluster
    spec = {"kind": cc.embedder, "embed_tokens": int(cc.embed_tokens)}
  desc = {**spec, "files": EMBEDDER_DIR if (src / SPEC_JSON).exists() else None}
  if spec["kind"] == "minilm":
    try:
      local = str(assets.minilm_dir())
    except MixieError:
      local = None
    desc.update(hub_id=MINILM_HUB, local_weights=local,
                note="sentence-transformers with max_seq_length = embed_tokens ([CLS] and [SEP] "
                     "included), mean pooling, L2 normalisation")
  elif spec["kind"] == "base":
    desc["note"] = ("the base model itself: final hidden states (after the final norm) of the first "
                    "embed_tokens tokens, mean-pooled, L2-normalised")
  else:
    desc["note"] = ("TF-IDF (sublinear tf, idf) over the first embed_tokens words minus English stop "
                    "words, L2-normalised, projected by components_dv, L2-normalised "
                    "(mixie.cluster.embed.load_embedder reads the files)")
  return desc


def _adapter_tensors_dtype(expert):
  """float32 for dtypes safetensors' numpy API cannot write (bfloat16); exact."""
  ok = (np.float16, np.float32, np.float64)
  return {p: {k: (np.asarray(v) if np.asarray(v).dtype in ok else np.asarray(v, np.float32))
              for k, v in ab.items()} for p, ab in expert.items()}


def export_experts(store: ExpertStore, out, *, topics: Sequence[int] | None = None,
                   base_model: str = "", log=print) -> dict[int, str]:
  """Writes the experts of `topics` (default: all) as PEFT adapter directories `OUT/expert_<topic>`.

  Returns topic -> adapter directory name. The store metadata goes to each `mixie_expert.json`.
  """
  out = mio.path(out)
  have = store.topics()
  check(bool(have), f"expert store {store.dir} holds no experts (train or import some first)")
  topics = list(have) if topics is None else [int(t) for t in topics]
  missing = [t for t in topics if t not in have]
  check(not missing, f"topic(s) {missing} have no expert in {store.dir} (it holds {_ranges(have)})")
  names = {}
  for t in topics:
    expert, meta = store.load(t, None)
    d = out / adapter_name(t)
    if (d / EXPERT_JSON).exists():
      (d / EXPERT_JSON).unlink()
    write_adapter(d, _adapter_tensors_dtype(expert), meta.lora, base_model=base_model)
    mio.atomic_write_json(d / EXPERT_JSON, {"format": FORMAT, "topic": t, "meta": meta.to_json()})
    names[t] = adapter_name(t)
  log(f"mixie.export: {len(names)} expert(s) written as PEFT adapters to {out}")
  return names


def write_router(out, router: Router, adapters: Mapping[int, str], *, embedder: Mapping[str, Any],
                 base: Mapping[str, Any], lora: LoraConfig) -> dict[str, Any]:
  """Writes `router_centroids.safetensors` and `router.json` (last). Rows whose expert is not in
  `adapters` route to the base (-1). Returns the JSON dict."""
  out = mio.path(out)
  eot = np.where(np.isin(router.expert_of_topic, list(adapters)), router.expert_of_topic, -1)
  cents = router.centroids if router.cfg.search.metric == "l2" else l2_normalize(router.centroids)
  mio.atomic_write_bytes(out / CENTROIDS, safetensors.numpy.save(
      {"centroids_kd": np.ascontiguousarray(cents, np.float32),
       "expert_k": eot.astype(np.int32)}))
  mode = router.cfg.mode if router.cfg.mode in EXPORT_MODES else "centroid"
  spec = {
      "format": FORMAT,
      "base": dict(base),
      "lora": {"r": lora.rank, "lora_alpha": lora.alpha,
               "target_modules": [HF_PROJ[p] for p in lora.targets]},
      "adapters": {str(t): name for t, name in sorted(adapters.items())},
      "router": {
          "centroids": CENTROIDS, "num_rows": router.n_topics, "dim": router.dim,
          "metric": router.cfg.search.metric, "mode": mode, "topk": router.cfg.topk,
          "temperature": router.cfg.temperature, "route_tokens": router.cfg.route_tokens,
          "how": ("ids = base tokenizer's encoding of the query (BOS included when the base adds one)[:"
                  "route_tokens]; text = decode(ids, skip special tokens); q = embedder(text); cosine: "
                  "row = argmax(centroids_kd @ q / |q|) (rows are unit vectors), l2: row = argmin |c - q|^2; "
                  "topic = expert_k[row] (-1: the base, no adapter); adapter = adapters[topic]. topk: "
                  "the topk nearest rows weighted by softmax(-d^2 / temperature), d^2 = 2 - 2 cos for "
                  "cosine"),
      },
      "embedder": dict(embedder),
  }
  mio.atomic_write_json(out / ROUTER_JSON, spec)
  return spec


def export_run(config, out, topics: Sequence[int] | None = None, *, log=print) -> dict[str, Any]:
  """The export of a run (see the module docstring): experts of `topics` (default all), router,
  embedder and README into `out`. Loads no base model. Returns the `router.json` dict."""
  out = mio.path(out)
  store = run_store(config.workdir)
  check(len(store) > 0, f"expert store {store.dir} holds no experts (train or import some first)")
  if (out / ROUTER_JSON).exists():
    (out / ROUTER_JSON).unlink()  # an interrupted re-export must not look complete
  router = build_router(config, store, mode=None if config.route.mode in EXPORT_MODES else "centroid")
  base = _base_description(config, "")
  names = export_experts(store, out, topics=topics, base_model=base["path"], log=log)
  fps = sorted({store.meta(t).base_fingerprint for t in names})
  check(len(fps) == 1, f"expert store {store.dir}: the exported experts were trained on different bases "
                       f"{fps}; export them separately")
  base["fingerprint"] = fps[0]
  spec = write_router(out, router, names, embedder=_embedder_description(config, out), base=base,
                      lora=store.lora())
  mio.atomic_write_text(out / README, readme_text(spec))
  return spec


def load_exported_router(out, *, search: str = "numpy") -> tuple[Router, dict[str, Any]]:
  """Reads an export's router back: `(Router, router.json dict)`; the router's expert ids are topic
  ids (-1: the base) and `spec["adapters"][str(id)]` names each one's adapter directory."""
  out = mio.path(out)
  spec = mio.read_json(out / ROUTER_JSON)
  fmt = spec.get("format") if isinstance(spec, dict) else None
  check(fmt == FORMAT, f"{out / ROUTER_JSON}: not a mixie export (format {fmt!r}, expected {FORMAT!r})")
  p = out / CENTROIDS
  if not p.exists():
    raise MixieError(f"{p}: file not found")
  try:
    arrays = safetensors.numpy.load(p.read_bytes())
    cents, eot = arrays["centroids_kd"], arrays["expert_k"]
  except Exception as e:  # corrupt header or a missing tensor
    raise MixieError(f"{p}: corrupt router centroids ({e})") from None
  r = spec["router"]
  cfg = RouterConfig(mode=r["mode"], route_tokens=int(r["route_tokens"]), topk=int(r["topk"]),
                     temperature=float(r["temperature"]),
                     search=SearchConfig(backend=search, metric=r["metric"]))
  return Router(cents, cfg, expert_of_topic_k=eot), spec


def readme_text(spec: Mapping[str, Any]) -> str:
  """The README of an export directory (the template `export_readme.md` filled in from `spec`, the
  `router.json` dict): loading with transformers+peft, serving with vLLM / LoRAX."""
  adapters = list(spec["adapters"].values())
  base = spec["base"]["path"] or "<the base model's HF directory>"
  rank = spec["lora"]["r"]
  gguf = base.endswith(".gguf")
  fields = {
      "n_adapters": len(adapters), "first": adapters[0], "base": base, "rank": rank,
      "alpha": spec["lora"]["lora_alpha"], "modules": ", ".join(spec["lora"]["target_modules"]),
      "fingerprint": spec["base"]["fingerprint"],
      "where": (f'"{pathlib.PurePath(base).parent}", gguf_file="{pathlib.PurePath(base).name}"' if gguf
                else f'"{base}"'),
      "convert": " (save the GGUF-loaded model with `save_pretrained` first)" if gguf else "",
      "vllm_rank": min(x for x in (8, 16, 32, 64, 128, 256, 320, 512) if x >= rank) if rank <= 512 else rank,
      "modules_flag": " ".join(f"{n}=$PWD/{n}" for n in adapters[:3]) + (" ..." if len(adapters) > 3 else ""),
      "route_tokens": spec["router"]["route_tokens"], "metric": spec["router"]["metric"],
      "embedder": spec["embedder"]["kind"],
  }
  template = importlib.resources.files("mixie.interop").joinpath(README_TEMPLATE).read_text()
  return string.Template(template).substitute(fields)


def _ranges(xs: Sequence[int]) -> str:
  xs = list(xs)
  return f"{len(xs)} topics: {xs[:8]}{' ...' if len(xs) > 8 else ''}"

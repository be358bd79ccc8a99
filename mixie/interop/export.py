"""Interoperability: experts out as standard PEFT LoRA adapters (plus the router), PEFT adapters in.

Export (`export_run`, CLI `python -m mixie.export`) writes into one directory:

    OUT/expert_<topic>/adapter_config.json        a standard PEFT LoRA adapter (`mixie.peft_io`):
    OUT/expert_<topic>/adapter_model.safetensors  transformers+peft, vLLM multi-LoRA and LoRAX load it
    OUT/expert_<topic>/mixie_expert.json          the expert's store metadata (ignored by PEFT/vLLM)
    OUT/router_centroids.safetensors              "centroids_kd" float32 [K, d], "expert_k" int32 [K]
                                                  (row k -> topic id of its expert, -1 = the base)
    OUT/embedder/                                 the topics' embedder files (`mixie.cluster.embed`)
    OUT/router.json                               how to embed and route a query, topic -> adapter dir
    OUT/README.md                                 loading in transformers+peft, vLLM `--lora-modules`

`router.json` is written after everything else: its presence marks a complete export. Routing a query
outside mixie: take the first `route_tokens` ids of the base tokenizer's encoding, decode them, embed
the text with the named embedder, and pick the nearest centroid (cosine: largest dot product of unit
vectors; l2: smallest squared distance); `expert_k` of that row names the adapter.

Import (`import_run`, CLI `python -m mixie.import`) brings PEFT LoRA adapters trained elsewhere into the
run's expert store under new topic ids. Each adapter is checked against the base (layer count, every
tensor shape) and refused, with one message listing every reason, when mixie cannot represent it:
DoRA, LoRA biases, `modules_to_save`, modules outside the seven projections, per-module rank/alpha
patterns, partial layers. It is then conformed to the run's experts so that it stacks and serves with
them: a smaller rank is zero-padded and missing projections are zero (both exact), and a different
scale (alpha / r, or alpha / sqrt(r) for rsLoRA) is folded into B (one float32 rounding per element;
none when the scales agree). Its routing centroid is the mean of the L2-normalised embeddings of the
given documents under the run's embedder (renormalised for the cosine metric); an adapter exported by
mixie may bring its own centroid instead. A mixie export of the same run imports bit-exactly. Every
adapter of one import is read and checked before any is written.

`run_router(config, store)` is the run's router (`mixie.route.run.build_router`, which appends rows for
the store's experts beyond the clustered topics, the imported ones, so that queries reach them in
`mixie.generate` and `mixie.evaluate` as well as in an export).
"""

from __future__ import annotations

import math
import pathlib
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
import safetensors.numpy

from mixie import io as mio
from mixie.errors import ConfigError, MixieError, check
from mixie.model.llama import PROJECTIONS, LlamaConfig
from mixie.model.lora import LoraConfig, expert_shapes
from mixie.interop.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, HF_MODULE, from_peft_tensors, write_adapter
from mixie.route.router import Router, RouterConfig
from mixie.route.search import SearchConfig, l2_normalize
from mixie.store import ExpertStore

FORMAT = "mixie_export/1"
ROUTER_JSON = "router.json"
CENTROIDS = "router_centroids.safetensors"
EMBEDDER_DIR = "embedder"
EXPERT_JSON = "mixie_expert.json"
README = "README.md"
HF_PROJ = {p: HF_MODULE[p].split(".")[1] for p in PROJECTIONS}  # q -> q_proj, ...
MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"
# meta fields the import sets itself (everything else an exported expert carried is kept as it was)
_IMPORT_KEYS = ("topic", "format", "rank", "alpha", "targets", "base_fingerprint", "centroid",
                "imported_from")


def adapter_name(topic: int) -> str:
  """The directory (and vLLM/LoRAX adapter name) of a topic's exported expert."""
  return f"expert_{int(topic)}"


def experts_dir(config):
  """The run's expert store directory."""
  return mio.path(config.workdir) / "experts"


def run_lora(config, store: ExpertStore) -> LoraConfig:
  """The LoRA shape of the run's experts: the store's (its first expert) when it holds any, else
  `config.lora`."""
  from mixie.serve.server import lora_from_store

  return lora_from_store(store) if store.topics() else LoraConfig.from_config(config.lora)


# ---------------------------------------------------------------------------------------------------
# The run's router, imported experts included.


def store_router(store: ExpertStore, cfg: RouterConfig) -> Router:
  """A router over the store's own centroids (a run with no clustered topics, e.g. imports only)."""
  topics = [t for t in store.topics() if store.meta(t).get("centroid") is not None]
  check(bool(topics), f"expert store {store.dir}: no expert has a routing centroid")
  cents = np.stack([np.asarray(store.meta(t)["centroid"], np.float32) for t in topics])
  return Router(cents, cfg, expert_of_topic_k=np.asarray(topics, np.int32))


def run_router(config, store: ExpertStore | None = None, *, mode: str | None = None) -> Router:
  """The run's router over its topics (`mixie.route.run.build_router`) plus the store's imported
  experts; a store-only router when the work directory has no topics. `mode` overrides `route.mode`."""
  import ml_collections

  from mixie.cluster.topics import topics_complete

  store = store if store is not None else ExpertStore(experts_dir(config))
  if mode is not None and mode != config.route.mode:
    config = ml_collections.ConfigDict(config.to_dict())
    config.route.mode = mode
  if not topics_complete(config.workdir):
    return store_router(store, RouterConfig.from_config(config))
  from mixie.route.run import build_router
  return build_router(config, store)  # imported experts included (`mixie.route.run.imported_experts`)


def num_clustered_topics(workdir) -> int:
  """How many topics the cluster stage made in `workdir` (0 when it has none)."""
  from mixie.cluster.topics import load_topics, topics_complete
  return load_topics(workdir).num_topics if topics_complete(workdir) else 0


# ---------------------------------------------------------------------------------------------------
# Export.


def _base_description(config, fingerprint: str) -> dict[str, Any]:
  mc = config.model
  path = str(mc.path or "")
  if mc.source == "gguf" and not path:
    from mixie import assets
    path = str(assets.smollm2_gguf())
  return {"source": mc.source, "path": path, "preset": mc.get("preset", ""), "fingerprint": fingerprint}


def _embedder_description(config, out) -> dict[str, Any]:
  """The topics' embedder: its spec, copied into OUT/embedder/, and where its weights live."""
  from mixie.cluster.embed import SPEC_JSON
  from mixie.cluster.topics import topics_dir

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
      from mixie import assets
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
    lora = LoraConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=tuple(meta["targets"]))
    d = out / adapter_name(t)
    if (d / EXPERT_JSON).exists():
      (d / EXPERT_JSON).unlink()
    write_adapter(d, _adapter_tensors_dtype(expert), lora, base_model=base_model)
    mio.atomic_write_json(d / EXPERT_JSON, {"format": FORMAT, "topic": t, "meta": meta})
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
  mode = router.cfg.mode if router.cfg.mode in ("centroid", "topk") else "centroid"
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
  store = ExpertStore(experts_dir(config))
  check(len(store) > 0, f"expert store {store.dir} holds no experts (train or import some first)")
  if (out / ROUTER_JSON).exists():
    (out / ROUTER_JSON).unlink()  # an interrupted re-export must not look complete
  router = run_router(config, store, mode="centroid" if config.route.mode not in ("centroid", "topk")
                      else None)
  base = _base_description(config, "")
  names = export_experts(store, out, topics=topics, base_model=base["path"], log=log)
  fps = sorted({store.meta(t)["base_fingerprint"] for t in names})
  check(len(fps) == 1, f"expert store {store.dir}: the exported experts were trained on different bases "
                       f"{fps}; export them separately")
  base["fingerprint"] = fps[0]
  spec = write_router(out, router, names, embedder=_embedder_description(config, out), base=base,
                      lora=run_lora(config, store))
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
  """The README of an export directory: loading with transformers+peft, serving with vLLM / LoRAX."""
  adapters = spec["adapters"]
  first = next(iter(adapters.values()))
  base = spec["base"]["path"] or "<the base model's HF directory>"
  r = spec["router"]
  mods = " ".join(f"{n}=$PWD/{n}" for n in list(adapters.values())[:3])
  mods += " ..." if len(adapters) > 3 else ""
  rank = spec["lora"]["r"]
  vllm_rank = min(x for x in (8, 16, 32, 64, 128, 256, 320, 512) if x >= rank) if rank <= 512 else rank
  gguf = base.endswith(".gguf")
  convert = " (save the GGUF-loaded model with `save_pretrained` first)" if gguf else ""
  where = (f'"{pathlib.PurePath(base).parent}", gguf_file="{pathlib.PurePath(base).name}"' if gguf else
           f'"{base}"')
  return f"""# mixie experts as PEFT LoRA adapters

{len(adapters)} expert(s) of a mixie run, each a standard PEFT LoRA adapter directory
(`adapter_config.json` + `adapter_model.safetensors`; rank {rank}, alpha {spec['lora']['lora_alpha']},
modules {', '.join(spec['lora']['target_modules'])}) for the base
`{base}` (mixie fingerprint {spec['base']['fingerprint']}).
Topic -> adapter directory: `adapters` in `router.json`.

## transformers + peft (run from this directory)

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
tok = AutoTokenizer.from_pretrained({where})
base = AutoModelForCausalLM.from_pretrained({where}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, "{first}", adapter_name="{first}").eval()
# more experts: model.load_adapter("expert_<topic>", adapter_name="expert_<topic>")
model.set_adapter("{first}")  # the expert the router picked (see below)
ids = tok("The history of", return_tensors="pt").input_ids
print(tok.decode(model.generate(input_ids=ids, max_new_tokens=20)[0]))
```

## vLLM (multi-LoRA) and LoRAX

vLLM needs the base in Hugging Face format{convert}:

```
vllm serve <base-hf-dir> --enable-lora --max-lora-rank {vllm_rank} --max-loras 8 \\
  --lora-modules {mods}
```

and a request names its expert as the model: `{{"model": "{first}", "prompt": ...}}`.
LoRAX: `adapter_id="<this dir>/{first}"` with `adapter_source="local"`.

## Routing a query

`router.json` (`router.how`) says it exactly: embed the text of the query's first {r['route_tokens']}
base tokens with the `{spec['embedder']['kind']}` embedder (`embedder` in `router.json`), take the
nearest row of `router_centroids.safetensors` (`centroids_kd`, metric {r['metric']}), and serve it with
the adapter of that row's topic (`expert_k`; -1 = the base alone). In mixie:
`mixie.interop.load_exported_router(dir)`.
"""


def _ranges(xs: Sequence[int]) -> str:
  xs = list(xs)
  return f"{len(xs)} topics: {xs[:8]}{' ...' if len(xs) > 8 else ''}"


# ---------------------------------------------------------------------------------------------------
# Import.


def check_adapter_config(cfg: Mapping[str, Any]) -> list[str]:
  """Reasons mixie cannot represent an adapter, from its `adapter_config.json` alone ([] = none)."""
  problems = []
  if cfg.get("peft_type", "LORA") != "LORA":
    problems.append(f"peft_type={cfg.get('peft_type')!r} (only LORA adapters are supported)")
  if cfg.get("use_dora"):
    problems.append("use_dora=true (DoRA's magnitude vectors are not LoRA)")
  if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
    problems.append(f"bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r} (LoRA biases)")
  if cfg.get("fan_in_fan_out"):
    problems.append("fan_in_fan_out=true (Conv1D-style layers, not a Llama)")
  if cfg.get("modules_to_save"):
    problems.append(f"modules_to_save={cfg['modules_to_save']!r} (fully trained modules outside the "
                    "seven projections)")
  tm = cfg.get("target_modules")
  if isinstance(tm, (list, tuple)):
    bad = [m for m in tm if str(m).split(".")[-1] not in HF_PROJ.values()]
    if bad:
      problems.append(f"target_modules {bad} outside the seven projections "
                      f"({', '.join(HF_PROJ.values())})")
  for key in ("rank_pattern", "alpha_pattern"):
    if cfg.get(key):
      problems.append(f"{key}={cfg[key]!r} (per-module ranks/alphas)")
  if cfg.get("layers_to_transform") is not None:
    problems.append(f"layers_to_transform={cfg['layers_to_transform']!r} (every layer must be adapted)")
  for key in ("layer_replication", "trainable_token_indices", "target_parameters"):
    if cfg.get(key):
      problems.append(f"{key}={cfg[key]!r}")
  r = cfg.get("r")
  if not isinstance(r, int) or r < 1:
    problems.append(f"r={r!r} (a positive integer rank is required)")
  alpha = cfg.get("lora_alpha", r)
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
    problems.append(f"lora_alpha={alpha!r} (a number is required)")
  return problems


def adapter_scale(cfg: Mapping[str, Any], rank: int) -> float:
  """PEFT's scale of an adapter: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
  alpha = float(cfg.get("lora_alpha", rank))
  return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _read_tensors(p) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file (float16/bfloat16/float32 alike), MixieError naming the file."""
  from mixie.model.checkpoint import SafetensorsFile  # reads bfloat16, which safetensors.numpy cannot

  p = mio.path(p)
  if not p.exists():
    raise MixieError(f"{p}: file not found")
  if "://" not in str(p):
    f = SafetensorsFile(pathlib.Path(str(p)))
    return {name: np.array(f.array(name)) for name in f.entries}
  with tempfile.TemporaryDirectory() as tmp:  # a remote adapter (gs://): read from a local copy
    local = pathlib.Path(tmp) / p.name
    local.write_bytes(p.read_bytes())
    f = SafetensorsFile(local)
    return {name: np.array(f.array(name)) for name in f.entries}


def read_peft_adapter(directory, base_cfg: LlamaConfig, lora: LoraConfig
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a PEFT LoRA adapter and conforms it to the run's `lora` on base `base_cfg`.

  Returns `(expert, info)`: the expert tree in `lora`'s rank, targets and dtype, and what was done
  (`source_lora`, `rescale_b`, `padded_rank`, `zero_targets`). Raises one `MixieError` listing every
  reason an adapter cannot be imported.
  """
  d = mio.path(directory)
  where = f"{d}: cannot import this adapter as a mixie expert"
  cfg = mio.read_json(d / ADAPTER_CONFIG)
  check(isinstance(cfg, dict), f"{d / ADAPTER_CONFIG}: not a JSON object")
  problems = check_adapter_config(cfg)
  if problems:
    raise MixieError(f"{where}: " + "; ".join(problems))
  tensors = _read_tensors(d / ADAPTER_WEIGHTS)
  try:
    found = from_peft_tensors(tensors, None, source=str(d / ADAPTER_WEIGHTS))
  except MixieError as e:
    raise MixieError(f"{where}: {e}") from None
  r_in = next(iter(found.values()))["a"].shape[2]
  targets_in = tuple(p for p in PROJECTIONS if p in found)
  shapes = expert_shapes(base_cfg, LoraConfig(rank=r_in, targets=targets_in))
  for p, ab in found.items():
    a, b = ab["a"], ab["b"]
    (l, d_in, _), (_, _, d_out) = shapes[p]["a"], shapes[p]["b"]
    name = f"layers.*.{HF_MODULE[p]}"
    if a.shape[0] != l:
      problems.append(f"{name}: the adapter has {a.shape[0]} layers, the base {l}")
    if a.shape[1:] != (d_in, r_in):
      problems.append(f"{name}.lora_A.weight has shape {a.shape[:0:-1]}, the base needs ({r_in}, {d_in})")
    if b.shape[1:] != (r_in, d_out):
      problems.append(f"{name}.lora_B.weight has shape {b.shape[:0:-1]}, the base needs ({d_out}, {r_in})")
  if cfg["r"] != r_in:
    problems.append(f"adapter_config.json says r={cfg['r']} but the tensors have rank {r_in}")
  if r_in > lora.rank:
    problems.append(f"rank {r_in} exceeds the run's expert rank {lora.rank} (all experts of a run share "
                    "one rank; train the run with a larger lora.rank)")
  extra = [p for p in targets_in if p not in lora.targets]
  if extra:
    problems.append(f"it adapts {[HF_PROJ[p] for p in extra]}, which the run's experts do not target "
                    f"({[HF_PROJ[p] for p in lora.targets]})")
  if problems:
    raise MixieError(f"{where}: " + "; ".join(problems))

  s_in, s_run = adapter_scale(cfg, r_in), lora.scale
  factor = None if s_in == s_run else s_in / s_run
  dt = np.dtype(lora.dtype)
  expert = {}
  for p in lora.targets:
    a_s, b_s = expert_shapes(base_cfg, lora)[p]["a"], expert_shapes(base_cfg, lora)[p]["b"]
    a, b = np.zeros(a_s, dt), np.zeros(b_s, dt)
    if p in found:
      b_in = found[p]["b"]
      if factor is not None:
        b_in = (b_in.astype(np.float64) * factor).astype(np.float32)
      a[:, :, :r_in] = found[p]["a"].astype(dt)
      b[:, :r_in, :] = b_in.astype(dt)
    expert[p] = {"a": a, "b": b}
  info = {"source_lora": {"r": r_in, "lora_alpha": cfg.get("lora_alpha", r_in),
                          "use_rslora": bool(cfg.get("use_rslora")),
                          "target_modules": [HF_PROJ[p] for p in targets_in],
                          "base_model_name_or_path": cfg.get("base_model_name_or_path")},
          "rescale_b": factor, "padded_rank": r_in != lora.rank,
          "zero_targets": [p for p in lora.targets if p not in found]}
  return expert, info


def read_exported_meta(directory) -> dict[str, Any] | None:
  """The store metadata a mixie export left next to an adapter (`mixie_expert.json`), or None."""
  p = mio.path(directory) / EXPERT_JSON
  if not p.exists():
    return None
  m = mio.read_json(p)
  check(isinstance(m, dict) and isinstance(m.get("meta"), dict), f"{p}: not a mixie expert description")
  return m


def read_docs(p, text_field: str = "text") -> list[str]:
  """Documents for a centroid: a `.jsonl`(.gz) file (field `text_field`), a `.txt` file (one document
  per non-empty line) or a directory of `.txt` files (one document each); normalised, de-duplicated."""
  import ml_collections

  from mixie.data.corpus import iter_documents, normalize_text

  path = mio.path(p)
  if not path.exists():
    raise MixieError(f"{p}: no such documents file")
  if path.is_file() and path.name.endswith(".txt"):
    lines = [normalize_text(s) for s in path.read_text().splitlines()]
    docs = list(dict.fromkeys(s for s in lines if s))
    check(bool(docs), f"{p}: no documents (one per non-empty line expected)")
    return docs
  source = "text" if path.is_dir() else "jsonl"
  check(source == "text" or path.name.endswith((".jsonl", ".jsonl.gz")),
        f"{p}: documents must be a .jsonl, .jsonl.gz or .txt file, or a directory of .txt files")
  dc = ml_collections.ConfigDict({"source": source, "path": str(p), "text_field": text_field,
                                  "label_field": "", "split": "", "data_dir": "", "max_docs": 0,
                                  "heldout_fraction": 0.0, "heldout_seed": 0})
  return [d.text for d in iter_documents(dc)]


def docs_centroid(embedder, texts: Sequence[str], metric: str = "cosine") -> np.ndarray:
  """Mean of the L2-normalised document embeddings `[d]`, renormalised to unit length for cosine."""
  check(len(texts) > 0, "no documents to compute a centroid from")
  c = l2_normalize(embedder.embed(list(texts))).astype(np.float64).mean(axis=0)
  if metric == "cosine":
    n = np.linalg.norm(c)
    check(n > 0, "the documents' embeddings average to zero (empty texts, or words the embedder "
          "does not know?)")
    c = c / n
  return c.astype(np.float32)


def next_topic_id(store: ExpertStore, n_clustered: int) -> int:
  """A topic id no clustered topic and no stored expert uses."""
  return max([n_clustered - 1] + store.topics()) + 1


def prepare_import(directory, *, base_cfg: LlamaConfig, fingerprint: str, lora: LoraConfig,
                   centroid: np.ndarray | None, extra_meta: Mapping[str, Any] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads, checks and conforms one PEFT adapter: `(expert, meta)` ready for `ExpertStore.write`.

  An adapter exported by mixie keeps its metadata, and its recorded base must be this one. `centroid`
  None takes the centroid such an export carried (MixieError when there is none).
  """
  d = mio.path(directory)
  exported = read_exported_meta(d)
  old = exported["meta"] if exported else {}
  if exported and old.get("base_fingerprint") not in (None, fingerprint):
    raise MixieError(f"{d}: cannot import this adapter as a mixie expert: it was trained on base "
                     f"{old['base_fingerprint']}, the run's base is {fingerprint}")
  expert, info = read_peft_adapter(d, base_cfg, lora)
  if centroid is None:
    check(old.get("centroid") is not None, f"{d}: no documents given for its routing centroid "
                                           "(pass --docs), and it carries no mixie centroid")
    centroid = np.asarray(old["centroid"], np.float32)
  kept = {k: v for k, v in old.items() if k not in _IMPORT_KEYS}
  meta = {"kind": "imported", **kept, **dict(extra_meta or {}),
          "rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets),
          "base_fingerprint": fingerprint, "centroid": np.asarray(centroid, np.float32).tolist(),
          "imported_from": {"path": str(d), "topic": exported["topic"] if exported else None, **info}}
  return expert, meta


def import_run(config, adapters: Sequence[str], docs: Sequence[str] = (), *, base=None,
               log=print) -> list[dict[str, Any]]:
  """Imports PEFT adapters into the run's expert store (see the module docstring).

  `docs[i]` are the documents of `adapters[i]` (none: the adapter's own mixie centroid). `base` is
  `(LlamaConfig, params, tokenizer)` (loaded from `config.model` when None). Returns the new metas.
  """
  check(len(adapters) > 0, "import: no adapter given (--adapter DIR)", ConfigError)
  check(len(docs) in (0, len(adapters)), f"import: {len(adapters)} adapter(s) but {len(docs)} --docs "
        "files: give one documents file per adapter, in the same order", ConfigError)
  # what can be refused without the base, before loading it
  for a in adapters:
    cfg = mio.read_json(mio.path(a) / ADAPTER_CONFIG)
    problems = check_adapter_config(cfg) if isinstance(cfg, dict) else ["not a JSON object"]
    if problems:
      raise MixieError(f"{a}: cannot import this adapter as a mixie expert: " + "; ".join(problems))
  texts = [read_docs(p, config.data.text_field) for p in docs]
  if base is None:
    from mixie.model.load import load_base
    base = load_base(config.model, seed=int(config.seed))
  base_cfg, params = base[0], base[1]
  from mixie.model.checkpoint import fingerprint as fingerprint_fn
  fp = fingerprint_fn(base_cfg, params)
  store = ExpertStore(experts_dir(config))
  lora = run_lora(config, store)
  metric = _run_metric(config)
  embedder = _run_embedder(config, base) if texts else None
  ready = []  # every adapter is read and checked before any is written
  for i, a in enumerate(adapters):
    centroid = docs_centroid(embedder, texts[i], metric) if texts else None
    ready.append(prepare_import(a, base_cfg=base_cfg, fingerprint=fp, lora=lora, centroid=centroid,
                                extra_meta={"docs": len(texts[i])} if texts else None))
  n_clustered = num_clustered_topics(config.workdir)
  out = []
  for a, (expert, meta) in zip(adapters, ready):
    topic = next_topic_id(store, n_clustered)
    store.write(topic, expert, meta)
    how = f"centroid of {meta['docs']} documents" if texts else "its exported centroid"
    log(f"mixie.import: {a} -> topic {topic} in {store.dir} ({how})")
    out.append(store.meta(topic))
  return out


def _run_metric(config) -> str:
  from mixie.cluster.topics import load_topics, topics_complete
  return load_topics(config.workdir).metric if topics_complete(config.workdir) else config.cluster.metric


def _run_embedder(config, base):
  """The embedder the run's topics were embedded with (the configured one when there are none)."""
  from mixie.cluster.embed import SPEC_JSON, load_embedder, make_embedder
  from mixie.cluster.topics import topics_dir

  d = topics_dir(config.workdir) / "embedder"
  if (d / SPEC_JSON).exists():
    return load_embedder(d, base=base, batch=int(config.cluster.embed_batch))
  check(config.cluster.embedder != "tfidf", f"{d}: the run has no fitted tfidf embedder to embed the "
        "documents with (run mixie.cluster first, or use cluster.embedder=minilm or base)", ConfigError)
  return make_embedder(config.cluster, base=base)

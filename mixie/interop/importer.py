"""PEFT LoRA adapters trained elsewhere into the run's expert store (`import_run`, CLI
`python -m mixie.experts import`).

Each adapter is read by `mixie.interop.peft.read_adapter` (which refuses what is not plain LoRA or
rsLoRA, naming each reason), checked against the base (layer count, every tensor shape) and conformed to
the run's experts so that it stacks and serves with them: a smaller rank is zero-padded and missing
projections are zero (both exact), and a different scale (alpha / r, or alpha / sqrt(r) for rsLoRA) is
folded into B (one float32 rounding per element; none when the scales agree). Its routing centroid is
the mean of the L2-normalised embeddings of the given documents under the run's embedder (renormalised
for the cosine metric); an adapter exported by mixie may bring its own centroid instead. A mixie export
of the same run imports bit-exactly. Every adapter of one import is read and checked before any is
written; each gets a new id after the clustered topics and the stored experts, and from then on the run's
router (`mixie.route.run`) reaches it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from mixie import io as mio
from mixie.cluster.embed import SPEC_JSON, load_embedder, make_embedder
from mixie.cluster.topics import load_topics, topics_complete, topics_dir
from mixie.data.corpus import iter_documents, normalize_text
from mixie.errors import ConfigError, MixieError, check
from mixie.interop.export import EXPERT_JSON
from mixie.interop.peft import HF_MODULE, HF_PROJ, PeftAdapter, read_adapter, read_adapter_config
from mixie.model.checkpoint import fingerprint as fingerprint_of
from mixie.model.llama import LlamaConfig
from mixie.model.load import load_base
from mixie.model.lora import LoraConfig, expert_shapes
from mixie.route.search import l2_normalize
from mixie.store import ExpertMeta, ExpertStore, run_store

# meta fields the import sets itself (everything else an exported expert carried is kept as it was)
_IMPORT_KEYS = ("topic", "format", "rank", "alpha", "targets", "base_fingerprint", "centroid",
                "imported_from")


def conform(adapter: PeftAdapter, base_cfg: LlamaConfig, lora: LoraConfig, where: str
            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """`adapter` in the run's `lora` rank, targets and dtype on base `base_cfg` (see the module docstring).

  Returns `(expert, info)`: the expert tree and what was done (`source_lora`, `rescale_b`,
  `padded_rank`, `zero_targets`). Raises one `MixieError` (prefixed by `where`) listing every reason the
  adapter does not fit.
  """
  r_in, found = adapter.rank, adapter.expert
  shapes_in = expert_shapes(base_cfg, LoraConfig(rank=r_in, targets=adapter.targets))
  problems = []
  for p, ab in found.items():
    a, b = ab["a"], ab["b"]
    (l, d_in, _), (_, _, d_out) = shapes_in[p]["a"], shapes_in[p]["b"]
    name = f"layers.*.{HF_MODULE[p]}"
    if a.shape[0] != l:
      problems.append(f"{name}: the adapter has {a.shape[0]} layers, the base {l}")
    if a.shape[1:] != (d_in, r_in):
      problems.append(f"{name}.lora_A.weight has shape {a.shape[:0:-1]}, the base needs ({r_in}, {d_in})")
    if b.shape[1:] != (r_in, d_out):
      problems.append(f"{name}.lora_B.weight has shape {b.shape[:0:-1]}, the base needs ({d_out}, {r_in})")
  if r_in > lora.rank:
    problems.append(f"rank {r_in} exceeds the run's expert rank {lora.rank} (all experts of a run share "
                    "one rank; train the run with a larger lora.rank)")
  extra = [p for p in adapter.targets if p not in lora.targets]
  if extra:
    problems.append(f"it adapts {[HF_PROJ[p] for p in extra]}, which the run's experts do not target "
                    f"({[HF_PROJ[p] for p in lora.targets]})")
  if problems:
    raise MixieError(f"{where}: " + "; ".join(problems))

  factor = None if adapter.scale == lora.scale else adapter.scale / lora.scale
  dt = np.dtype(lora.dtype)
  shapes = expert_shapes(base_cfg, lora)
  expert = {}
  for p in lora.targets:
    a, b = np.zeros(shapes[p]["a"], dt), np.zeros(shapes[p]["b"], dt)
    if p in found:
      b_in = found[p]["b"]
      if factor is not None:
        b_in = (b_in.astype(np.float64) * factor).astype(np.float32)
      a[:, :, :r_in] = found[p]["a"].astype(dt)
      b[:, :r_in, :] = b_in.astype(dt)
    expert[p] = {"a": a, "b": b}
  cfg = adapter.config
  info = {"source_lora": {"r": r_in, "lora_alpha": cfg.get("lora_alpha", r_in),
                          "use_rslora": adapter.use_rslora,
                          "target_modules": [HF_PROJ[p] for p in adapter.targets],
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


def num_clustered_topics(workdir) -> int:
  """How many topics the cluster stage made in `workdir` (0 when it has none)."""
  return load_topics(workdir).num_topics if topics_complete(workdir) else 0


def next_topic_id(store: ExpertStore, n_clustered: int) -> int:
  """An id no clustered topic and no stored expert uses."""
  return max([n_clustered - 1] + store.topics()) + 1


def prepare_import(directory, *, base_cfg: LlamaConfig, fingerprint: str, lora: LoraConfig,
                   centroid: np.ndarray | None, extra_meta: Mapping[str, Any] | None = None
                   ) -> tuple[dict[str, Any], ExpertMeta]:
  """Reads, checks and conforms one PEFT adapter: `(expert, meta)` ready for `ExpertStore.write`.

  An adapter exported by mixie keeps its metadata, and its recorded base must be this one. `centroid`
  None takes the centroid such an export carried (MixieError when there is none).
  """
  d = mio.path(directory)
  where = f"{d}: cannot import this adapter as a mixie expert"
  exported = read_exported_meta(d)
  old = exported["meta"] if exported else {}
  if exported and old.get("base_fingerprint") not in (None, fingerprint):
    raise MixieError(f"{where}: it was trained on base {old['base_fingerprint']}, the run's base is "
                     f"{fingerprint}")
  expert, info = conform(read_adapter(d), base_cfg, lora, where)
  if centroid is None:
    check(old.get("centroid") is not None, f"{d}: no documents given for its routing centroid "
                                           "(pass --docs), and it carries no mixie centroid")
    centroid = np.asarray(old["centroid"], np.float32)
  kept = {k: v for k, v in old.items() if k not in _IMPORT_KEYS}
  meta = ExpertMeta.new(lora, fingerprint, **{
      "kind": "imported", **kept, **dict(extra_meta or {}),
      "centroid": np.asarray(centroid, np.float32).tolist(),
      "imported_from": {"path": str(d), "topic": exported["topic"] if exported else None, **info}})
  return expert, meta


def import_run(config, adapters: Sequence[str], docs: Sequence[str] = (), *, base=None,
               log=print) -> list[ExpertMeta]:
  """Imports PEFT adapters into the run's expert store (see the module docstring).

  `docs[i]` are the documents of `adapters[i]` (none: the adapter's own mixie centroid). `base` is
  `(LlamaConfig, params, tokenizer)` (loaded from `config.model` when None). Returns the new metas.
  """
  check(len(adapters) > 0, "import: no adapter given (--adapter DIR)", ConfigError)
  check(len(docs) in (0, len(adapters)), f"import: {len(adapters)} adapter(s) but {len(docs)} --docs "
        "files: give one documents file per adapter, in the same order", ConfigError)
  for a in adapters:  # what can be refused without the base, before loading it
    read_adapter_config(a)
  texts = [read_docs(p, config.data.text_field) for p in docs]
  if base is None:
    base = load_base(config.model, seed=int(config.seed))
  base_cfg, params = base[0], base[1]
  fp = fingerprint_of(base_cfg, params)
  store = run_store(config.workdir)
  lora = store.lora(default=LoraConfig.from_config(config.lora))
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
    out.append(store.write(topic, expert, meta))
    how = f"centroid of {meta.extra['docs']} documents" if texts else "its exported centroid"
    log(f"mixie.experts import: {a} -> topic {topic} in {store.dir} ({how})")
  return out


def _run_metric(config) -> str:
  return load_topics(config.workdir).metric if topics_complete(config.workdir) else config.cluster.metric


def _run_embedder(config, base):
  """The embedder the run's topics were embedded with (the configured one when there are none)."""
  d = topics_dir(config.workdir) / "embedder"
  if (d / SPEC_JSON).exists():
    return load_embedder(d, base=base, batch=int(config.cluster.embed_batch))
  check(config.cluster.embedder != "tfidf", f"{d}: the run has no fitted tfidf embedder to embed the "
        "documents with (run mixie.cluster first, or use cluster.embedder=minilm or base)", ConfigError)
  return make_embedder(config.cluster, base=base)

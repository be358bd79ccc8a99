"""What the shipped sweeps share: the base run config of each variant and the sweep ConfigDict.

Variants (the config arg, comma-separated flags, e.g. `configs/sweeps/tokens.py:accel,stdlib`):
- "" (CPU): the demo's model, LoRA and optimizer (SmolLM2-135M f32, r=8, k=6 topics, 6 slots x 2 rows
  x 128 tokens, lr 3e-3), on the WHOLE shipped corpus (10,033 summaries, ~1M training tokens, 130k-212k
  per topic, so no topic repeats data up to 32k tokens per expert), evaluated on a fixed 200-document
  subset of the held-out split; baselines lora_all and lora_all_wide, and full continued pre-training
  at the tokens sweep's points (its lr picked on training loss). Every point of every sweep uses these
  hyper-parameters: nothing is tuned on held-out data.
- "stdlib": the same on the `wiki_stdlib` corpus (the summaries + this interpreter's standard library,
  code and docstrings; `mixie.data.stdlib_corpus`), topics that differ in kind.
- "accel": a GPU/TPU: bf16 compute and storage, 8 rows per slot (the mesh's data axis takes every
  device), larger budgets, every held-out document.
- "tinyllama": TinyLlama-1.1B (configs/tinyllama_moin5k.py's model: set --config.base.model.path to
  its HF checkpoint) on the shipped corpus, bf16, rows of 512 tokens; implies "accel".
All sweeps of one variant share one sweep directory, so their common points and stages are computed
once ($MIXIE_SWEEP_DIR, default /tmp/mixie_sweeps, then one folder per variant).
"""

import os

import ml_collections

from configs import demo, tinyllama_moin5k

FLAGS = ("stdlib", "accel", "tinyllama")


def parse(arg: str) -> frozenset:
  """The variant flags of a sweep config arg; ValueError on an unknown one."""
  flags = frozenset(f for f in arg.split(",") if f)
  bad = sorted(flags - set(FLAGS))
  if bad:
    raise ValueError(f"unknown sweep variant(s) {bad}; use a comma-separated subset of {FLAGS}")
  return flags | ({"accel"} if "tinyllama" in flags else set())


def run_base(flags: frozenset) -> ml_collections.ConfigDict:
  """The run config every point of a variant starts from."""
  if "tinyllama" in flags:
    c = tinyllama_moin5k.get_config("")
    c.data.source, c.data.path, c.data.data_dir = "wiki_summaries", "", ""  # the shipped corpus
    c.data.heldout_fraction = 0.05  # as the demo: ~474 held-out summaries
    c.cluster.k, c.cluster.n_init, c.cluster.max_iters = 6, 3, 100  # six topics, as the CPU sweeps
    c.cluster.balanced_max_size, c.cluster.chunk = 0.0, 8192  # plain k-means at this size
    c.dataset.seq_len = 512  # a few summaries per row
    c.model.remat = False  # short rows
    c.train.budget = "fixed"  # the same budget for every expert
    c.train.slots = 6  # every expert in one wave
  else:
    c = demo.get_config("")
    c.data.max_docs = 0  # the whole shipped corpus (10,033 summaries)
    c.eval.max_docs = 200  # a fixed-seed subset of the ~474 held-out summaries
  c.train.baselines = ("lora_all", "lora_all_wide")  # matched on tokens; matched on parameters
  # the full-CPT baseline's lr (tokens sweep points only, `tok`): picked on the training loss of its last
  # 4 of 16 steps on the CPU variant's data (24.6k tokens; 1e-5, 3e-5, 1e-4, 3e-4 gave 2.933, 2.832,
  # 2.745, 2.754 nats, 2026-12-07): re-pick for another base
  c.train.full_lr = 1e-4
  c.train.checkpoint_every = 20  # steps
  if "accel" in flags:
    c.model.dtype = c.model.param_dtype = "bfloat16"  # bf16 compute and base storage
    c.mesh.shape = (1, -1, 1)  # every device on the data axis (6 slots need not divide the device count)
    c.train.batch_per_slot = 8  # rows per expert per step
    c.train.ce_chunk = 4096  # tokens per LM-head chunk
    c.eval.max_docs = 0  # every held-out document
    c.eval.batch = 64  # rows per scoring forward
  if "stdlib" in flags:
    c.data.source = "wiki_stdlib"  # the summaries + this interpreter's standard library
  return c


def budgets(flags: frozenset) -> tuple[int, ...]:
  """Tokens per expert of the tokens sweep (every one within the smallest topic: no repeated data)."""
  return (16384, 32768, 65536, 131072) if "accel" in flags else (2048, 4096, 8192, 16384, 32768)


def mid_budget(flags: frozenset) -> int:
  """Tokens per expert of the sweeps that vary something else (k, rank, P, init)."""
  return 32768 if "accel" in flags else 8192


def workdir(flags: frozenset) -> str:
  """The variant's sweep directory."""
  root = os.environ.get("MIXIE_SWEEP_DIR", "/tmp/mixie_sweeps")
  name = "_".join(sorted(flags - ({"accel"} if "tinyllama" in flags else set()))) or "cpu"
  return f"{root}/{name}"


def tok(n: int, full: bool = True) -> dict:
  """The overrides of a scratch point with `n` tokens per expert; with `full` (the tokens sweep's points)
  its baselines add full continued pre-training (`train.full_lr`) to the variant's."""
  return {"train.tokens_per_expert": n,
          "train.baselines": ("lora_all", "lora_all_wide") + (("full",) if full else ())}


def seed_tok(n: int, fraction: float = 0.5) -> dict:
  """The overrides of a seed-branched point with `n` tokens per expert (no baselines: those of the scratch
  point at the same budget are the same runs; centroid routing only, for a cheaper evaluation)."""
  return {"train.tokens_per_expert": n, "train.init": "seed", "train.seed_fraction": fraction,
          "train.baselines": (), "eval.route_modes": ("centroid",)}


def sweep(name: str, arg: str, points, *, x: str, series=("train.init", "train.seed_fraction")):
  """The sweep ConfigDict of `mixie.sweep.spec` for variant `arg`."""
  flags = parse(arg)
  s = ml_collections.ConfigDict()
  s.workdir = workdir(flags)  # the sweep directory, shared by the variant's sweeps
  folder = s.workdir.rsplit("/", 1)[-1]
  s.name = name if folder == "cpu" else f"{name}_{folder}"  # report name: reports/<name>/
  s.base = run_base(flags)  # the run config every point starts from
  s.points = tuple(points(flags))  # (name, {"section.field": value}) per point
  s.x = x  # the swept field (plots against it)
  s.series = tuple(series)  # fields telling a point's lines apart besides the row
  s.plot_prefix = 0  # P of the plots against tokens / FLOPs / k / rank; 0 = the largest common P
  return s

"""TinyLlama-1.1B-2T + ~5000 K-means topics ("MoIN-5k"), for a TPU VM pod slice.

Arg: "" for the full run; "runlocal" shrinks it to a random-weight TinyLlama-shaped smoke run on a CPU.
"""

from configs.common import base_config


def get_config(arg: str = ""):
  """The MoIN-5k config; `arg` "runlocal" gives the CPU smoke run."""
  c = base_config()
  c.workdir = "gs://YOUR_BUCKET/mixie/moin5k"  # work directory (GCS on TPU VMs)
  c.model.source = "hf"  # HF safetensors checkpoint directory
  c.model.path = "gs://YOUR_BUCKET/ckpt/TinyLlama-1.1B-intermediate-step-955k-token-2T"  # TinyLlama-2T
  c.model.dtype = "bfloat16"  # bf16 compute on TPU
  c.model.param_dtype = "bfloat16"  # bf16 frozen base
  c.model.remat = True  # long sequences: rematerialise layers
  c.data.source = "tfds"  # a TFDS text dataset on GCS
  c.data.path = "c4/en"  # dataset name (the paper used SlimPajama-like pre-training data)
  c.data.data_dir = "gs://YOUR_BUCKET/tfds"  # where the TFDS data lives
  c.data.heldout_fraction = 0.001  # held-out documents
  c.cluster.embedder = "minilm"  # paper leaves it open; MiniLM is cheap and strong
  c.cluster.k = 5000  # MoIN-5k
  c.cluster.n_init = 1  # one restart at this scale
  c.cluster.max_iters = 25  # Lloyd iterations
  c.cluster.balanced_max_size = 4.0  # cap topics at 4x the mean size
  c.cluster.chunk = 65536  # points per distance chunk
  c.dataset.seq_len = 2048  # TinyLlama context
  c.lora.rank = 16  # r
  c.lora.alpha = 32.0  # scale 2
  c.train.slots = 256  # E per wave: one per chip on a v5e-256 (expert axis 256)
  c.train.batch_per_slot = 8  # rows per expert per step
  c.train.budget = "proportional"  # larger topics get more tokens
  c.train.tokens_per_expert = 20_000_000  # mean tokens per expert
  c.train.lr = 2e-4  # peak LR
  c.train.warmup_steps = 100  # per expert
  c.train.checkpoint_every = 200  # steps
  c.mesh.shape = (-1, 1, 1)  # all chips on the expert axis; the base (1.1B bf16) is replicated
  if arg == "runlocal":
    c.workdir = "/tmp/mixie_moin5k_local"
    c.model.source = "random"
    c.model.preset = "tinyllama_1b"
    c.data.source = "wiki_summaries"
    c.data.max_docs = 400
    c.cluster.k = 4
    c.dataset.seq_len = 64
    c.train.slots = 2
    c.train.batch_per_slot = 1
    c.train.tokens_per_expert = 256
  elif arg:
    raise ValueError(f"unknown arg {arg!r} (use '' or 'runlocal')")
  return c

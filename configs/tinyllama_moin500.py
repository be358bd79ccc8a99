"""TinyLlama-1.1B-2T + ~500 UMAP+HDBSCAN topics ("MoIN-500"), for a TPU VM pod slice.

Same as MoIN-5k except for the clustering. Arg: "" or "runlocal" (CPU smoke run).
"""

from configs import tinyllama_moin5k


def get_config(arg: str = ""):
  """The MoIN-500 config; `arg` "runlocal" gives the CPU smoke run."""
  c = tinyllama_moin5k.get_config(arg)
  c.workdir = c.workdir.replace("moin5k", "moin500")  # its own work directory
  c.cluster.method = "hdbscan"  # UMAP to umap_dim, then HDBSCAN; the number of topics is what it finds
  c.cluster.umap_dim = 10  # UMAP output dimension
  c.cluster.min_cluster_size = 500 if not arg else 20  # HDBSCAN min_cluster_size
  c.train.slots = 250 if not arg else 2  # fewer, larger experts per wave
  return c

"""Documents added to a run after its topics were clustered (`python -m mixie.experts add`), one batch per
`add`, kept in the work directory so that routing and later retraining can use them.

    workdir/added/<batch>/docs.jsonl        {"id", "text", "topic", "how"} per document, in input order
    workdir/added/<batch>/embeddings.npz    emb_nd float32 [n, d] (the topics' embedder, as clustering),
                                            topic int32 [n] (the topic each document joined or formed)
    workdir/added/<batch>/records.npz       tokens int32 (all documents' token ids, no BOS/EOS, back to
                                            back), offsets int64 [n + 1], topic int32 [n]
    workdir/added/<batch>/batch.json        written last (the completion marker): the assignment rule
                                            and its numbers, the new topics with their centroids and
                                            join radii, the joined topics, the generation it was based on

A batch belongs to a generation of the expert store when that generation's `extra["added"]` lists it
(the commit of the `add` puts it there): a rollback to an earlier generation drops its documents from
routing and training again. A document's `topic` is a clustered topic id (`< K`, the topics'
centroid rows) or the id of an expert the batch created (`>= K`).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from mixie import io as mio
from mixie.errors import MixieError, check

ADDED = "added"
BATCH_JSON = "batch.json"
ADDED_KEY = "added"  # the key of a generation's `extra` listing its batches, in order


def batch_dir(workdir, batch: str):
  """The folder of one batch of added documents."""
  return mio.path(workdir) / ADDED / batch


def batch_complete(workdir, batch: str) -> bool:
  """Whether the batch's files were all written."""
  return (batch_dir(workdir, batch) / BATCH_JSON).exists()


def store_batches(store) -> list[str]:
  """The batches of added documents that the store's generation includes."""
  return list(store.snapshot().extra.get(ADDED_KEY, []))


def read_batch(workdir, batch: str) -> dict[str, Any]:
  """`batch.json` of a complete batch (MixieError when the batch is missing or incomplete)."""
  d = batch_dir(workdir, batch)
  check(batch_complete(workdir, batch), f"{d}: the added documents of batch {batch} are missing or were "
                                        "never completely written; rerun the `add` that made them")
  return mio.read_json(d / BATCH_JSON)


def write_batch(workdir, batch: str, *, ids: Sequence[str], texts: Sequence[str], how: Sequence[str],
                emb_nd: np.ndarray, topic_n: np.ndarray, tokens: Sequence[np.ndarray],
                info: dict[str, Any]) -> None:
  """Writes a batch's files, `batch.json` (`info`) last."""
  d = batch_dir(workdir, batch)
  topic_n = np.asarray(topic_n, np.int32)
  lines = [json.dumps({"id": i, "text": t, "topic": int(k), "how": h})
           for i, t, k, h in zip(ids, texts, topic_n, how)]
  mio.atomic_write_text(d / "docs.jsonl", "\n".join(lines) + "\n")
  mio.save_arrays(d / "embeddings.npz", {"emb_nd": np.asarray(emb_nd, np.float32), "topic": topic_n})
  offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).astype(np.int64)
  flat = np.concatenate([np.asarray(t, np.int32) for t in tokens]) if tokens else np.zeros(0, np.int32)
  mio.save_arrays(d / "records.npz", {"tokens": flat, "offsets": offsets, "topic": topic_n})
  mio.atomic_write_json(d / BATCH_JSON, info)


def batch_embeddings(workdir, batch: str) -> tuple[np.ndarray, np.ndarray]:
  """`(emb_nd, topic_n)` of a batch's documents."""
  read_batch(workdir, batch)
  a = mio.load_arrays(batch_dir(workdir, batch) / "embeddings.npz")
  return a["emb_nd"], a["topic"]


def batch_records(workdir, batch: str) -> tuple[list[np.ndarray], np.ndarray]:
  """`(token arrays, topic_n)` of a batch's documents (for training)."""
  read_batch(workdir, batch)
  p = batch_dir(workdir, batch) / "records.npz"
  a = mio.load_arrays(p)
  off = a["offsets"]
  check(off.shape == (a["topic"].size + 1,) and int(off[-1]) == a["tokens"].size,
        f"{p}: corrupt records (offsets do not match the tokens)")
  return [a["tokens"][off[i]:off[i + 1]] for i in range(a["topic"].size)], a["topic"]


def added_voters(workdir, store, n_topics: int, extra_ids: Sequence[int]
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """The added documents of the store's generation as kNN voters: embeddings `[m, d]` and router rows
  `[m]` (a clustered topic's row, or `n_topics + i` for the i-th of `extra_ids`, the router's rows
  beyond the clustered topics); (None, None) without any."""
  row_of = {int(t): n_topics + i for i, t in enumerate(extra_ids)}
  embs, rows = [], []
  for b in store_batches(store):
    emb, topic = batch_embeddings(workdir, b)
    r = np.asarray([t if t < n_topics else row_of.get(int(t), -1) for t in topic.tolist()], np.int64)
    if (r < 0).any():
      raise MixieError(f"{batch_dir(workdir, b)}: documents of topics {sorted(set(topic[r < 0].tolist()))}, "
                       f"which generation {store.generation} of {store.dir} has no expert for")
    embs.append(emb)
    rows.append(r)
  if not embs:
    return None, None
  return np.concatenate(embs), np.concatenate(rows).astype(np.int32)

"""Packed per-topic batches `[E, b, T]` for training E experts at once, deterministic and checkpointable.

Each of the E slots streams the documents of one topic: every epoch is a fresh permutation of the
topic's documents (seeded by (seed, topic, epoch)), each document is `[BOS] tokens [EOS]` (BOS only
when the tokenizer has one), and documents are packed back to back into one endless stream per slot.
A batch cuts b rows of T+1 tokens from the slot's stream with stride T (consecutive rows and batches
overlap by one token, so every next-token transition of the stream is trained on exactly once):
`inputs = row[:-1]`, `targets = row[1:]`. The loss is masked where the input is a document's EOS
(the target would be the next document's first token) and on padding (empty slots, -1).

The state is, per slot, (topic, epoch, document index in that epoch's permutation, token offset in
that document): four integers, so `state()` is a small JSON-able dict, and a loader restored from it
yields exactly the batches the uninterrupted one would have. `set_slot(e, topic)` restarts slot e on
a new topic (the expert scheduler refills a slot when its expert is done).

Why plain numpy and not a grain pipeline: grain's iterators checkpoint one pipeline each, but here the
E streams are independent, a slot's topic changes mid-run, and the packing needs document-boundary
masks with exact resumption inside a document. E grain pipelines merged by hand would carry more state
than the four integers above and give nothing in return; record reads go through the same
random-access source grain uses (`open_dataset` returns a grain `RandomAccessDataSource`), and the
token counts come from the dataset's side index, so a batch reads only the documents it packs.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from mixie.errors import ConfigError, MixieError, check

STATE_VERSION = 1
SMALL_TOPIC_MODES = ("merge", "skip")


class PackedLoader:
  """Yields `{"inputs", "targets", "loss_mask", "positions", "segment_ids": [E, b, T], "slot_tokens": [E]}`.

  `source`: a random-access split (`mixie.data.dataset.open_dataset`) with `topics`/`lengths` side
  arrays. `slot_topics`: one topic id per slot, -1 = empty. `topic_map` (int [num_topics], optional,
  from `resolve_small_topics`) maps each record's topic to the topic it trains (-1 = dropped).
  inputs/targets/positions/segment_ids are int32, loss_mask float32 (1 = scored), slot_tokens int32
  (scored targets per slot). positions count from 0 at each document's first token (BOS);
  segment_ids number the documents of a row from 1 (0 = padding), for document-masked attention.
  """

  def __init__(self, source, slot_topics: Sequence[int], *, batch_per_slot: int, seq_len: int,
               eos_id: int, bos_id: int | None = None, pad_id: int = 0, seed: int = 0,
               topic_map: np.ndarray | None = None):
    check(batch_per_slot > 0, f"batch_per_slot={batch_per_slot}: must be > 0", ConfigError)
    check(seq_len > 0, f"seq_len={seq_len}: must be > 0", ConfigError)
    check(len(slot_topics) > 0, "PackedLoader: needs at least one slot")
    self._src = source
    self.b, self.t = int(batch_per_slot), int(seq_len)
    self.eos_id, self.bos_id, self.pad_id, self.seed = int(eos_id), bos_id, int(pad_id), int(seed)
    self._n_special = 1 + (bos_id is not None)
    self.num_topics = int(source.num_topics)
    topics = np.asarray(source.topics, np.int64)
    if topic_map is not None:
      topic_map = np.asarray(topic_map, np.int64)
      check(topic_map.shape == (self.num_topics,),
            f"topic_map has shape {topic_map.shape}, expected ({self.num_topics},)")
      topics = topic_map[topics]
    self._lengths = np.asarray(source.lengths, np.int64)
    self._order = np.argsort(topics, kind="stable")
    bounds = np.searchsorted(topics[self._order], np.arange(self.num_topics + 1))
    self._lo, self._hi = bounds[:-1], bounds[1:]
    self._slots: list[dict[str, int]] = []
    self._perm_cache: list[tuple[tuple[int, int], np.ndarray] | None] = []
    self._local: set[int] | None = None  # slots whose tokens this process reads (None: all)
    for e, topic in enumerate(slot_topics):
      self._slots.append({})
      self._perm_cache.append(None)
      self.set_slot(e, topic)

  # --- slots ---------------------------------------------------------------------------------------
  @property
  def num_slots(self) -> int:
    """Number of expert slots E the loader fills."""
    return len(self._slots)

  @property
  def slot_topics(self) -> list[int]:
    """The topic each slot currently reads (-1: none)."""
    return [s["topic"] for s in self._slots]

  def topic_docs(self, topic: int) -> np.ndarray:
    """Record indices (ascending) of the documents that train `topic` (after `topic_map`)."""
    return self._order[self._lo[topic]:self._hi[topic]]

  def _check_topic(self, topic: int) -> None:
    check(-1 <= topic < self.num_topics, f"topic {topic} is not in [0, {self.num_topics}) (or -1)")
    if topic >= 0:
      check(self._hi[topic] > self._lo[topic],
            f"topic {topic} has no documents in split {getattr(self._src, 'split', '?')!r} "
            "(merged away, skipped, or empty)")

  def set_slot(self, e: int, topic: int) -> None:
    """Restarts slot `e` on `topic` (-1 = empty) at epoch 0, first document."""
    check(0 <= e < self.num_slots, f"slot {e} is not in [0, {self.num_slots})")
    topic = int(topic)
    self._check_topic(topic)
    self._slots[e] = {"topic": topic, "epoch": 0, "doc": 0, "offset": 0}
    self._perm_cache[e] = None

  def set_local_slots(self, slots: Sequence[int] | None) -> None:
    """Reads the documents of `slots` only (None: every slot); the other slots' rows come back as
    padding, but every slot's cursor and `slot_tokens` advance exactly as before (they depend on the
    side index's lengths only). With several processes, each reads just the slots its devices hold."""
    self._local = None if slots is None else {int(e) for e in slots}

  # --- state ---------------------------------------------------------------------------------------
  def state(self) -> dict[str, Any]:
    """A JSON-able snapshot; `restore` continues from exactly this point."""
    return {"version": STATE_VERSION, "seed": self.seed, "batch_per_slot": self.b, "seq_len": self.t,
            "bos": self.bos_id is not None,
            "slots": [dict(s, docs=int(self._hi[s["topic"]] - self._lo[s["topic"]])
                           if s["topic"] >= 0 else 0) for s in self._slots]}

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from a `state()` snapshot; `MixieError` if it belongs to a different setup."""
    check(isinstance(state, dict) and state.get("version") == STATE_VERSION,
          f"loader state: unknown version {state.get('version') if isinstance(state, dict) else state!r}")
    mine = {"seed": self.seed, "batch_per_slot": self.b, "seq_len": self.t,
            "bos": self.bos_id is not None}
    for k, v in mine.items():
      check(state.get(k) == v, f"loader state: {k}={state.get(k)!r} but this loader has {v!r}")
    slots = state["slots"]
    check(len(slots) == self.num_slots,
          f"loader state: {len(slots)} slots but this loader has {self.num_slots}")
    new = []
    for e, s in enumerate(slots):
      topic = int(s["topic"])
      self._check_topic(topic)
      n_docs = int(self._hi[topic] - self._lo[topic]) if topic >= 0 else 0
      check(int(s["docs"]) == n_docs,
            f"loader state: slot {e} topic {topic} had {s['docs']} documents, the dataset now has "
            f"{n_docs} (a different dataset or topic_map?)")
      new.append({"topic": topic, "epoch": int(s["epoch"]), "doc": int(s["doc"]),
                  "offset": int(s["offset"])})
    self._slots = new
    self._perm_cache = [None] * self.num_slots

  # --- packing -------------------------------------------------------------------------------------
  def _perm(self, e: int, topic: int, epoch: int) -> np.ndarray:
    cached = self._perm_cache[e]
    if cached is not None and cached[0] == (topic, epoch):
      return cached[1]
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, topic, epoch]))
    perm = rng.permutation(self.topic_docs(topic))
    self._perm_cache[e] = ((topic, epoch), perm)
    return perm

  def _walk(self, e: int, cur: dict[str, int], n: int, pieces: list | None):
    """Advances cursor `cur` by n stream tokens; appends (record, start, take, seq_len) to `pieces`."""
    cur = dict(cur)
    while n > 0:
      perm = self._perm(e, cur["topic"], cur["epoch"])
      rec = int(perm[cur["doc"]])
      seq_len = int(self._lengths[rec]) + self._n_special
      take = min(seq_len - cur["offset"], n)
      if pieces is not None:
        pieces.append((rec, cur["offset"], take, seq_len))
      cur["offset"] += take
      n -= take
      if cur["offset"] == seq_len:
        cur["doc"], cur["offset"] = cur["doc"] + 1, 0
        if cur["doc"] == perm.size:
          cur["epoch"], cur["doc"] = cur["epoch"] + 1, 0
    return cur

  def _doc_seq(self, tokens: np.ndarray) -> np.ndarray:
    parts = ([np.asarray([self.bos_id], np.int32)] if self.bos_id is not None else []) + [
        np.asarray(tokens, np.int32), np.asarray([self.eos_id], np.int32)]
    return np.concatenate(parts)

  def next_batch(self) -> dict[str, np.ndarray]:
    """The next batch; advances every non-empty slot by b*T stream tokens."""
    E, b, T = self.num_slots, self.b, self.t
    n = b * T + 1
    plan = []
    for e, cur in enumerate(self._slots):
      if cur["topic"] < 0:
        plan.append(None)
        continue
      pieces: list = []
      self._walk(e, cur, n, pieces)
      plan.append(pieces)
    mine = [self._local is None or e in self._local for e in range(E)]
    recs = sorted({p[0] for e, pieces in enumerate(plan) if pieces and mine[e] for p in pieces})
    docs = dict(zip(recs, (self._doc_seq(r["tokens"]) for r in self._src.__getitems__(recs)))) \
        if recs else {}

    inputs = np.full((E, b, T), self.pad_id, np.int32)
    targets = np.full((E, b, T), self.pad_id, np.int32)
    loss_mask = np.zeros((E, b, T), np.float32)
    positions = np.zeros((E, b, T), np.int32)
    segment_ids = np.zeros((E, b, T), np.int32)
    rows = (np.arange(b) * T)[:, None] + np.arange(T + 1)[None, :]  # [b, T+1] into the chunk
    for e, pieces in enumerate(plan):
      if pieces is None:
        continue
      tok = np.empty(n, np.int32)
      end = np.zeros(n, bool)
      pos = np.empty(n, np.int32)
      occ = np.empty(n, np.int32)
      c = 0
      for k, (rec, start, take, seq_len) in enumerate(pieces):
        if mine[e]:
          seq = docs[rec]
          check(seq.size == seq_len, f"record {rec}: {seq.size - self._n_special} tokens but the index "
                                     f"says {seq_len - self._n_special}: the dataset is corrupt")
          tok[c:c + take] = seq[start:start + take]
        else:
          tok[c:c + take] = self.pad_id
        end[c + take - 1] = start + take == seq_len
        pos[c:c + take] = np.arange(start, start + take)
        occ[c:c + take] = k
        c += take
      inputs[e], targets[e] = tok[rows[:, :-1]], tok[rows[:, 1:]]
      loss_mask[e] = ~end[rows[:, :-1]]
      positions[e] = pos[rows[:, :-1]]
      segment_ids[e] = occ[rows[:, :-1]] - occ[rows[:, :1]] + 1
      self._slots[e] = self._walk(e, self._slots[e], b * T, None)
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "positions": positions,
            "segment_ids": segment_ids, "slot_tokens": loss_mask.sum((1, 2)).astype(np.int32)}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self.next_batch()


def loader_from_config(cfg, source, slot_topics: Sequence[int], tokenizer,
                       topic_map: np.ndarray | None = None) -> PackedLoader:
  """A `PackedLoader` with b = `train.batch_per_slot`, T = `dataset.seq_len`, seed = `seed`.

  EOS is `tokenizer.eos_ids[0]`; documents start with BOS only when the tokenizer adds one by default
  (`tokenizer.add_bos`, the checkpoint's convention; True when the attribute is absent).
  """
  check(len(tokenizer.eos_ids) > 0, "the tokenizer has no EOS token to separate documents")
  add_bos = bool(getattr(tokenizer, "add_bos", True)) and tokenizer.bos_id is not None
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_ids[0]
  return PackedLoader(source, slot_topics, batch_per_slot=int(cfg.train.batch_per_slot),
                      seq_len=int(cfg.dataset.seq_len), eos_id=int(tokenizer.eos_ids[0]),
                      bos_id=int(tokenizer.bos_id) if add_bos else None, pad_id=int(pad_id),
                      seed=int(cfg.seed), topic_map=topic_map)


def resolve_small_topics(counts_k: np.ndarray, centroids_kd: np.ndarray | None, min_tokens: int,
                         mode: str) -> tuple[np.ndarray, dict[str, Any]]:
  """Handles topics with fewer than `min_tokens` tokens (one batch: b*T) per `dataset.small_topics`.

  Returns `(topic_map int32 [K], report)`. Topics with enough tokens map to themselves. With
  mode="merge" a small topic maps to the nearest (squared L2 between centroids) topic that has
  enough tokens; with "skip" it maps to -1 (its documents are not trained on). The report (JSON-able)
  lists the small topics, where each went and how many topics remain.
  """
  check(mode in SMALL_TOPIC_MODES,
        f"dataset.small_topics={mode!r}: must be one of {', '.join(SMALL_TOPIC_MODES)}", ConfigError)
  counts_k = np.asarray(counts_k, np.int64)
  check(counts_k.ndim == 1 and counts_k.size > 0, f"counts_k: expected a non-empty [K] array, got "
                                                  f"shape {counts_k.shape}")
  k = counts_k.size
  small = counts_k < int(min_tokens)
  big_ids = np.flatnonzero(~small)
  if big_ids.size == 0:
    raise MixieError(f"no topic has enough tokens for one batch ({min_tokens} = batch_per_slot x "
                     f"seq_len; the largest has {int(counts_k.max())}): use more data, fewer topics, "
                     "or a smaller train.batch_per_slot / dataset.seq_len")
  topic_map = np.arange(k, dtype=np.int32)
  small_ids = np.flatnonzero(small)
  merged: list[list[int]] = []
  if small_ids.size and mode == "merge":
    check(centroids_kd is not None, "resolve_small_topics: mode='merge' needs the topic centroids")
    c = np.asarray(centroids_kd, np.float64)
    check(c.shape[0] == k, f"centroids_kd has {c.shape[0]} rows, counts_k has {k} topics")
    cs, cb = c[small_ids], c[big_ids]
    d2 = (cs * cs).sum(1)[:, None] - 2.0 * cs @ cb.T + (cb * cb).sum(1)[None, :]  # [S, B]
    nearest = big_ids[np.argmin(d2, axis=1)]
    topic_map[small_ids] = nearest
    merged = [[int(s), int(t)] for s, t in zip(small_ids, nearest)]
  elif small_ids.size:
    topic_map[small_ids] = -1
  report = {"mode": mode, "min_tokens": int(min_tokens),
            "small": [{"topic": int(t), "tokens": int(counts_k[t])} for t in small_ids],
            "merged": merged, "skipped": [int(t) for t in small_ids] if mode == "skip" else [],
            "num_topics": int(k), "num_trained_topics": int(big_ids.size),
            "tokens_dropped": int(counts_k[small_ids].sum()) if mode == "skip" else 0}
  return topic_map, report

"""The request log: one JSON line per prompt, appended by the serving API and `mixie.generate`.

Schema (version 1; `mixie.monitor` reads it), one object per line, strict JSON (no NaN):

    v              1
    time           when the request (the `generate` call) started, Unix seconds
    source         "server" (the Python API) or "generate" (the CLI)
    batch          an id shared by the prompts of one call (hex), and batch_size
    prefix_sha256  16 hex digits of sha256 over the routed prefix's token ids (int32, little endian):
                   repeated prefixes match, the text is not stored. Unsalted: it hides the prefix
                   from a reader of the log, not from one who guesses it
    mode           the routing mode ("centroid", "knn", "topk"; "none" without a router)
    routed         [[expert, weight], ...]: the router's choice (-1 = the base)
    experts        [[expert, weight], ...]: what served the prompt ([] when a fallback did)
    fallback       null, "base" or "lora_all": the fallback model that served it
    distance, margin, vote_share   the route's confidences (`mixie.route.router`; null = unknown)
    confidence, threshold          the value the fallback rule compared, and its threshold
    tokens_in, tokens_out          prompt tokens, generated tokens (stop token excluded)
    latency_ms     {"route": the call's routing (embedding, search, fallback rule),
                    "load": expert loads of the prompt's batch, "prefill": its prefill and first
                    token, "decode": the rest of its decode loop}
    error          null, or why the prompt failed

Latencies are those of the batch the prompt ran in (prompts are routed and decoded together).
Prefill and decode are two jitted calls (`mixie.serve.batched.prefill_rows`, `decode_rows`) with one
device sync between them, so that each is timed on its own. Drift needs no embedding in the log:
`distance` and `margin` place each query against the training centroids (`mixie.monitor.drift`).

Writes: each line is one `os.write` of the whole line to a file opened with O_APPEND, so several
processes may append to one local log without interleaving (POSIX appends; not on NFS or gs://). The
log is written after the batch's tokens are on the host: the decode loop is never touched. A failed
write is reported once on stderr and never fails a request.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from typing import Any, Sequence

import numpy as np

from mixie import io as mio
from mixie.errors import ConfigError, check

VERSION = 1


def log_path(config) -> str | None:
  """The request log of a config (`serve.log_path`; relative = under `workdir`), or None when off."""
  p = str(config.serve.log_path)
  if not p:
    return None
  full = p if os.path.isabs(p) else os.path.join(str(config.workdir), p)
  check("://" not in full, f"serve.log_path must resolve to a local file (appends need O_APPEND), "
        f"got {full!r}", ConfigError)
  return full


def prefix_hash(prefix_ids: Sequence[int]) -> str:
  """16 hex digits of sha256 over token ids as int32 little endian."""
  return hashlib.sha256(np.asarray(prefix_ids, "<i4").tobytes()).hexdigest()[:16]


class RequestLog:
  """Appends records to a JSON-lines file (see the module docstring)."""

  def __init__(self, path: str):
    self.path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self.failed = 0  # records that could not be written

  def append(self, records: Sequence[dict[str, Any]]) -> None:
    """Appends one line per record; each line is a single write (O_APPEND)."""
    lines = [(json.dumps(mio.json_safe(r), separators=(",", ":"), allow_nan=False) + "\n").encode()
             for r in records]
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
      self._failed(len(lines), e)
      return
    try:
      for i, line in enumerate(lines):
        if os.write(fd, line) != len(line):
          raise OSError(f"short write of a log line ({len(line)} bytes)")
    except OSError as e:
      self._failed(len(lines) - i, e)
    finally:
      os.close(fd)

  def _failed(self, n: int, err: Exception) -> None:
    if not self.failed:
      print(f"mixie: warning: request log {self.path}: {err} (requests are still served)",
            file=sys.stderr, flush=True)
    self.failed += n


def request_records(*, time_s: float, source: str, mode: str, prefixes: Sequence[Sequence[int]],
                    routed, served, below_n: np.ndarray, policy, results: Sequence,
                    token_counts: Sequence[int], route_ms: float) -> list[dict[str, Any]]:
  """One log record per prompt of a `Server.generate` call (`routed`/`served`: `RouteResult`s before
  and after the fallback rule; `results`: the call's `Result`s)."""
  batch = uuid.uuid4().hex[:12]
  conf = routed.confidence(policy.confidence)
  out = []
  for i, r in enumerate(results):
    fb = policy.fallback if below_n[i] else None
    out.append({
        "v": VERSION, "time": time_s, "source": source, "batch": batch, "batch_size": len(results),
        "prefix_sha256": prefix_hash(prefixes[i]), "mode": mode,
        "routed": [[int(e), float(w)] for e, w in zip(routed.expert_ids[i], routed.weights[i])],
        "experts": [] if fb else [[int(e), float(w)] for e, w in
                                  zip(served.expert_ids[i], served.weights[i])],
        "fallback": fb, "distance": float(routed.distance[i]), "margin": float(routed.margin[i]),
        "vote_share": float(routed.vote_share[i]), "confidence": float(conf[i]),
        "threshold": float(policy.threshold), "tokens_in": int(token_counts[i]),
        "tokens_out": len(r.tokens), "latency_ms": {"route": route_ms, **r.latency_ms},
        "error": r.error})
  return out

"""The other lifecycle operations on a run's experts, each one generation of its store (`mixie.store`):

- `retrain(config, topic)`: trains that expert again, fresh, on its topic's training documents (its
  merged small topics' included) plus the documents added to it (`mixie.lifecycle.train`); the same data
  gives the same bytes, and then no new generation;
- `retire(config, topics)` / `restore(config, topics)`: sets / clears the experts' retired flag (the
  router skips retired experts in every mode; their weights stay);
- `rollback(config, generation)`: makes an earlier generation's experts, flags and added documents
  current again, as a new generation (so a rollback can itself be rolled back);
- `list_lines` / `history_lines`: what `list` and `history` print.
"""

from __future__ import annotations

import time
from typing import Sequence

from mixie.errors import MixieError, check
from mixie.lifecycle.batches import store_batches
from mixie.lifecycle.train import finish, load_run, train_topics
from mixie.store import ExpertStore, run_store


def retrain(config, topic: int, *, loaded=None, log=print) -> int | None:
  """`retrain --topic N` (module docstring); returns the generation committed (None: unchanged)."""
  store = run_store(config.workdir)
  check(topic in store, f"{store.dir}: no expert {topic} in generation {store.generation} (list: python -m "
                        "mixie.experts list)")
  m = store.meta(topic)
  check(m.kind == "expert", f"{store.dir}: expert {topic} is of kind {m.kind!r}: only a topic's expert "
                            "can be retrained from the run's documents")
  session = f"retrain-{topic}-g{store.generation}"
  res, staging = train_topics(config, load_run(config, loaded), store, [topic], session, log=log)
  if res.status != "finished":
    log(f"mixie.experts retrain: stopped ({res.status}); rerun the same command to resume")
    return None
  added = len(store_batches(store))
  gen = staging.commit(f"retrain expert {topic} (with the documents of {added} added batch(es))")
  finish(config, session)
  log(f"mixie.experts retrain: expert {topic}: " + (f"generation {gen}" if gen is not None else
                                                     "the same bytes as before: no new generation"))
  return gen


def _flag(config, topics: Sequence[int], retire_: bool, log) -> int | None:
  store = run_store(config.workdir)
  topics = sorted({int(t) for t in topics})
  check(bool(topics), "give the expert(s): --topic N")
  missing = [t for t in topics if t not in store]
  check(not missing, f"{store.dir}: no expert(s) {missing} in generation {store.generation}")
  if retire_:
    left = set(store.topics()) - store.retired() - set(topics)
    check(bool(left), f"{store.dir}: retiring {topics} would leave no expert to route to")
  word = "retire" if retire_ else "restore"
  gen = store.commit(f"{word} expert(s) {topics}", **({"retire": topics} if retire_ else {"restore": topics}))
  log(f"mixie.experts {word}: expert(s) {topics}: " +
      (f"generation {gen}" if gen is not None else f"already {word}d: no new generation"))
  return gen


def retire(config, topics: Sequence[int], *, log=print) -> int | None:
  """`retire --topic N`: the router stops sending queries to these experts; weights kept."""
  return _flag(config, topics, True, log)


def restore(config, topics: Sequence[int], *, log=print) -> int | None:
  """`restore --topic N`: undoes `retire`."""
  return _flag(config, topics, False, log)


def rollback(config, generation: int, *, log=print) -> int | None:
  """`rollback --to GEN`: generation GEN's content made current, as a new generation."""
  store = run_store(config.workdir)
  cur = store.current_generation()
  check(0 <= generation <= cur, f"{store.dir}: no generation {generation} (0..{cur}; see python -m "
                                "mixie.experts history)")
  gen = store.commit(f"rollback to generation {generation}", start=generation)
  log(f"mixie.experts rollback: " + (f"generation {gen} = generation {generation}" if gen is not None
                                     else f"generation {cur} equals generation {generation} already"))
  return gen


def list_lines(store: ExpertStore) -> list[str]:
  """One line per expert of the store's generation: id, kind, retired, hash, size, shape, tokens,
  loss, routing."""
  gen = store.snapshot()
  lines = [f"{store.dir}: generation {gen.number} ({gen.message}), {len(gen.entries)} expert(s), "
           f"{len(gen.retired)} retired, added batches {store_batches(store) or 'none'}"]
  for t, m in store.metas().items():
    e = gen.entries[t]
    loss = "-" if m.final_loss is None else f"{m.final_loss:.4f}"
    merged = f", merged topics {list(m.merged_topics)}" if m.merged_topics else ""
    routed = "centroid" if m.centroid is not None else "no centroid"
    lines.append(f"{t:>6}  {m.kind:<8} {'RETIRED' if e.retired else 'active ':<7} "
                 f"sha256 {store.sha256(t)[:12]}  {e.bytes / 2**20:.2f} MiB  rank {m.rank} alpha {m.alpha:g} "
                 f"{','.join(m.targets)}  tokens {m.tokens_seen if m.tokens_seen is not None else '-'}  "
                 f"loss {loss}  {routed}{merged}")
  return lines


def history_lines(store: ExpertStore) -> list[str]:
  """One line per generation, oldest first; the current one marked."""
  cur = store.current_generation()
  out = []
  for g in store.history():
    when = "-" if g.time is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(g.time))
    mark = "  <- current" if g.number == cur else ""
    out.append(f"{g.number:>5}  {when}  {len(g.entries)} expert(s), {len(g.retired)} retired  "
               f"{g.message}{mark}")
  if not out:
    raise MixieError(f"{store.dir}: no generations (no experts were ever written)")
  return out

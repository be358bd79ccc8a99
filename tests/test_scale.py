"""The scale simulation (`bench/scale.py`, `configs/demo.py:scale:E`) at E = 50 and E = 500, each in its
own process: every stage runs with E experts, and the training loop's host work per expert (CPU time of
the loop's thread: store writes, scheduler and loader bookkeeping; the median over waves, relative to one
store write timed in the same run) at E = 500 stays within 1.5x of E = 50. A cost that grows faster
than E shows up here as a ratio that grows with E. Also: the synthetic corpus is deterministic and its
topics are what k-means recovers.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from configs.common import base_config
from mixie.data.corpus import load_corpus
from mixie.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)


def _synthetic(topics=6, per=3):
  c = base_config().data
  c.source, c.synthetic_topics, c.synthetic_docs_per_topic = "synthetic", topics, per
  return c


def test_synthetic_corpus_is_deterministic_with_known_topics():
  a, b = load_corpus(_synthetic()), load_corpus(_synthetic())
  assert a.ids == b.ids and a.texts == b.texts and len(a) == 18
  assert a.labels[:6] == [str(t) for t in range(6)]  # interleaved: any prefix samples every topic
  words = [set(t.split()) for t in a.texts]
  same = np.mean([len(words[i] & words[i + 6]) for i in range(12)])  # same topic, other document
  other = np.mean([len(words[i] & words[i + 1]) for i in range(5)])  # neighbouring topics
  assert same > 3 * max(other, 1.0)


def test_synthetic_bad_setting_names_the_field():
  c = _synthetic()
  c.synthetic_topic_share = 1.5
  with pytest.raises(ConfigError, match="data.synthetic_topic_share"):
    load_corpus(c)


def test_scale_500_per_expert_host_work_stays_flat(tmp_path):
  r50, r500 = (scale.run_subprocess(e, str(tmp_path / f"E{e}"), timeout=1500) for e in (50, 500))
  for e, r in ((50, r50), (500, r500)):
    assert r["topics"]["k"] == e and r["topics"]["nmi"] > 0.95  # k-means recovered the E topics
    assert r["train"]["experts"] == r["store"]["experts"] == r["router"]["experts_in_router"] == e
    assert r["train"]["waves"] >= e // r["train"]["slots"]
    assert r["evaluate"]["routing_accuracy"]["centroid"] > 0.8
    assert r["serve"]["answered"] == r["serve"]["prompts"] > 0
  assert r500["serve"]["evictions"] > 0  # 16 cache slots, far more experts: churn
  # the median over waves (a load spike from elsewhere on the machine moves a wave, not the median), as a
  # multiple of one store write measured in the same run (a machine busier in one run than the other)
  key = "host_cpu_per_expert_vs_calibration"
  assert r500["train"][key] <= 1.5 * r50["train"][key], (r50["train"], r500["train"])


def test_table_and_plot_show_the_largest_topics_only():
  """With thousands of topics the table and the figure show the 12 with the most documents."""
  from mixie.evaluate.plots import SHOWN_TOPICS, plot_perplexity, shown_topics
  from mixie.evaluate.tables import format_table

  k, rows = 40, ["base", "centroid"]
  docs = {str(t): 1 + (t * 7) % 13 for t in range(k)}
  tab = {"docs_per_topic": docs, "tokens_per_topic": {t: 10 * n for t, n in docs.items()}, "tokens": 1000,
         "ppl": {r: 10.0 for r in rows}, "routing_accuracy": {"base": None, "centroid": 0.5},
         "ppl_per_topic": {r: {str(t): 10.0 + t for t in range(k)} for r in rows}}
  res = {"topics": list(range(k)), "prefix_tokens": [8], "rows": rows, "docs": sum(docs.values()),
         "by_prefix": {"8": tab}}
  shown = shown_topics(res)
  assert len(shown) == SHOWN_TOPICS and shown == sorted(shown, key=int)
  assert min(docs[t] for t in shown) >= max(docs[t] for t in docs if t not in shown)
  text = format_table(res)
  assert f"the {SHOWN_TOPICS} of {k} topics" in text
  head = next(l for l in text.splitlines() if l.startswith("P=8")).split()
  assert [head[i + 1] for i, w in enumerate(head) if w == "topic"] == shown
  fig = plot_perplexity(res)
  bars = [p for ax in fig.axes for p in ax.patches]
  assert len(bars) == len(rows) * (1 + SHOWN_TOPICS)  # "all" and the shown topics, one bar per row

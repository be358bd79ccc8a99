"""`mixie.analysis` (and the evaluation's figures, `mixie.evaluate.plots`): loaders agree with what the
stages wrote and with independent computations (scikit-learn, the expert store, the evaluator's own
accuracy), routes computed here equal the evaluator's, summaries find planted structure, and every
figure is drawn (also for many topics and for missing inputs)."""

import ast
import json

import numpy as np
import pytest

from mixie import figures
from mixie import io as mio
from mixie.analysis import loaders, plots, summaries
from mixie.errors import MixieError
from mixie.evaluate import plots as eval_plots
from mixie.store import ExpertStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_config(tiny_run):
  from configs.demo import get_config

  c = get_config("tiny")
  c.workdir = str(tiny_run["workdir"])
  for k, v in tiny_run["overrides"].items():
    sec, field = k.split(".")
    c[sec][field] = ast.literal_eval(v) if isinstance(v, str) and v[:1] in "([" else v
  return c


# --- topics ---------------------------------------------------------------------------------------------


def test_topics_and_label_agreement_match_the_cluster_stage(tiny_run):
  from sklearn.metrics.cluster import contingency_matrix

  wd = tiny_run["workdir"]
  t = loaders.load_topics_data(wd)
  assert t["num_topics"] == 4 and t["emb_nd"].shape[0] == t["doc_ids"].shape[0] == t["topic_n"].shape[0]
  train = ~t["heldout_n"]
  np.testing.assert_array_equal(np.bincount(t["topic_n"][train], minlength=4), t["sizes_k"])
  ag = summaries.label_agreement(t)
  q = mio.read_json(wd / "topics" / "quality.json")
  assert ag["nmi"] == pytest.approx(q["nmi"], abs=1e-12) and ag["ari"] == pytest.approx(q["ari"], abs=1e-12)
  assert ag["n"] == int(train.sum())
  ref = contingency_matrix(t["topic_n"][train], t["label_n"][train])  # present classes only
  present = np.unique(t["label_n"][train])
  np.testing.assert_array_equal(ag["contingency_kl"][:, present], ref)
  assert ag["contingency_kl"].sum() == ag["n"] and len(ag["label_names"]) == ag["contingency_kl"].shape[1]


def test_texts_are_the_documents_of_the_topics(tiny_run):
  from mixie.data.corpus import doc_id, normalize_text

  t = loaders.load_topics_data(tiny_run["workdir"])
  tx = loaders.load_texts(tiny_run["workdir"])
  assert len(tx["texts"]) == len(tx["titles"]) == t["doc_ids"].size
  assert [doc_id(normalize_text(s)) for s in tx["texts"]] == t["doc_ids"].tolist()  # ids are text hashes
  assert all(tx["titles"])


def _planted():
  """Two topics of synthetic documents, each with its own planted words, and a clean 2-D embedding."""
  rng = np.random.default_rng(0)
  common = ["river", "people", "history", "music", "science", "water", "city", "game", "north", "plant"]
  planted = {0: ["volcano", "magma", "eruption"], 1: ["violin", "sonata", "orchestra"]}
  texts, titles, topic, emb = [], [], [], []
  for i in range(80):
    k = i % 2
    words = list(rng.choice(common, 12)) + list(rng.choice(planted[k], 3))
    texts.append(" ".join(rng.permutation(words)))
    titles.append(f"doc{i}")
    topic.append(k)
    emb.append(np.eye(2)[k] + 0.01 * (i // 2) * np.array([k, 1 - k]))  # doc 2j + k drifts from its axis
  emb = np.asarray(emb, np.float32)
  return {"workdir": "planted", "num_topics": 2, "metric": "l2", "topic_n": np.asarray(topic),
          "heldout_n": np.zeros(80, bool), "emb_nd": emb, "centroids_kd": np.eye(2, dtype=np.float32),
          "sizes_k": np.asarray([40, 40])}, {"texts": texts, "titles": titles}, planted


def test_top_terms_find_planted_words_and_titles_nearest_the_centroid():
  topics, texts, planted = _planted()
  terms = summaries.top_terms(topics, texts, n_terms=3, n_titles=2)
  for k in (0, 1):
    assert {w for w, _ in terms[k]["terms"]} == set(planted[k])
    assert terms[k]["titles"] == [f"doc{k}", f"doc{2 + k}"]  # the least drifted documents
    assert terms[k]["size"] == 40
  assert "volcano" in summaries.format_top_terms(terms)


# --- training curves ------------------------------------------------------------------------------------


def test_training_curves_match_metrics_jsonl_and_the_store(tiny_run):
  wd = tiny_run["workdir"]
  m = loaders.load_metrics(wd)
  assert list(m) == ["experts"]
  lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  store = ExpertStore(wd / "experts")
  assert sorted(m["experts"]) == store.topics()
  for topic, c in m["experts"].items():
    recs = [(l["step"], e) for l in lines for e in l["experts"] if e["topic"] == topic]
    np.testing.assert_array_equal(c["step"], [s for s, _ in recs])
    np.testing.assert_array_equal(c["loss"], [e["loss"] for _, e in recs])
    meta = store.meta(topic)
    assert c["tokens"][-1] == meta.tokens_seen and c["loss"][-1] == pytest.approx(meta.final_loss)


def test_metrics_skip_a_line_cut_by_a_kill(tmp_path):
  rec = {"mode": "lora_all", "step": 1, "experts": [{"topic": 0, "loss": 2.0, "tokens": 8, "lr": 0.1}]}
  (tmp_path / "metrics.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "step": 2})[:20])
  m = loaders.load_metrics(tmp_path)
  assert list(m) == ["lora_all"] and m["lora_all"][0]["step"].tolist() == [1]
  assert loaders.load_metrics(tmp_path / "nothing") is None


# --- perplexity and routes ------------------------------------------------------------------------------


def test_perplexity_tables_are_results_json_and_drawn_as_the_evaluation_drew_them(tiny_run, tmp_path):
  wd = tiny_run["workdir"]
  ppl = loaders.load_perplexity(wd)
  res = mio.read_json(wd / "eval" / "results.json")
  assert ppl == {**res, "source": str(wd / "eval" / "results.json")} and ppl["prefix_tokens"] == [4, 8]
  assert eval_plots.routed_rows(ppl) == ["centroid", "knn", "topk"] and "oracle" in ppl["rows"]
  assert loaders.load_perplexity(tmp_path / "nothing") is None
  eval_plots.plot_perplexity(ppl, save_dir=tmp_path)  # the notebook's figure is the evaluation's file
  eval_plots.plot_prefix_effect(ppl, save_dir=tmp_path)
  for name in ("perplexity.png", "prefix_effect.png"):
    assert (tmp_path / name).read_bytes() == (wd / "eval" / name).read_bytes()


def test_routes_equal_the_evaluators_and_computed_ones(tiny_run):
  wd = tiny_run["workdir"]
  res = mio.read_json(wd / "eval" / "results.json")
  for p in (4, 8):
    for mode in ("centroid", "knn", "topk"):
      r = loaders.load_routes(wd, prefix=p, mode=mode)
      assert r["source"].endswith("per_doc.npz")
      c = eval_plots.routing_confusion(r)
      assert c["accuracy"] == pytest.approx(res["by_prefix"][str(p)]["routing_accuracy"][mode], abs=1e-12)
      assert c["counts_oo"].sum() == res["docs"]
      assert np.trace(c["counts_oo"]) == round(c["accuracy"] * res["docs"])
  # the same routes computed here, from the work directory (min tokens P + 1 = 9: the evaluator's set)
  config = _run_config(tiny_run)
  for mode in ("centroid", "knn"):
    ev = loaders.load_routes(wd, prefix=8, mode=mode)
    mine = loaders.compute_routes(wd, prefix=8, mode=mode, config=config)
    assert mine["doc_ids"].tolist() == ev["doc_ids"].tolist()
    np.testing.assert_array_equal(mine["own_n"], ev["own_n"])
    np.testing.assert_array_equal(mine["routed_n"], ev["routed_n"])
  with pytest.raises(MixieError, match="prefix 5 was not evaluated"):
    loaders.load_routes(wd, prefix=5)


def test_routes_are_computed_when_there_is_no_evaluation(tiny_run, tmp_path):
  import shutil

  wd = tmp_path / "w"
  for sub in ("topics", "dataset", "experts"):
    shutil.copytree(tiny_run["workdir"] / sub, wd / sub)
  assert loaders.load_routes(wd, compute_missing=False) is None
  config = _run_config(tiny_run)
  config.route.route_tokens = 8
  r = loaders.load_routes(wd, mode="centroid", config=config)
  ev = loaders.load_routes(tiny_run["workdir"], prefix=8, mode="centroid")
  assert r["source"] == "computed" and r["prefix"] == 8
  np.testing.assert_array_equal(r["routed_n"], ev["routed_n"])


# --- figures --------------------------------------------------------------------------------------------


def _many_topics(K=50, L=6, n=3000):
  rng = np.random.default_rng(1)
  topic = rng.integers(0, K, n)
  return {"workdir": "many", "num_topics": K, "metric": "cosine", "topic_n": topic,
          "heldout_n": rng.random(n) < 0.05, "sizes_k": np.bincount(topic, minlength=K),
          "emb_nd": rng.normal(size=(n, 8)).astype(np.float32), "centroids_kd": rng.normal(size=(K, 8)),
          "label_n": rng.integers(0, L, n), "label_names": [f"label {i}" for i in range(L)], "quality": {}}


def test_every_figure_is_drawn_and_saved_for_many_topics_and_missing_inputs(tmp_path):
  t = _many_topics()
  out = tmp_path / "figs"
  plots.plot_topic_sizes(t, save_dir=out)
  plots.plot_topic_map(t, max_points=500, save_dir=out)
  plots.plot_label_agreement(summaries.label_agreement(t), save_dir=out)
  terms = [{"topic": k, "size": int(t["sizes_k"][k]), "terms": [("w", 0.1)], "titles": ["a title"]}
           for k in range(t["num_topics"])]
  plots.plot_top_terms(terms, save_dir=out)
  curves = {"experts": {k: {"step": np.arange(5), "tokens": 64 * np.arange(1, 6),
                            "loss": np.linspace(3, 2, 5), "lr": np.full(5, 1e-3), "grad_norm": np.ones(5)}
                        for k in range(30)}}
  plots.plot_training_curves(curves, save_dir=out)
  rng = np.random.default_rng(2)
  own = rng.integers(-1, 50, 400)
  routes = {"prefix": 32, "mode": "centroid", "own_n": own,
            "routed_n": np.where(rng.random(400) < 0.7, own, rng.integers(0, 50, 400))}
  eval_plots.plot_routing_confusion(routes, save_dir=out)
  drawn = [k for k in figures.FIGURE_NAMES if k not in ("plot_perplexity", "plot_prefix_effect")]
  assert sorted(p.name for p in out.iterdir()) == sorted(f"{figures.FIGURE_NAMES[k]}.png" for k in drawn)
  for p in out.iterdir():
    assert p.read_bytes().startswith(PNG_MAGIC)
  # a missing input draws a message instead of failing
  empty = tmp_path / "empty"
  for f in (plots.plot_label_agreement, plots.plot_training_curves, eval_plots.plot_perplexity,
            eval_plots.plot_routing_confusion, eval_plots.plot_prefix_effect):
    f(None, save_dir=empty)
  assert len(list(empty.iterdir())) == 5
  assert figures.figure_dir("gs://b/w/") == "gs://b/w/figures" and figures.figure_dir("w", "f") == "f"


def test_missing_topics_is_one_clear_error(tmp_path):
  with pytest.raises(MixieError, match="no complete topics"):
    loaders.load_topics_data(tmp_path)
  with pytest.raises(MixieError, match="method must be 'pca' or 'umap'"):
    summaries.project_2d(np.zeros((3, 2)), "tsne")

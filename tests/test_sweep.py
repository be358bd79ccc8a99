"""Sweeps (`mixie.sweep`): a two-point sweep end to end that resumes after a SIGKILL without redoing its
finished point, evaluation-only points, adopting hand-made work directories, refusing changed points,
the keys that decide sharing, and the shipped sweep configs."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs.sweeps import tiny as tiny_sweep_config
from conftest import file_snapshot
from mixie.cluster import topics
from mixie.errors import ConfigError, MixieError
from mixie.store import ExpertStore
from mixie.sweep import report, runner, spec
from mixie.train.main import wide_lora

PNG = b"\x89PNG\r\n\x1a\n"


def _sweep(sd, hf, points=None):
  """The tiny sweep in `sd`, laid out on this process's 8 test devices (the layout is no part of a key)."""
  s = tiny_sweep_config.get_config()
  s.workdir = str(sd)
  s.base.model.path = str(hf)
  s.base.mesh.shape = (4, 2, 1)
  if points is not None:
    s.points = tuple(points)
  return s


def _copy(tiny_sweep, tmp_path):
  dst = tmp_path / "sweep"
  shutil.copytree(tiny_sweep["dir"], dst, symlinks=True)
  return dst


@pytest.mark.slow
def test_two_point_sweep_resumes_after_sigkill_without_redoing_the_finished_point(tiny_sweep):
  sd = tiny_sweep["dir"]
  before, after = tiny_sweep["before"], tiny_sweep["after"]
  assert any(k.startswith("points/scratch/experts/") for k in before)
  assert any(k.startswith("shared/data-") and k.endswith("manifest.json") for k in before)
  assert after == before  # the finished point and the shared data: every file untouched (bytes, mtime)
  assert "point 'scratch' is done" in tiny_sweep["resumed_output"]
  assert "mixie.train[experts]" not in tiny_sweep["resumed_output"].split("point 'seed'")[0]
  for name in ("scratch", "seed"):
    d = sd / "points" / name
    assert (d / "done.json").exists() and (d / "trained.json").exists()
    assert os.readlink(d / "topics") == os.readlink(sd / "points" / "scratch" / "topics")  # one shared dataset
  seeds = list((sd / "shared").glob("seed-*"))
  assert len(seeds) == 1 and ExpertStore(seeds[0]).topics() == [0]
  meta = ExpertStore(sd / "points" / "seed" / "experts").meta(0)
  assert meta.extra["init"] == "seed" and meta.extra["seed"]["dir"] == str(seeds[0])
  wide = ExpertStore(sd / "points" / "scratch" / "lora_all_wide").meta(0)
  assert (wide.rank, wide.alpha) == (4 * 8, 4 * 16.0)  # E·r for E = 4 trained experts, same scale
  # the combined table: every row of both points at both P, each with its training tokens and FLOPs
  table = report.load_table(sd)
  rows = {(r["point"], r["prefix"], r["row"]): r for r in table["rows"]}
  want = {"scratch": ["base", "lora_all", "lora_all_wide", "full", "centroid", "oracle"],
          "seed": ["base", "centroid", "oracle"]}
  assert sorted(rows) == sorted((p, P, r) for p, rs in want.items() for P in (4, 8) for r in rs)
  for (p, P, r), row in rows.items():
    assert row["tokens"] is not None and row["flops"] is not None and np.isfinite(row["ppl"])
    assert (row["tokens"] > 0) == (r != "base") and row["x"] == p
  md = (sd / "reports" / "tiny" / "table.md").read_text()
  assert "| scratch | init=scratch | scratch | 8 |" in md and "| seed | 8 | centroid |" in md
  for name in ("ppl_vs_tokens", "ppl_vs_flops", "ppl_vs_init", "ppl_vs_prefix", "routing_vs_prefix"):
    assert (sd / "reports" / "tiny" / f"{name}.png").read_bytes().startswith(PNG)
  found = json.loads((sd / "reports" / "tiny" / "findings.json").read_text())
  scratch = next(r for r in found["points"] if r["point"] == "scratch")
  assert found["prefix"] == 8 and scratch["vs_lora_all"] == pytest.approx(
      rows[("scratch", 8, "centroid")]["ppl"] / rows[("scratch", 8, "lora_all")]["ppl"] - 1)
  lo, hi = scratch["vs_lora_all_ci"]  # a paired bootstrap over the documents, around the gap itself
  assert lo <= scratch["vs_lora_all"] <= hi and lo < hi
  assert rows[("scratch", 8, "lora_all")]["vs_lora_all_ci"] is None and rows[("seed", 8, "centroid")]["vs_lora_all_ci"] is None
  assert "## Findings at P = 8" in md


@pytest.mark.slow
def test_evaluation_only_points_reuse_the_trained_point(tiny_sweep, tmp_path):
  sd = _copy(tiny_sweep, tmp_path)
  scratch = dict(tiny_sweep_config.get_config().points)["scratch"]
  before = file_snapshot(sd / "points" / "scratch")
  s = _sweep(sd, tiny_sweep["hf"], [("scratch", scratch), ("scratch_p4", {**scratch, "eval.prefix_tokens": (4,)}),
                                    ("scratch_again", scratch)])
  s.name = "evalonly"
  assert runner.run_sweep(s)["status"] == "finished"
  assert file_snapshot(sd / "points" / "scratch") == before
  p4, again = sd / "points" / "scratch_p4", sd / "points" / "scratch_again"
  for sub in ("experts", "lora_all", "lora_all_wide", "full"):
    assert os.readlink(p4 / sub) == f"../scratch/{sub}"
  assert not (p4 / "checkpoints").exists() and not (p4 / "eval").is_symlink()
  assert os.readlink(again / "eval") == "../scratch/eval"  # the same config: nothing evaluated again
  assert json.loads((p4 / "point.json").read_text())["owner"] == "scratch"
  got = json.loads((p4 / "eval" / "results.json").read_text())
  ref = json.loads((sd / "points" / "scratch" / "eval" / "results.json").read_text())
  assert got["prefix_tokens"] == [4] and got["compute"] == ref["compute"]
  for row in ref["rows"]:
    assert got["by_prefix"]["4"]["ppl"][row] == pytest.approx(ref["by_prefix"]["4"]["ppl"][row], rel=1e-5)


@pytest.mark.slow
def test_adopting_a_hand_made_sweep_layout(tiny_sweep, tmp_path):
  """The presweep's shape: shared/{topics,dataset}, points/<name>/ with absolute links and no point.json."""
  sd = _copy(tiny_sweep, tmp_path)
  data = next((sd / "shared").glob("data-*"))
  for sub in ("topics", "dataset"):
    os.rename(data / sub, sd / "shared" / sub)
  data.rmdir()
  wd = sd / "points" / "scratch"
  for f in ("point.json", "done.json", "trained.json"):
    (wd / f).unlink()
  for sub in ("topics", "dataset"):
    (wd / sub).unlink()
    os.symlink(sd / "shared" / sub, wd / sub)
  shutil.rmtree(sd / "points" / "seed")
  experts = file_snapshot(wd / "experts")
  s = _sweep(sd, tiny_sweep["hf"], [("scratch", dict(tiny_sweep_config.get_config().points)["scratch"])])
  with pytest.raises(ConfigError, match="--adopt"):
    runner.run_sweep(s)
  assert runner.run_sweep(s, adopt=True)["status"] == "finished"
  assert (data / "topics" / "done" / "dataset.json").exists() and not (sd / "shared" / "topics").exists()
  assert os.readlink(wd / "topics") == f"../../shared/{data.name}/topics"
  assert file_snapshot(wd / "experts") == experts  # trusted as they are, not trained again
  assert (wd / "done.json").exists() and json.loads((wd / "point.json").read_text())["owner"] is None


def test_only_runs_the_named_points_and_refuses_unknown_names(tiny_sweep, tmp_path):
  sd = _copy(tiny_sweep, tmp_path)
  scratch = dict(tiny_sweep_config.get_config().points)["scratch"]
  s = _sweep(sd, tiny_sweep["hf"], [("scratch", scratch), ("scratch_p4", {**scratch, "eval.prefix_tokens": (4,)})])
  with pytest.raises(ConfigError, match=r"no point\(s\) \['nope'\]"):
    runner.run_sweep(s, only=["nope"])
  before = file_snapshot(sd / "points")
  assert runner.run_sweep(s, only=["scratch"])["status"] == "finished"  # finished: nothing to do
  assert not (sd / "points" / "scratch_p4").exists()  # not named: not started
  assert file_snapshot(sd / "points") == before


def test_a_point_whose_settings_changed_is_refused(tiny_sweep, tmp_path):
  sd = _copy(tiny_sweep, tmp_path)
  s = _sweep(sd, tiny_sweep["hf"], [("seed", {"train.init": "seed", "train.baselines": (),
                                              "train.tokens_per_expert": 1024})])
  with pytest.raises(ConfigError, match="train.tokens_per_expert=512 there, 1024 now"):
    runner.run_sweep(s)


@pytest.mark.slow
def test_a_baseline_added_to_a_finished_point_trains_only_that_baseline(tiny_sweep, tmp_path):
  """The seed point (no baselines) with lora_all added: its experts, its seed and the shared data stay
  byte for byte, only lora_all trains, and the point is evaluated again with the new row."""
  sd = _copy(tiny_sweep, tmp_path)
  seed = dict(tiny_sweep_config.get_config().points)["seed"]
  wd = sd / "points" / "seed"
  keep = {**file_snapshot(wd / "experts"), **{f"shared/{k}": v for k, v in file_snapshot(sd / "shared").items()}}
  s = _sweep(sd, tiny_sweep["hf"], [("seed", {**seed, "train.baselines": ("lora_all",)})])
  logs = []
  assert runner.run_sweep(s, log=logs.append)["status"] == "finished"
  assert {**file_snapshot(wd / "experts"),
          **{f"shared/{k}": v for k, v in file_snapshot(sd / "shared").items()}} == keep
  assert any("baselines ['lora_all'] added" in line for line in logs)
  assert ExpertStore(wd / "lora_all").topics() == [0]
  got = json.loads((wd / "eval" / "results.json").read_text())
  assert "lora_all" in got["rows"] and got["compute"]["lora_all"]["tokens"] > 0
  assert json.loads((wd / "point.json").read_text())["settings"]["train.baselines"] == ["lora_all"]


def test_findings_gaps_crossover_equal_flops_and_seed():
  """The findings of a hand-made table: gaps at equal tokens, against lora_all's curve at equal FLOPs,
  against the oracle; the smallest winning budget; the seed-branched point against its scratch twin."""
  from mixie.sweep import findings as fnd

  def rows(point, n, init, **ppl):
    flops = {"lora_all": 1.0 * n, "centroid": 1.01 * n, "oracle": 1.01 * n, "base": 0, "full": 1.5 * n}
    return [{"point": point, "prefix": 16, "row": r, "ppl": v, "tokens_per_expert": n, "init": init, "k": 6,
             "rank": 8, "seed_fraction": 0.5, "flops": flops[r], "tokens": 6 * n,
             "routing_accuracy": 0.9 if r == "centroid" else None} for r, v in ppl.items()]
  table = {"rows": rows("a", 100, "scratch", base=20.0, lora_all=10.0, centroid=11.0, oracle=10.9, full=9.0)
           + rows("b", 1000, "scratch", base=20.0, lora_all=8.0, centroid=7.8, oracle=7.7, full=7.0)
           + rows("b_seed", 1000, "seed", base=20.0, centroid=7.6, oracle=7.5)}
  f = fnd.findings(table)
  a, b, b_seed = f["points"]
  assert a["vs_lora_all"] == pytest.approx(0.1) and a["vs_oracle"] == pytest.approx(11 / 10.9 - 1)
  assert a["vs_full"] == pytest.approx(11 / 9 - 1) and b["vs_full"] == pytest.approx(7.8 / 7 - 1)
  # lora_all's log-log curve at the routed row's FLOPs (1.01 x 100): a little below 10
  at = np.exp(np.interp(np.log(101.0), np.log([100.0, 1000.0]), np.log([10.0, 8.0])))
  assert a["vs_lora_all_flops"] == pytest.approx(11 / at - 1)
  assert b["vs_lora_all_flops"] is None  # 1010 FLOPs lie past the curve's end
  assert a["vs_full_flops"] is None  # full's curve starts at 150 FLOPs, past the routed row's 101
  at = np.exp(np.interp(np.log(1010.0), np.log([150.0, 1500.0]), np.log([9.0, 7.0])))
  assert b["vs_full_flops"] == pytest.approx(7.8 / at - 1)
  assert f["crossover"] == 1000 and f["compass"]["routed_le_098_lora_all"]  # 7.8 / 8 = 0.975
  assert f["compass"]["routed_within_2pct_of_oracle"] and f["seed"] == {"b_seed": pytest.approx(7.6 / 7.8 - 1)}
  assert "crossover (routed no worse than lora_all at equal tokens): 1000 tokens per expert" in fnd.markdown(f)
  # lora_all's tokens for the routed ppl, on its log-log curve (600, 10) -> (6000, 8): 11 lies above it,
  # 7.8 below it; 9 inside
  assert a["lora_all_equivalent_tokens"] is None and b["lora_all_equivalent_tokens"] is None
  table["rows"] += rows("c", 300, "scratch", lora_all=9.5, centroid=9.0, oracle=9.0)
  c = next(r for r in fnd.findings(table)["points"] if r["point"] == "c")
  want = np.exp(np.interp(np.log(9.0), np.log([8.0, 9.5]), np.log([6000.0, 1800.0])))
  assert c["lora_all_equivalent_tokens"] == pytest.approx(want) and c["token_efficiency"] == pytest.approx(want / 1800)
  assert fnd._tokens_for([(1.0, 5.0), (2.0, 6.0)], 5.5) is None  # a curve that rises: no answer


def test_paired_gap_interval():
  """The bootstrap interval of a perplexity ratio: a point where every document has the same ratio,
  the percentiles of an independent resampling loop otherwise, and wider on fewer documents."""
  rng = np.random.default_rng(3)
  tok = rng.integers(20, 200, 50).astype(float)
  nll_b = tok * rng.uniform(2.0, 3.0, 50)
  same = report.paired_gap_ci(nll_b + 0.05 * tok, tok, nll_b, tok)
  assert same == pytest.approx([np.expm1(0.05)] * 2)
  nll_a = nll_b + tok * rng.normal(0.05, 0.1, 50)
  lo, hi = report.paired_gap_ci(nll_a, tok, nll_b, tok, samples=500, seed=7)
  draws = np.random.default_rng(7).integers(0, 50, size=(500, 50))
  ratios = [np.exp(nll_a[i].sum() / tok[i].sum() - nll_b[i].sum() / tok[i].sum()) - 1 for i in draws]
  assert (lo, hi) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])))
  point = np.exp(nll_a.sum() / tok.sum() - nll_b.sum() / tok.sum()) - 1
  assert lo < point < hi
  lo10, hi10 = report.paired_gap_ci(nll_a[:10], tok[:10], nll_b[:10], tok[:10], samples=500, seed=7)
  assert hi10 - lo10 > hi - lo


def test_grown_settings_are_only_more_baselines_and_new_neutral_fields():
  have = {"train.baselines": ["lora_all"], "train.lr": 3e-3}
  assert spec.grown(have, {**have, "train.full_lr": 0.0}) == "train.full_lr=0.0 is new"
  assert spec.grown(have, {**have, "train.baselines": ["lora_all", "full"]}) == "baselines ['full'] added"
  assert spec.grown(have, {**have, "train.full_lr": 1e-4}) is None  # a new field that does something
  both = spec.grown(have, {**have, "train.baselines": ["lora_all", "full"], "train.full_lr": 1e-4})
  assert both == "baselines ['full'] added, train.full_lr=0.0001 (for the new full run)"
  assert spec.grown(have, {**have, "train.baselines": []}) is None  # fewer baselines
  assert spec.grown(have, {**have, "train.lr": 1e-3}) is None
  assert spec.grown({**have, "train.x": 0}, have) is None  # a field gone


def test_lora_all_wide_has_rank_e_r_or_the_cap_and_equals_the_base_when_b_is_zero():
  from mixie.model.llama import forward
  from mixie.model.lora import init_expert
  from train_utils import TINY, tiny_base

  c = tiny_sweep_config.get_config().base
  assert (wide_lora(c, 6).rank, wide_lora(c, 6).alpha, wide_lora(c, 6).scale) == (48, 96.0, 2.0)
  c.train.wide_rank_cap = 20
  assert wide_lora(c, 6).rank == 20 and wide_lora(c, 2).rank == 16
  wide = wide_lora(c, 6)
  expert = init_expert(TINY, wide, jax.random.PRNGKey(1))
  assert expert["q"]["a"].shape[-1] == 20 and float(np.abs(expert["q"]["a"]).sum()) > 0
  base = tiny_base()
  tok = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, TINY.vocab_size)
  got = forward(base, expert, tok, TINY, lora_scale=wide.scale)[0]
  assert np.array_equal(np.asarray(got), np.asarray(forward(base, None, tok, TINY)[0]))


def test_points_and_keys():
  s = tiny_sweep_config.get_config()
  s.points = (("a", {"train.tokens_per_expert": 1024}), ("b", {"eval.prefix_tokens": (8,)}),
              ("c", {"cluster.k": 3}), ("d", {"train.lr": 1e-3}))
  a, b, c, d = (p.config for p in spec.points_of(s))
  assert spec.data_key(a) == spec.data_key(b) == spec.data_key(d) != spec.data_key(c)
  assert spec.train_key(b) == spec.train_key(s.base) != spec.train_key(a)
  assert spec.eval_key(b) != spec.eval_key(s.base)
  a.train.checkpoint_every = 999  # bookkeeping changes nothing
  assert spec.train_key(a) == spec.train_key(spec.points_of(s)[0].config)
  s.points = (("a", {"train.no_such_field": 1}),)
  with pytest.raises(ConfigError, match="sweep point 'a': unknown config field 'train.no_such_field'"):
    spec.points_of(s)
  s.points = (("a", {}), ("a", {}))
  with pytest.raises(ConfigError, match="must be unique"):
    spec.points_of(s)
  s.points = (("a", {"train.slots": "six"}),)
  with pytest.raises(ConfigError, match="sweep point 'a': train.slots='six'"):
    spec.points_of(s)


@pytest.mark.parametrize("name", ["tokens", "k", "rank", "prefix", "init", "lr", "batch"])
@pytest.mark.parametrize("variant", ["", "stdlib", "accel", "tinyllama", "accel,stdlib"])
def test_shipped_sweeps_are_valid_and_share_their_middle_point(name, variant, monkeypatch):
  import importlib

  s = importlib.import_module(f"configs.sweeps.{name}").get_config(variant)
  devices = jax.devices() if "accel" in s.workdir or "tinyllama" in s.workdir else jax.devices()[:1]
  if "tinyllama" in variant:  # its base is a placeholder path: the input check names it, in the first seconds
    with pytest.raises(MixieError, match="YOUR_BUCKET.*not found"):
      runner.validate(s, devices)
    monkeypatch.setattr(topics, "check_run_inputs", lambda config: None)  # the rest of each config
  points = runner.validate(s, devices)  # every point's config, before any work
  tokens = importlib.import_module("configs.sweeps.tokens").get_config(variant)
  assert s.workdir == tokens.workdir  # one sweep directory per variant
  mid = {p.name: p for p in spec.points_of(tokens)}
  for p in points:  # a point of the same name is the same run in every sweep of the variant
    if p.name in mid:
      assert spec.train_key(p.config) == spec.train_key(mid[p.name].config)
  if name == "prefix":
    (p,) = points
    assert tuple(p.config.eval.prefix_tokens) == (8, 16, 32, 64)
    assert any(spec.train_key(p.config) == spec.train_key(q.config) for q in mid.values())
  if name == "tokens":
    n = [p.config.train.tokens_per_expert for p in points if p.config.train.init == "scratch"]
    assert len(n) >= 4 and n[-1] >= 32768 and n == sorted(n)

"""Scope ``damage`` (onnxprune/plan/damage.py): a budget spent where the measured
output damage per MAC saved is lowest.

(a) the damage of outputs, by hand: centred logits, dense outputs, non-finite;
(b) the greedy search on made-up damage functions (a fake ``measure``): it avoids
    a sensitive group, re-measures after a step (interactions), trims the last
    step to the budget, keeps round_to widths and whole heads, never empties a group;
(c) on a real small CNN with channels planted dead, it removes exactly the dead
    channels at a budget they meet, where the uniform isomorphic plan removes live
    ones; through the CLI the run says what it measured and the plan file replays it.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.errors import UserError
from onnxprune.pipeline import Job
from onnxprune.plan import Ratios
from onnxprune.plan import damage as D
from onnxprune import runtime


# ------------------------------------------------------------------ (a) output damage


def test_logits_are_compared_centred_per_sample():
    z = np.array([[1.0, 2.0, 4.0], [0.0, -1.0, 3.0]], np.float32)
    assert D.output_damage([z], [z + np.array([[5.0], [-2.0]], np.float32)]) == pytest.approx(0.0, abs=1e-12)
    g = z.copy()
    g[0, 2] += 1.0
    zc = z - z.mean(1, keepdims=True)
    gc = g - g.mean(1, keepdims=True)
    want = ((gc - zc) ** 2).sum() / (zc**2).sum()  # sample 0 moves by (-1/3, -1/3, 2/3)
    assert D.output_damage([z], [g]) == pytest.approx(want, rel=1e-9)
    assert want == pytest.approx((1 / 9 + 1 / 9 + 4 / 9) / (zc**2).sum(), rel=1e-9)


def test_dense_outputs_are_compared_by_relative_squared_error_over_all_outputs():
    a, b = np.ones((2, 3, 4), np.float32), np.full((2, 5), 2.0, np.float32)
    a2, b2 = a.copy(), b.copy()
    a2[0, 0, 0] = 3.0  # error 4
    b2[1, 1] = 0.0  # error 4
    assert D.output_damage([a, b], [a2, b2]) == pytest.approx(8 / (24 + 40))
    assert D.output_damage([a, np.array([1, 2], np.int64)], [a, np.array([9, 9], np.int64)]) == 0.0  # ints ignored


def test_non_finite_outputs_are_infinitely_far():
    z = np.zeros((2, 4), np.float32)
    bad = z.copy()
    bad[1, 2] = np.nan
    assert math.isinf(D.output_damage([z + 1], [bad]))


# ------------------------------------------------------------------ (b) the search


def _groups(*spec):
    return [SimpleNamespace(id=i, width=w, kind=k, set_name=f"s{i}") for i, (w, k) in enumerate(spec)]


def _linear_estimate(groups, per_channel):
    total = sum(g.width * per_channel[g.id] for g in groups)

    def estimate(keep):
        removed = sum((g.width - len(keep[g.id])) * per_channel[g.id] for g in groups if g.id in keep)
        return {"macs": total - removed}
    return estimate, total


def test_the_budget_goes_to_the_group_whose_removal_hurts_least():
    gs = _groups((16, "channels"), (16, "channels"))
    est, total = _linear_estimate(gs, {0: 1.0, 1: 1.0})
    weight = {0: 100.0, 1: 1.0}  # group 0 is 100x as sensitive

    def measure(keep):
        return sum(weight[g] * (16 - len(k)) for g, k in keep.items())

    order = {g.id: np.arange(g.width) for g in gs}
    keep, info = D.allocate(gs, order, measure, est, "macs", 0.75 * total)
    assert 0 not in keep and len(keep[1]) == 8  # 8 channels of group 1 meet the budget
    assert info["met"] and info["steps"] == 8 and info["damage"] == pytest.approx(8.0)
    assert list(keep[1]) == list(range(8))  # the order given: most important first, kept


def test_a_step_is_re_measured_on_top_of_the_steps_taken():
    # group 1 is cheap alone (0.5 a channel) but costly once group 0 lost a channel (an interaction);
    # the search takes group 0 first (the cheapest; it can lose only 1 of 2), then re-measures group 1
    # on top of it and turns to group 2 (1.0 a channel). Measured alone, group 1 would have been next.
    gs = _groups((2, "channels"), (8, "channels"), (8, "channels"))
    est, total = _linear_estimate(gs, {0: 1.0, 1: 1.0, 2: 1.0})
    calls = []

    def measure(keep):
        calls.append({g: g_.width - len(keep[g]) for g_ in gs for g in [g_.id] if g in keep})
        r = {g.id: g.width - len(keep[g.id]) if g.id in keep else 0 for g in gs}
        return 0.1 * r[0] + 0.5 * r[1] + 50.0 * r[0] * r[1] + 1.0 * r[2]

    order = {g.id: np.arange(g.width) for g in gs}
    keep, info = D.allocate(gs, order, measure, est, "macs", total - 3)
    assert {g: gs[g].width - len(k) for g, k in keep.items()} == {0: 1, 2: 2}
    assert {0: 1, 1: 1} in calls  # group 1 measured again after group 0's step
    assert info["damage"] == pytest.approx(2.1)


def test_the_last_step_is_trimmed_to_the_budget():
    gs = _groups((64, "channels"))
    est, total = _linear_estimate(gs, {0: 1.0})
    keep, info = D.allocate(gs, {0: np.arange(64)}, lambda k: float(64 - len(k[0])), est, "macs", total - 6)
    assert len(keep[0]) == 58 and info["met"]  # a step is 4 channels: 4 + 2, not 4 + 4


def test_savings_beyond_the_budget_do_not_make_a_coarse_step_win():
    # group 0: 2 channels of 50 MACs each (its one step removes 50); group 1: 64 channels of 1 MAC.
    # Per MAC saved, group 0's step is 5x cheaper, but the budget needs only 6 MACs: counted by the
    # savings the budget needs, group 1's finer steps win and nothing overshoots
    gs = _groups((2, "channels"), (64, "channels"))
    est, total = _linear_estimate(gs, {0: 50.0, 1: 1.0})
    weight = {0: 1.0, 1: 0.1}

    def measure(keep):
        return sum(weight[g] * (gs[g].width - len(k)) for g, k in keep.items())

    keep, info = D.allocate(gs, {0: np.arange(2), 1: np.arange(64)}, measure, est, "macs", total - 6)
    assert 0 not in keep and len(keep[1]) == 58 and info["met"]
    assert est(keep)["macs"] == total - 6


def test_round_to_widths_and_whole_heads():
    gs = _groups((40, "channels"), (6, "heads"))
    est, total = _linear_estimate(gs, {0: 1.0, 1: 3.0})
    keep, info = D.allocate(gs, {0: np.arange(40), 1: np.arange(6)}, lambda k: 0.0, est, "macs", 0.5 * total,
                            round_to=8)
    assert 0 in keep and len(keep[0]) % 8 == 0
    assert D.step_size(6, "heads", 8) == 1 and D.step_size(40, "channels", 8) == 8 and D.step_size(40, "channels", 1) == 2


def test_no_group_is_emptied_and_an_unreachable_budget_says_so():
    gs = _groups((8, "channels"), (4, "channels"))
    est, total = _linear_estimate(gs, {0: 1.0, 1: 1.0})
    keep, info = D.allocate(gs, {0: np.arange(8), 1: np.arange(4)}, lambda k: 0.0, est, "macs", 0.0)
    assert not info["met"]
    assert len(keep[0]) == 8 - math.floor(D.MAX_FRACTION * 8) and len(keep[1]) >= 1


def test_steps_are_as_fine_as_the_time_budget_allows():
    # 4 groups of 64 channels, 1 MAC each; a budget of 3/4 of the MACs needs 64 channels gone:
    # at 1/16 (4 channels a step) 16 steps, at 1/8 8, at 1/4 4; expected measurements:
    # 4 (the sensitivity pass) + PER_STEP per step
    gs = _groups(*[(64, "channels")] * 4)
    est, total = _linear_estimate(gs, {g.id: 1.0 for g in gs})
    want = {16: 4 + D.PER_STEP * 16, 8: 4 + D.PER_STEP * 8, 4: 4 + D.PER_STEP * 4}
    steps, guess = D.planned_steps(gs, est, "macs", 0.75 * total, 1, seconds=1.0, budget=math.inf, min_steps=0)
    assert steps == 16 and guess == {16: pytest.approx(want[16])}
    steps, guess = D.planned_steps(gs, est, "macs", 0.75 * total, 1, seconds=1.0, budget=want[8] + 0.5, min_steps=0)
    assert steps == 8 and guess == pytest.approx({16: want[16], 8: want[8]})
    steps, guess = D.planned_steps(gs, est, "macs", 0.75 * total, 1, seconds=2.0, budget=want[8] + 0.5, min_steps=0)
    assert steps == 4 and guess[4] == pytest.approx(2.0 * want[4])  # twice as slow: the coarsest
    steps, _ = D.planned_steps(gs, est, "macs", 0.0, 1, seconds=1e6, budget=1.0, min_steps=0)
    assert steps == D.STEP_CHOICES[-1]  # nothing fits: the coarsest, never a refusal


def test_a_group_whose_step_saves_almost_nothing_does_not_decide_the_expected_steps():
    # the four groups of above plus a squeeze-excite-like group whose channels cost almost nothing: counted, 1 / its
    # saving would multiply the expected steps by about 10,000 / 5 and send a search of seconds to the coarsest steps
    gs = _groups(*[(64, "channels")] * 4, (64, "channels"))
    est, total = _linear_estimate(gs, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1e-4})
    want = {16: 5 + D.PER_STEP * 16, 8: 5 + D.PER_STEP * 8, 4: 5 + D.PER_STEP * 4}  # as above: 16 / 8 / 4 steps
    steps, guess = D.planned_steps(gs, est, "macs", total - 64, 1, seconds=1.0, budget=want[16] + 0.5, min_steps=0)
    assert steps == 16 and guess == {16: pytest.approx(want[16])}


def test_a_budget_is_not_spent_in_too_few_coarse_steps():
    """A step count that would meet the budget in fewer than min_steps steps
    gives way to the next finer one when that is expected within OVER
    budgets (the clock reading a little slow does not halve the resolution);
    further over, the time budget wins."""
    gs = _groups(*[(64, "channels")] * 4)  # as above: 16 / 8 / 4 steps at 1/16 / 1/8 / 1/4
    est, total = _linear_estimate(gs, {g.id: 1.0 for g in gs})
    want = {16: 4 + D.PER_STEP * 16, 8: 4 + D.PER_STEP * 8, 4: 4 + D.PER_STEP * 4}
    fits_8 = want[8] + 0.5  # 1/8 fits, 1/16 (36 s) within OVER budgets (41 s)
    assert D.planned_steps(gs, est, "macs", 0.75 * total, 1, seconds=1.0, budget=fits_8, min_steps=8)[0] == 8
    assert D.planned_steps(gs, est, "macs", 0.75 * total, 1, seconds=1.0, budget=fits_8, min_steps=9)[0] == 16
    fits_4 = want[4] + 0.5  # 1/4 fits (4 steps), 1/8 (20 s) within OVER budgets (24.5 s): 1/8, not 1/16
    assert D.planned_steps(gs, est, "macs", 0.75 * total, 1, seconds=1.0, budget=fits_4, min_steps=5)[0] == 8
    tight = want[8] / D.OVER - 0.5  # 1/8 just over OVER budgets: the coarse step stays
    assert D.planned_steps(gs, est, "macs", 0.75 * total, 1, seconds=1.0, budget=tight, min_steps=5)[0] == 4
    assert D.MIN_STEPS > 4  # the default floor


def _quadratic_groups(weight: dict):
    """Four groups of 64 channels, 1 MAC each, whose damage grows with the square of the channels each lost
    (times its ``weight``): the groups, their estimate, the total MACs, the damage and the channel order."""
    gs = _groups(*[(64, "channels")] * 4)
    est, total = _linear_estimate(gs, {g.id: 1.0 for g in gs})

    def measure(keep):
        return sum(weight[g] * (64 - len(k)) ** 2 for g, k in keep.items())

    return gs, est, total, measure, {g.id: np.arange(64) for g in gs}


def test_a_coarser_search_takes_fewer_measurements_and_still_meets_the_budget():
    gs, est, total, measure, order = _quadratic_groups({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0})
    fine = D.allocate(gs, order, measure, est, "macs", 0.75 * total)[1]
    coarse = D.allocate(gs, order, measure, est, "macs", 0.75 * total, steps_to_width=4)[1]
    assert fine["step"] == "1/16" and coarse["step"] == "1/4"
    assert fine["met"] and coarse["met"] and coarse["measurements"] < fine["measurements"]
    assert D.step_size(64, "channels", 1, 4) == 16 and D.step_size(6, "heads", 1, 4) == 1


def test_once_its_measurements_are_spent_the_search_takes_its_steps_on_the_damages_last_measured():
    gs, est, total, measure, order = _quadratic_groups({0: 1.0, 1: 1.5, 2: 2.0, 3: 2.5})
    free = D.allocate(gs, order, measure, est, "macs", 0.5 * total)[1]
    keep, capped = D.allocate(gs, order, measure, est, "macs", 0.5 * total, max_measurements=10)
    assert free["unmeasured"] == 0 and free["measurements"] > 20
    # the sensitivity pass (4), then re-measurements until 10 are spent (the step in hand finishes its own)
    assert 10 <= capped["measurements"] <= 10 + D.MAX_REMEASURE and capped["met"]
    assert capped["unmeasured"] > 0 and capped["steps"] == free["steps"]
    # the damage of the unmeasured steps is what the second-order model expects: the plan's true damage
    # stays within a small factor of it
    assert 0.5 * measure(keep) <= capped["damage"] <= 2.0 * measure(keep)


def test_unmeasured_steps_are_spread_by_the_second_order_model():
    # four equally sensitive groups (damage grows with the square of the channels lost) and a budget spent
    # after the sensitivity pass: with no measurement after it, the steps spread over the groups (a step that
    # kept its last measured price would send every step to the same group)
    gs, est, total, measure, order = _quadratic_groups({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    keep, info = D.allocate(gs, order, measure, est, "macs", 0.5 * total, max_measurements=4)
    # 32 steps of 4 channels; the first is the sensitivity pass's own measurement on the unpruned model
    assert info["measurements"] == 4 and info["steps"] == 32 and info["unmeasured"] == 31
    assert sorted(64 - len(k) for k in keep.values()) == [32, 32, 32, 32]


# ------------------------------------------------------------------ (c) on a model


def _calib(tmp_path, n=32, seed=0):
    p = tmp_path / "calib.npy"
    np.save(p, np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32))
    return str(p)


def _dead_cnn():
    from test_recover import small_cnn

    return small_cnn(seed=3, dead=(0, 4, 0))  # 4 of 8 outputs per group of the grouped conv are dead


def _error(ref, proto, x):
    return D.output_damage(ref, runtime.session(proto).run(None, {"x": x}))


def test_damage_scope_removes_the_dead_channels_where_uniform_pruning_removes_live_ones(tmp_path):
    m = _dead_cnn()
    calib = _calib(tmp_path)
    job = Job.open(m)
    est = job.estimator
    # the grouped conv's outputs: one group of 8 channels per conv group (the same indices in both)
    dead_gid = next(g.id for g in job.groups if g.width == 8
                    and any(t.node.name == "conv2" and (t.slot, t.axis) == (1, 0) for t in g.tensors))
    w2 = onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w2"))
    live = np.flatnonzero(np.abs(w2[:8]).reshape(8, -1).sum(1) > 0)
    assert len(live) == 4
    target = est.estimate({dead_gid: live})["macs"]
    frac = target / est.before["macs"]
    plan = job.plan(Ratios.from_dict({"target_macs": frac, "scope": "damage"}), calib)
    assert {g: list(k) for g, k in plan.keep.items()} == {dead_gid: list(live)}
    assert plan.target["scope"] == "damage" and plan.target["met"] and plan.target["damage"] < 1e-9
    uniform = job.plan(Ratios.from_dict({"target_macs": frac}), calib)
    x = np.random.default_rng(9).standard_normal((16, 3, 16, 16)).astype(np.float32)  # not the calibration inputs
    ref = runtime.session(job.data_proto()).run(None, {"x": x})
    with job.edited(plan.keep, prune=True) as p:
        assert _error(ref, p, x) < 1e-10
    with job.edited(uniform.keep, prune=True) as p:
        assert _error(ref, p, x) > 1e-3


def test_damage_scope_needs_a_budget_and_calibration(tmp_path):
    job = Job.open(_dead_cnn())
    with pytest.raises(UserError, match="target_macs or target_params"):
        job.plan(Ratios.from_dict({"default": 0.3, "scope": "damage"}), _calib(tmp_path))
    with pytest.raises(UserError, match="--calib"):
        job.plan(Ratios.from_dict({"target_macs": 0.7, "scope": "damage"}))


def test_cli_says_what_it_measured_and_the_plan_file_replays_it(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_dead_cnn(), str(src))
    calib = _calib(tmp_path)
    out, out2, plan = tmp_path / "p.onnx", tmp_path / "p2.onnx", tmp_path / "plan.json"
    rc = main([str(src), "--ratios", '{"target_params": 0.8, "scope": "damage", "ignore": ["fc"]}', "--calib", calib,
               "--calib-batch-size", "16", "-o", str(out), "--save-plan", str(plan)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "scope damage:" in text and "candidates measured" in text and "on 32 calibration samples" in text  # two whole batches of 16
    saved = json.load(open(plan))
    assert saved["target"]["scope"] == "damage" and saved["target"]["achieved"] <= saved["target"]["target"]
    assert main([str(src), "--plan", str(plan), "-o", str(out2), "-q"]) == 0
    assert out.read_bytes() == out2.read_bytes()
    rc = main([str(src), "--ratios", '{"target_macs": 0.7, "scope": "damage"}', "-o", str(tmp_path / "x.onnx")])
    assert rc == 1 and not (tmp_path / "x.onnx").exists()
    assert "onnxprune: error: scope 'damage' measures" in capsys.readouterr().err


def test_a_set_given_ratio_0_and_ignored_groups_stay_whole(tmp_path):
    job = Job.open(_dead_cnn())
    calib = _calib(tmp_path)
    dead = next(g for g in job.groups if g.width == 8
                and any(t.node.name == "conv2" and (t.slot, t.axis) == (1, 0) for t in g.tensors))
    free = job.plan(Ratios.from_dict({"target_macs": 0.9, "scope": "damage"}), calib)
    assert dead.id in free.keep  # its dead channels are the cheapest: taken when allowed
    plan = job.plan(Ratios.from_dict({"target_macs": 0.9, "scope": "damage", "default": 0.5,
                                      "sets": {dead.set_name: 0}}), calib)
    assert dead.id not in plan.keep and plan.keep and dead.id not in plan.skipped
    plan = job.plan(Ratios.from_dict({"target_macs": 0.9, "scope": "damage", "ignore": ["fc"]}), calib)
    fc = [g.id for g in job.groups if not g.frozen and any(t.node.name == "fc" for t in g.tensors)]
    assert fc and not set(fc) & set(plan.keep) and all(plan.skipped[i] == "ignored by 'fc'" for i in fc)
    assert dead.id in plan.keep


def test_candidates_are_measured_on_samples_from_every_batch(tmp_path):
    from onnxprune.plan.importance.calib import Calibration

    batches = [np.full((16, 3, 16, 16), float(k), np.float32) for k in range(4)]
    cal = Calibration(batches, None, "test")
    job = Job.open(_dead_cnn())  # a dynamic batch: one feed, 5 samples of each of the 4 batches
    feeds, n = job._damage_feeds(cal, 20)
    assert n == 20 and len(feeds) == 1
    assert [float(v) for v in feeds[0]["x"][:, 0, 0, 0]] == [k for k in range(4) for _ in range(5)]
    m = _dead_cnn()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 16  # a static batch: whole batches
    feeds, n = Job.open(m)._damage_feeds(cal, 20)
    assert n == 32 and [float(fd["x"][0, 0, 0, 0]) for fd in feeds] == [0.0, 1.0]


@pytest.mark.parametrize("seconds, samples", [(math.inf, D.SAMPLES), (0.0, D.MIN_SAMPLES)])
def test_a_model_slower_than_the_run_budget_is_measured_on_fewer_samples(tmp_path, monkeypatch, seconds, samples):
    monkeypatch.setattr(D, "RUN_SECONDS", seconds)  # 0: every model is "slow"
    job = Job.open(_dead_cnn())
    plan = job.plan(Ratios.from_dict({"target_macs": 0.9, "scope": "damage"}), _calib(tmp_path, n=64))
    assert plan.target["samples"] == samples and plan.target["met"]


@pytest.mark.parametrize("seconds, step", [(math.inf, "1/16"), (0.0, "1/4")])
def test_a_search_over_its_time_budget_takes_coarser_steps(tmp_path, monkeypatch, seconds, step):
    monkeypatch.setattr(D, "SEARCH_SECONDS", seconds)  # 0: every search is too slow
    job = Job.open(_dead_cnn())
    plan = job.plan(Ratios.from_dict({"target_macs": 0.7, "scope": "damage"}), _calib(tmp_path, n=64))
    assert plan.target["step"] == step and plan.target["met"]
    assert plan.target["expected_seconds"] > 0


@pytest.mark.parametrize("seconds", [math.inf, 0.0])
def test_a_search_its_coarsest_steps_cannot_fit_is_held_to_its_budget_in_measurements(tmp_path, monkeypatch,
                                                                                       seconds, capsys):
    monkeypatch.setattr(D, "SEARCH_SECONDS", seconds)  # 0: every search is too slow, even at the coarsest steps
    job = Job.open(_dead_cnn())
    plan = job.plan(Ratios.from_dict({"target_macs": 0.7, "scope": "damage"}), _calib(tmp_path, n=64))
    t = plan.target
    assert t["met"]
    if seconds:  # sized within its budget: no cap
        assert t["max_measurements"] is None and t["unmeasured"] == 0
    else:  # the budget in measurements: the sensitivity pass alone, then every step taken on what it measured
        groups = len([g for g in job.groups if not g.frozen and g.width > 1])
        assert t["max_measurements"] == groups and t["measurements"] == groups
        assert t["unmeasured"] == t["steps"] - 1 > 0  # the first step: the sensitivity pass's measurement
        from onnxprune.report import target_text
        assert f"the last {t['unmeasured']} steps taken on the damages last measured" in target_text(t)


def test_an_unreachable_budget_warns_only_when_something_was_pruned(tmp_path):
    """A budget the groups cannot reach is said in a warning; a plan that removes
    nothing at all is refused by the caller in one line, with no warning before it."""
    import logging

    from onnx import TensorProto, helper

    seen = []
    handler = logging.Handler()
    handler.emit = lambda rec: seen.append(rec.getMessage())
    logging.getLogger("onnxprune.pipeline").addHandler(handler)
    try:
        calib = _calib(tmp_path)
        plan = Job.open(_dead_cnn()).plan(Ratios.from_dict({"target_macs": 0.01, "scope": "damage"}), calib)
        assert not plan.target["met"] and plan.keep
        assert any("not reached with scope 'damage'" in m for m in seen), seen
        seen.clear()
        # one conv straight to the graph output: its channels are frozen, nothing can go
        w = onnx.numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
        g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], [w])
        frozen = Job.open(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
        plan = frozen.plan(Ratios.from_dict({"target_macs": 0.5, "scope": "damage"}), calib)
        assert not plan.target["met"] and not any(len(k) < 4 for k in plan.keep.values())
        assert not any("not reached" in m for m in seen), seen
    finally:
        logging.getLogger("onnxprune.pipeline").removeHandler(handler)


# ------------------------------------------------------------------ (d) candidates zeroed in one session

REF_VIT = __import__("pathlib").Path(__file__).resolve().parent.parent / "models" / "ref_vit.onnx"


def _vit_damage_plan(tmp_path, target):
    """``Job.plan`` of the reference ViT under scope damage at ``target_macs`` ``target``."""
    from onnxprune.plan.importance.calib import load as load_calib

    p = tmp_path / "vit_calib.npy"
    np.save(p, np.random.default_rng(4).standard_normal((32, 3, 64, 64)).astype(np.float32))
    job = Job.open(str(REF_VIT))
    return job.plan(Ratios.from_dict({"target_macs": target, "scope": "damage"}), load_calib(str(p), job.skeleton()))


def _vit_search(tmp_path, recovered=True):
    from onnxprune.plan.importance.calib import load as load_calib

    p = tmp_path / "vit_calib.npy"
    np.save(p, np.random.default_rng(4).standard_normal((32, 3, 64, 64)).astype(np.float32))
    job = Job.open(str(REF_VIT))
    calib = load_calib(str(p), job.skeleton())
    ratios = Ratios.from_dict({"target_macs": 0.8, "scope": "damage"})
    return job, job._damage_search(ratios, calib, job.scores(ratios, calib), None, recovered)


@pytest.mark.parametrize("recovered", [True, False], ids=["means-folded", "as-written"])
def test_a_candidate_zeroed_in_one_session_measures_what_the_rewritten_candidate_does(tmp_path, recovered):
    """Heads, head dims and MLP channels of a small ViT zeroed in the original's
    one session (their consumers' biases moved by the removed means) give the
    damage of the model rewritten without them, candidate after candidate; a
    plan touching the residual stream (not exact: LayerNorm sees the removed
    channels) is not one it covers."""
    job, search = _vit_search(tmp_path, recovered)
    fed = search.fed
    assert fed is not None
    rng = np.random.default_rng(0)
    kinds = {g.kind for g in job.groups if g.id in fed.probe}
    assert {"heads", "head_dim", "mlp"} <= kinds
    seen = set()
    for trial in range(6):
        pool = [g for g in job.groups if g.id in fed.probe]
        picked = rng.choice(len(pool), size=1 + trial % 4, replace=False)
        keep = {pool[i].id: np.sort(rng.choice(pool[i].width, max(1, pool[i].width * (1 + trial % 3) // 4),
                                               replace=False)) for i in picked}
        seen |= {pool[i].kind for i in picked}
        zeroed, written = fed(keep), search.rewritten(keep)
        assert zeroed is not None and written > 1e-6
        assert zeroed == pytest.approx(written, rel=1e-4), (trial, keep)
    assert len(seen) >= 2
    embed = next(g for g in job.groups if g.kind == "embed")
    assert not fed.covers({embed.id: np.arange(100)})


def test_zeroed_candidates_run_from_the_first_node_their_edits_reach(tmp_path):
    """Once zeroed candidates are chosen, each runs from the last starting point
    before the first node its edits reach, fed the values the unedited model
    left there: every group's first step gives the damage of the rewritten
    model, and later groups start later."""
    job, search = _vit_search(tmp_path)
    fed = search.fed
    fed.use = True
    fed.prepare()
    part = fed.resume()
    assert part is not None and part.ok and len(part.cross) >= 4
    pool = [g for g in job.groups if g.id in fed.probe]
    starts = []
    for g in pool:
        keep = {g.id: np.arange(g.width - max(1, g.width // 4), g.width)}
        with job.edited(keep, zero=True, read=list(part.base)) as (arrays, _):
            starts.append(part.start(part.changed(arrays)))
        runs = part.runs
        zeroed, written = fed(keep), search.rewritten(keep)
        assert part.runs == runs + (starts[-1] is not None)
        assert zeroed == pytest.approx(written, rel=1e-4), g.set_name
    assert part.checked and sum(s is not None for s in starts) >= len(pool) - 2
    assert len({s for s in starts if s is not None}) >= 4  # the deeper the group, the later its start


def _settling(tmp_path):
    """A small ViT's search with zeroed candidates prepared, and two plans:
    a step of the first group (``state``) and that plus a step of the last
    (``both``); also the last group's step alone."""
    job, search = _vit_search(tmp_path)
    fed = search.fed
    fed.use = True
    fed.prepare()
    pool = [g for g in job.groups if g.id in fed.probe]
    step = {g.id: np.arange(g.width - max(1, g.width // 4), g.width) for g in pool}
    early, late = pool[0], pool[-1]
    state = {early.id: step[early.id]}
    return job, search, fed.resume(), state, {**state, late.id: step[late.id]}, {late.id: step[late.id]}


def test_after_the_search_moves_on_its_candidates_start_from_the_new_plan(tmp_path):
    """The search tells the zeroed runs each plan it moves to (``settled``):
    the values after that plan's first edit are computed anew once, and a
    candidate adding a step to a deeper group starts at that group, not at the
    plan's first edit, with the damage of the rewritten model."""
    job, search, part, state, both, late_step = _settling(tmp_path)
    fed = search.fed

    def start_of(keep):
        with job.edited(keep, zero=True, read=list(part.base)) as (arrays, _):
            return part.start(part.changed(arrays))

    s_early, s_late = start_of(state), start_of(late_step)
    assert s_early is not None and s_late > s_early
    assert fed(both) == pytest.approx(search.rewritten(both), rel=1e-4) and part.last_start == s_early
    fed.settle(state)
    assert part.rebased == 1
    runs = part.runs
    assert fed(both) == pytest.approx(search.rewritten(both), rel=1e-4)
    assert part.runs == runs + 1 and part.last_start == s_late
    fed.settle({})  # back to the unedited model: the values it left
    assert part.rebased == 2
    assert fed(state) == pytest.approx(search.rewritten(state), rel=1e-4) and part.last_start == s_early


def test_moving_on_to_a_step_just_measured_takes_the_values_its_run_made(tmp_path):
    """The search takes the step it has just measured: the values that run
    made at the later starting points become the held ones, with no run of
    its own, and equal what a run for them computes; a step the search did not
    measure, or one measured before the base last moved, is run anew."""
    _, search, part, state, both, _ = _settling(tmp_path)
    fed = search.fed
    unedited = {c: [dict(h) for h in held] for c, held in part.held.items()}
    fed(state)
    runs = part.runs
    fed.settle(state)
    assert (part.reused, part.rebased, part.runs) == (1, 0, runs)
    kept = {c: [dict(h) for h in held] for c, held in part.held.items()}
    assert any(not np.array_equal(k[v], u[v]) for c in kept for k, u in zip(kept[c], unedited[c]) for v in k)
    assert fed(both) == pytest.approx(search.rewritten(both), rel=1e-4)
    fed.settle({})  # not measured since the last move: run anew
    assert (part.reused, part.rebased) == (1, 1)
    fed.settle(state)  # measured, but before the base last moved: run anew, to the same values
    assert (part.reused, part.rebased) == (1, 2)
    for c, held in part.held.items():
        for h, k in zip(held, kept[c]):
            for v in h:
                np.testing.assert_allclose(h[v], k[v], rtol=1e-5, atol=1e-6, err_msg=v)


@pytest.mark.parametrize("mid, chosen", [(0.5, "zeroed"), (0.95, "rewritten")])
def test_zeroed_candidates_are_timed_as_they_would_run_from_mid_depth(tmp_path, monkeypatch, mid, chosen):
    """The probe edits every group, so its zeroed run is of the whole model,
    while a zeroed candidate runs from the first node it edits: when the whole
    zeroed run is not clearly faster than the rewritten one, a candidate at mid
    depth is timed as it would run, and that decides (timings scripted: a
    rewritten run 1 s, the whole zeroed one 0.9 s)."""
    from onnxprune import pipeline as P

    monkeypatch.setattr(D, "RUN_SECONDS", math.inf)
    monkeypatch.setattr(D, "SEARCH_SECONDS", math.inf)
    monkeypatch.setattr(D, "ZEROED", None)
    job, search = _vit_search(tmp_path)
    fed = search.fed

    def scripted(fn, keep, times=None):
        return fn(keep), (1.0 if fn is not fed else 0.9 if keep is fed.probe else mid)

    monkeypatch.setattr(P, "_fastest", scripted)
    from onnxprune.plan.budget import parse_target

    metric, requested = Ratios.from_dict({"target_macs": 0.8}).target
    target = parse_target(requested, job.estimator.before[metric], metric)
    _, info = search(job.estimator.estimate, metric, target.value)
    assert info["met"] and info["candidates"] == chosen
    assert info["timings"]["zeroed_from_mid_depth"] == mid and info["timings"]["zeroed"] == 0.9
    assert ("partial_runs" in info) == (chosen == "zeroed")
    assert fed.resume() is None  # the held values go with the search


def test_the_search_is_sized_by_a_candidate_at_mid_depth_not_the_whole_probe(tmp_path, monkeypatch):
    """Zeroed candidates clearly faster than rewritten ones (timings scripted:
    rewritten 1 s, the whole zeroed probe 0.5 s): each runs from the first node
    its edit reaches, so the search is sized by a candidate at mid depth timed
    as it runs (0.2 s here), not by the probe's whole-model run."""
    from onnxprune import pipeline as P

    monkeypatch.setattr(D, "RUN_SECONDS", math.inf)
    monkeypatch.setattr(D, "ZEROED", None)
    job, search = _vit_search(tmp_path)
    fed = search.fed

    def scripted(fn, keep, times=None):
        return fn(keep), (1.0 if fn is not fed else 0.5 if keep is fed.probe else 0.2)

    monkeypatch.setattr(P, "_fastest", scripted)
    sized = []
    real = D.planned_steps
    monkeypatch.setattr(D, "planned_steps", lambda *a, **k: sized.append(a[5]) or real(*a, **k))
    from onnxprune.plan.budget import parse_target

    metric, requested = Ratios.from_dict({"target_macs": 0.8}).target
    target = parse_target(requested, job.estimator.before[metric], metric)
    _, info = search(job.estimator.estimate, metric, target.value)
    assert info["met"] and info["candidates"] == "zeroed"
    assert info["timings"]["zeroed_from_mid_depth"] == 0.2 and sized == [0.2]
    assert info["measurement_seconds"] == 0.2
    assert info["expected_by_steps"][int(info["step"].split("/")[1])] == pytest.approx(info["expected_seconds"])


def test_partial_runs_no_faster_than_the_whole_zeroed_model_are_turned_off(tmp_path, monkeypatch):
    """Pieces at ORT's extended level (the full one refused them) and timings
    scripted: rewritten 1 s, the whole zeroed probe 0.5 s, a candidate at mid
    depth run from its first edit 0.6 s: candidates are zeroed, run whole,
    and the search is sized by the whole run."""
    from onnxprune import pipeline as P
    from onnxprune.runtime.capture import Resume

    monkeypatch.setattr(D, "RUN_SECONDS", math.inf)
    monkeypatch.setattr(D, "ZEROED", None)
    job, search = _vit_search(tmp_path)
    fed = search.fed
    partial = []
    real, init = Resume.run, Resume.__init__
    monkeypatch.setattr(Resume, "run", lambda self, *a, **kw: partial.append(1) or real(self, *a, **kw))

    def at_extended_level(self, *a, **kw):  # as if ORT's full level had refused a piece
        init(self, *a, **kw)
        self.extended = True

    monkeypatch.setattr(Resume, "__init__", at_extended_level)

    def scripted(fn, keep, times=None):
        return fn(keep), (1.0 if fn is not fed else 0.5 if keep is fed.probe else 0.6)

    monkeypatch.setattr(P, "_fastest", scripted)
    from onnxprune.plan.budget import parse_target

    metric, requested = Ratios.from_dict({"target_macs": 0.8}).target
    target = parse_target(requested, job.estimator.before[metric], metric)
    _, info = search(job.estimator.estimate, metric, target.value)
    assert info["met"] and info["candidates"] == "zeroed"
    assert info["partial_runs_off"] and info["measurement_seconds"] == 0.5
    assert len(partial) <= 2 < info["measurements"]  # the candidate at mid depth (checked, then timed): no other


def test_a_partial_run_that_disagrees_with_the_whole_model_turns_partial_runs_off(tmp_path, monkeypatch):
    """The first partial run is checked against the whole model's; when they
    differ, that candidate and every later one run the whole model."""
    from onnxprune.runtime.capture import Resume

    real = Resume.run
    monkeypatch.setattr(Resume, "run", lambda self, c, arrays, **kw: [[o * 1.5 for o in out] for out in real(self, c, arrays, **kw)])
    job, search = _vit_search(tmp_path)
    fed = search.fed
    fed.use = True
    fed.prepare()
    g = [g for g in job.groups if g.id in fed.probe][-1]
    keep = {g.id: np.arange(g.width // 2)}
    assert fed.resume() is not None
    assert fed(keep) == pytest.approx(search.rewritten(keep), rel=1e-4)
    assert fed.resume() is None


def test_zeroed_candidates_of_a_cnn_whose_consumers_lose_outputs_and_have_no_bias(tmp_path):
    """conv3 both reads conv2's removed channels (its bias moves by their means)
    and loses outputs; neither it nor the classifier has a bias (one is made
    for every candidate alike): zeroed and rewritten still agree."""
    from onnxprune.plan.importance.calib import load as load_calib
    from test_recover import small_cnn

    m = small_cnn(seed=6)
    for node in m.graph.node:
        if node.name in ("conv3", "fc"):
            del node.input[2]
    kept = [t for t in m.graph.initializer if t.name not in ("b3", "b4")]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    job = Job.open(m)
    calib = load_calib(_calib(tmp_path, n=32), job.skeleton())
    ratios = Ratios.from_dict({"target_macs": 0.8, "scope": "damage", "importance": "l2"})
    search = job._damage_search(ratios, calib, job.scores(ratios, calib), None, True)
    fed = search.fed
    pool = [g for g in job.groups if g.id in fed.probe]
    assert len(pool) >= 2
    rng = np.random.default_rng(1)
    for trial in range(4):
        keep = {g.id: np.sort(rng.choice(g.width, g.width // 2 + trial % 2, replace=False)) for g in pool}
        zeroed, written = fed(keep), search.rewritten(keep)
        assert zeroed is not None and written > 1e-6
        assert zeroed == pytest.approx(written, rel=1e-4), trial


def test_the_search_takes_the_same_plan_zeroed_or_rewritten_and_says_which(tmp_path, monkeypatch):
    # the clock out of it: a loaded machine gave the two runs other sample counts or steps
    monkeypatch.setattr(D, "RUN_SECONDS", math.inf)
    monkeypatch.setattr(D, "SEARCH_SECONDS", math.inf)
    plans = {}
    for forced in (True, False):
        monkeypatch.setattr(D, "ZEROED", forced)
        plans[forced] = _vit_damage_plan(tmp_path, 0.7)
    assert plans[True].target["candidates"] == "zeroed" and plans[False].target["candidates"] == "rewritten"
    assert plans[True].target["met"] and plans[True].target["steps"] > 3
    assert {k: list(v) for k, v in plans[True].keep.items()} == {k: list(v) for k, v in plans[False].keep.items()}
    assert plans[True].target["damage"] == pytest.approx(plans[False].target["damage"], rel=1e-3)
    from onnxprune.report import target_text  # zeroed candidates run from the first node they edit, and it says so

    assert plans[True].target["partial_runs"] > plans[True].target["measurements"] // 2
    assert "partial_runs" not in plans[False].target
    assert f"({plans[True].target['partial_runs']} run from the first node they edit)" in target_text(plans[True].target)


def test_a_zeroed_session_that_disagrees_with_the_rewritten_model_is_not_used(tmp_path, monkeypatch):
    """The probe (every exact group one channel short) is measured both ways
    before the search: a zeroing that misses a tensor gives another damage, and
    the search rewrites every candidate instead."""
    from onnxprune import rewrite

    real = rewrite.zero_removed

    def misses_heads(ctx, groups, keep, journal=None, consumer_only=frozenset(), memo=None):
        real(ctx, [g for g in groups if g.kind != "heads"], keep, journal, consumer_only, memo)

    monkeypatch.setattr(rewrite, "zero_removed", misses_heads)
    monkeypatch.setattr(D, "ZEROED", True)
    plan = _vit_damage_plan(tmp_path, 0.8)
    assert plan.target["candidates"] == "rewritten" and plan.target["met"]


@pytest.mark.parametrize("gain, chosen", [(1e9, "zeroed"), (0.0, "rewritten")])
def test_zeroed_candidates_are_chosen_only_when_clearly_faster(tmp_path, monkeypatch, gain, chosen):
    """Left to itself (ZEROED None) the search zeroes candidates only when the
    probe's zeroed run takes at most ZEROED_GAIN of the rewritten run's time:
    near-equal times would pick either from one call to the next. The plan
    records the timings that decided."""
    monkeypatch.setattr(D, "ZEROED", None)
    monkeypatch.setattr(D, "ZEROED_GAIN", gain)
    plan = _vit_damage_plan(tmp_path, 0.8)
    assert plan.target["candidates"] == chosen and plan.target["met"]
    # a rewritten candidate is timed only where candidates are rewritten (zeroed ones: the probe's zeroed run)
    timed = {"rewritten", "zeroed"} | ({"candidate"} if chosen == "rewritten" else set())
    assert timed <= set(plan.target["timings"]) <= timed | {"zeroed_from_mid_depth"}
    assert all(t > 0 for t in plan.target["timings"].values())


def test_the_timings_that_steer_the_search_are_the_fastest_of_several_runs(tmp_path, monkeypatch):
    """The probe is run TIMINGS times each way (one run's time moves between runs)."""
    real, probes = Job._fed_runs, []

    def counted(self, *args):
        runs = real(self, *args)

        def wrapped(keep):
            if keep is runs.probe:
                probes.append(keep)
            return runs(keep)

        wrapped.covers, wrapped.probe, wrapped.use = runs.covers, runs.probe, runs.use
        wrapped.prepare, wrapped.resume, wrapped.settle = runs.prepare, runs.resume, runs.settle
        wrapped.discard = runs.discard
        return wrapped

    monkeypatch.setattr(Job, "_fed_runs", counted)
    monkeypatch.setattr(D, "TIMINGS", 3)
    plan = _vit_damage_plan(tmp_path, 0.8)
    assert len(probes) == 3 and plan.target["met"]


def test_the_original_is_timed_again_only_where_a_second_run_could_change_the_sample_count(tmp_path, monkeypatch):
    """The original's first timed run decides how many samples a candidate is
    measured on; it is run again (the fastest of TIMINGS) only where a run
    twice as fast could give a count other than the fewest."""
    import onnxprune.pipeline as P

    calls, real = [], P._fastest
    monkeypatch.setattr(D, "TIMINGS", 3)
    monkeypatch.setattr(P, "_fastest", lambda fn, *a, times=None: calls.append(times) or real(fn, *a, times=times))
    monkeypatch.setattr(D, "RUN_SECONDS", 1e-9)  # any model is clearly slow: one run, then the fewer samples' run
    slow = _vit_damage_plan(tmp_path, 0.8)
    assert calls[:2] == [1, 1] and slow.target["samples"] == D.MIN_SAMPLES
    calls.clear()
    monkeypatch.setattr(D, "RUN_SECONDS", 1e3)  # any model is fast: timed again, all the samples kept
    fast = _vit_damage_plan(tmp_path, 0.8)
    assert calls[:2] == [1, D.TIMINGS - 1] and fast.target["samples"] == 32


@pytest.mark.parametrize("run_seconds, again", [(0.125, False), (0.16, True)])
def test_a_slow_model_is_timed_again_only_where_a_warm_run_could_give_more_than_the_fewest_samples(
        tmp_path, monkeypatch, run_seconds, again):
    """The original's first run (scripted: 1 s on 32 samples) is that of a
    fresh session; it is run again only where a warm run, up to WARM_GAIN
    times as fast, could give more than MIN_SAMPLES (here RUN_SECONDS 0.16:
    32 x 0.16 x 1.5 = 7.7 s of samples at 1 s; 0.125: 6.0)."""
    import onnxprune.pipeline as P

    calls, real = [], P._fastest

    def scripted(fn, *a, times=None):
        out, t = real(fn, *a, times=times)
        if a:  # a candidate or the probe: as measured
            return out, t
        calls.append(times)  # the original's reference runs
        return out, 1.0

    monkeypatch.setattr(D, "TIMINGS", 3)
    monkeypatch.setattr(D, "RUN_SECONDS", run_seconds)
    monkeypatch.setattr(P, "_fastest", scripted)
    plan = _vit_damage_plan(tmp_path, 0.8)
    assert calls == ([1, D.TIMINGS - 1, 1] if again else [1, 1])
    assert plan.target["samples"] == max(D.MIN_SAMPLES, int(32 * run_seconds))

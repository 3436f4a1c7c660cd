"""The ``recon`` criterion, scope ``cost`` and the recovery's held-out ridge choice.

``recon`` scores a channel by the error its removal leaves at the linear layers
where it ends once they are re-fitted by least squares; checked here against a
brute-force re-fit in numpy on a small MLP whose hidden layer has a planted
redundant pair (large, but predictable from each other) and a small unique
channel: magnitude removes the small unique one, ``recon`` one of the pair.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import runtime
from onnxprune.api import analyze, prune
from onnxprune.plan.importance.calib import Calibration
from onnxprune.plan.importance.criteria import Scores, score_groups, _capture
from onnxprune.plan.importance.recon import recon_scores
from onnxprune.plan import Ratios, make_plan
from onnxprune.recover import _accumulate, _Fit, _folds, _select, _totals, LayerRow, downstream, plan_defaults, recover

D_IN, HID, D_OUT = 6, 8, 5
PAIR, SMALL = (3, 5), 0


def _mlp(seed=0):
    """x[N,6] -> Gemm 6->8 (+b) -> Relu -> MatMul 8->5 -> y. Hidden 5 = 2 * hidden 3
    (+ a tiny independent direction; Relu keeps the factor 2), hidden 0 is 50x
    smaller than the rest but not predictable from them."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((HID, D_IN))
    b1 = rng.standard_normal(HID)
    w1[PAIR[1]] = 2 * w1[PAIR[0]] + 0.01 * rng.standard_normal(D_IN)
    b1[PAIR[1]] = 2 * b1[PAIR[0]]
    w1[SMALL] *= 0.1
    b1[SMALL] *= 0.1
    w2 = rng.standard_normal((HID, D_OUT))
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["p"], name="fc1", transB=1),
         helper.make_node("Relu", ["p"], ["h"], name="relu"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D_OUT])],
        initializer=[numpy_helper.from_array(a.astype(np.float32), n) for n, a in (("w1", w1), ("b1", b1), ("w2", w2))],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m, w1, b1, w2


def _calib(n_batches=4, batch=64, seed=1):
    rng = np.random.default_rng(seed)
    return Calibration([rng.standard_normal((batch, D_IN)).astype(np.float32) for _ in range(n_batches)], None, "test")


def _brute(w1, b1, w2, xs):
    """Relative error (vs the output's energy) after removing each hidden channel
    and re-fitting fc2's weights and a bias by least squares."""
    x = np.concatenate(xs).astype(np.float64)
    h = np.maximum(x @ w1.T + b1, 0)
    y = h @ w2
    out = []
    for c in range(HID):
        keep = [i for i in range(HID) if i != c]
        a = np.hstack([h[:, keep], np.ones((len(h), 1))])
        sol = np.linalg.lstsq(a, y, rcond=None)[0]
        out.append(((a @ sol - y) ** 2).sum() / (y ** 2).sum())
    return np.array(out)


def _hidden_group(job):
    (g,) = [g for g in job.groups if not g.frozen and g.width == HID]
    return g


def test_recon_costs_equal_a_brute_force_refit(monkeypatch):
    import onnxprune.plan.importance.recon as recon

    monkeypatch.setattr(recon, "RIDGE", 0.0)  # the formula itself; the default adds a 1e-4 relative ridge
    monkeypatch.setattr(recon, "SHRINK", 0.0)  # and shrinks the covariance by (k / samples)^2
    monkeypatch.setattr(recon, "ROWS_PER_FEATURE", 1 << 30)  # every batch is read (one has 8 rows per feature)
    m, w1, b1, w2 = _mlp()
    cal = _calib()
    job = analyze(m)
    g = _hidden_group(job)
    vals, notes = recon_scores(job.ctx, [g], m, cal, _capture, sequential_ok=False)
    assert not notes
    want = _brute(w1, b1, w2, cal.batches)
    got = vals[g.id]
    np.testing.assert_allclose(got, want, rtol=1e-4)  # float32 activations vs float64 here
    assert int(np.argmin(got)) in PAIR


def test_recon_removes_a_redundant_channel_where_magnitude_removes_the_small_one(monkeypatch):
    import onnxprune.plan.importance.recon as recon

    # all 256 rows: the pair differs by 1% of its variance, under the shrinkage 64 rows would leave, (8/64)^2
    monkeypatch.setattr(recon, "ROWS_PER_FEATURE", 1 << 30)
    m, *_ = _mlp()
    cal = _calib()
    job = analyze(m)
    g = _hidden_group(job)
    l2 = score_groups(job.ctx, [g], {"default": "l2"})
    rc = score_groups(job.ctx, [g], {"default": "recon"}, proto=m, calib=cal)
    assert rc.used[g.id] == "recon"
    assert int(np.argmin(l2.values[g.id])) == SMALL
    first = int(np.argmin(rc.values[g.id]))
    assert first in PAIR
    # sequential: once one of the pair is gone the other is no longer redundant
    other = PAIR[1] if first == PAIR[0] else PAIR[0]
    assert rc.values[g.id][other] > rc.values[g.id][first] * 100
    # and on held-out data, pruning that channel plus ridge recovery beats the l2 choice
    held = _calib(2, 64, seed=7)
    errs = {}
    for crit in ("l2", "recon"):
        res = prune(m, {"layers": {"fc1": 1 / HID}, "scope": "local", "importance": crit}, calib=cal)
        out, rows = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, cal, progress=False, ridge=1e-8)
        sa, sb = runtime.session(m), runtime.session(out)
        num = den = 0.0
        for x in held.batches:
            ya, yb = sa.run(None, {"x": x})[0], sb.run(None, {"x": x})[0]
            num += float(((ya - yb) ** 2).sum())
            den += float((ya ** 2).sum())
        errs[crit] = np.sqrt(num / den)
    assert errs["recon"] < errs["l2"] / 3, errs


def test_cost_scope_ranks_by_score_per_mac():
    """Two groups with equal scores: scope 'cost' takes channels from the one
    whose channels save more MACs; 'global' ranks by score only."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,16,16] x) => (float[1,4,8,8] y) {
        a = Conv <pads = [1,1,1,1]> (x, w1)
        ra = Relu (a)
        b = Conv <pads = [1,1,1,1], strides = [2,2]> (ra, w2)
        rb = Relu (b)
        y = Conv (rb, w3)
    }"""
    m = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for n, s in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (4, 8, 1, 1))):
        m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n))
    job = analyze(m)
    live = [g for g in job.groups if not g.frozen]
    assert len(live) == 2
    unit = job.unit_costs("macs")
    big, small = sorted(live, key=lambda g: -unit[g.id])
    assert unit[big.id] > unit[small.id] > 0  # conv1's channels live at 16x16, conv2's at 8x8
    sc = Scores(values={g.id: np.linspace(1, 2, g.width) for g in live}, unit=unit, used={g.id: "recon" for g in live})
    plan = make_plan(job.ctx, job.groups, Ratios.from_dict({"default": 0.25, "scope": "cost"}), scores=sc)
    assert len(plan.keep[big.id]) == 4 and small.id not in plan.keep
    # scores of another criterion do not compare across layers: each group stays in its own set
    sc.used = {g.id: "l2" for g in live}
    plan = make_plan(job.ctx, job.groups, Ratios.from_dict({"default": 0.25, "scope": "cost"}), scores=sc)
    assert len(plan.keep[big.id]) == 6 and len(plan.keep[small.id]) == 6
    plan = make_plan(job.ctx, job.groups, Ratios.from_dict({"default": 0.25, "scope": "global"}), scores=sc)
    assert len(plan.keep[big.id]) == 6 and len(plan.keep[small.id]) == 6


def _dense_fit(d, m_out):
    return _Fit(row=LayerRow("n", "MatMul", "skipped"), node=None, x_name="", y_name="", kept_out=np.arange(m_out),
                groups=[], w0=[np.zeros((d + 1, m_out))], kind="dense")


def _cv(fit):
    _totals(fit)
    lam, base, cv = _select(fit, 1e-2)
    return lam, cv < base * (1 - 1e-6)


def test_held_out_choice_refuses_a_fit_to_noise():
    """Targets that are noise independent of the inputs: a ridge re-fit only
    fits the calibration rows; the held-out folds say no strength helps."""
    rng = np.random.default_rng(0)
    d, m_out = 40, 6
    fit = _dense_fit(d, m_out)
    for b in range(4):
        _accumulate(fit, [(rng.standard_normal((30, d)), rng.standard_normal((30, m_out)))], np.full(30, b % 2))
    lam, worth = _cv(fit)
    assert not worth
    # the same layer with a real linear target: a strength is chosen and it is worth it
    w = rng.standard_normal((d, m_out))
    fit2 = _dense_fit(d, m_out)
    for b in range(4):
        x = rng.standard_normal((30, d))
        _accumulate(fit2, [(x, x @ w + 0.1 * rng.standard_normal((30, m_out)))], np.full(30, b % 2))
    lam2, worth2 = _cv(fit2)
    assert worth2 and lam2 is not None


def test_folds_hold_out_whole_sources():
    """Samples of one source (crops of one photo) look alike and share a target
    that has nothing to do with the task: folds of samples let a fit memorise
    the sources and call it a gain; folds of sources see it does not carry to
    new ones."""
    rng = np.random.default_rng(1)
    d, m_out, n_src, per = 12, 4, 16, 8
    centre, target = rng.standard_normal((n_src, d)), rng.standard_normal((n_src, m_out))
    src = np.repeat(np.arange(n_src), per)
    x = centre[src] + 0.05 * rng.standard_normal((len(src), d))
    y = target[src] + 0.05 * rng.standard_normal((len(src), m_out))
    feeds = [{"x": x}]
    verdict = {}
    for name, sources in (("samples", None), ("sources", [src])):
        (fold,) = _folds(feeds, sources, seed=0)
        assert set(np.unique(fold)) == {0, 1}
        if sources is not None:  # every source lies in one fold
            assert all(len(np.unique(fold[src == s])) == 1 for s in range(n_src))
        fit = _dense_fit(d, m_out)
        _accumulate(fit, [(x, y)], fold)
        verdict[name] = _cv(fit)[1]
    assert verdict == {"samples": True, "sources": False}


def test_a_share_of_sources_is_kept_out_for_the_whole_model_check():
    src = np.repeat(np.arange(12), 4)
    (fold,) = _folds([{"x": np.zeros((48, 1))}], [src], seed=0, reserve=0.25)
    out = np.unique(src[fold < 0])
    assert len(out) == 3 and all(np.all(fold[src == s] < 0) for s in out)
    (few,) = _folds([{"x": np.zeros((7, 1))}], None, seed=0, reserve=0.25)
    assert np.all(few >= 0)  # fewer than 8 sources: none kept out


def test_recovery_refits_the_layers_after_the_pruned_one():
    """conv1 -> conv2 -> conv3 with only conv1's outputs pruned: conv2 reads
    pruned channels, conv3's input drifts; both are re-fitted, conv1 is not."""
    from test_recover import small_cnn

    m = small_cnn(seed=3)
    job = analyze(m)

    def halve(node):  # keep half of the channels ``node`` produces (conv1's: one group per conv2 group)
        gs = [g for g in job.groups if any(t.role == "out" and t.node.name == node for t in g.tensors)]
        assert gs
        return {g.id: np.arange(g.width // 2) for g in gs}

    assert downstream(job.ctx, halve("conv3")) == ["fc"]
    assert downstream(job.ctx, halve("conv1")) == ["conv2", "conv3", "fc"]
    res = prune(m, {"layers": {"conv1": 0.25}, "scope": "local"})
    assert set(res.plan.keep) <= set(halve("conv1"))
    names = downstream(res.analyzed.ctx, res.plan.keep)
    rng = np.random.default_rng(0)
    cal = [rng.standard_normal((16, 3, 16, 16)).astype(np.float32) for _ in range(4)]
    out, rows = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, cal, progress=False)
    assert {r.node for r in rows} == set(names)
    out2, rows2 = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, cal, progress=False, layers="pruned")
    assert {r.node for r in rows2} == {"conv2"}
    with pytest.raises(ValueError):
        recover(m, res.proto, res.analyzed.ctx, res.plan.keep, cal, progress=False, layers="some")


def test_recover_defaults_to_measured_damage_under_a_budget(tmp_path, capsys):
    r, note = plan_defaults(Ratios.from_dict({"target_macs": 0.5}))
    assert (r.importance, r.scope) == ({"default": "l2", "mlp": "recon", "heads": "recon", "head_dim": "recon"},
                                       "damage") and "damage" in note
    r, note = plan_defaults(Ratios.from_dict({"default": 0.3}))
    assert (r.importance, r.scope) == ("recon", "isomorphic")
    r, note = plan_defaults(Ratios.from_dict({"target_macs": 0.5, "importance": "l2", "scope": "isomorphic"}))
    assert (r.importance, r.scope, note) == ("l2", "isomorphic", "")
    # through the CLI: the report records what was used
    import json

    from onnxprune.cli import main
    from test_recover import small_cnn

    src, out, rep = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(small_cnn(seed=1), str(src))
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32))
    rc = main([str(src), "--ratios", '{"target_macs": 0.7}', "--calib", str(tmp_path / "c.npy"), "--calib-batch-size", "16",
               "--recover", "-o", str(out), "--report", str(rep)])
    assert rc == 0
    assert "--recover: importance l2 (mlp, heads, head_dim: recon), scope damage" in capsys.readouterr().out
    r = json.load(open(rep))
    assert r["ratios"]["importance"]["default"] == "l2" and r["ratios"]["scope"] == "damage"
    assert r["after"]["macs"] <= 0.8 * r["before"]["macs"] and r["recovery"]  # a tiny model: coarse steps


def test_look_alike_images_share_a_source():
    """Crops of a few synthetic 'photos' (each its own colour cast) are grouped
    by photo: no group mixes two photos, and no group holds more than half."""
    from onnxprune.plan.importance.calib import look_alike_sources

    rng = np.random.default_rng(0)
    photos = []
    for p in range(6):
        cast = np.array([-0.7 + 0.28 * p, 0.7 - 0.28 * p, 0.5 * (-1) ** p])[:, None, None]
        base = cast + 0.2 * rng.standard_normal((3, 96, 96))
        photos.append(np.clip(base, -1, 1))
    src = np.repeat(np.arange(6), 6)
    x = np.empty((len(src), 3, 32, 32), np.float32)
    for i, p in enumerate(src):
        r, c = rng.integers(0, 64, 2)
        x[i] = photos[p][:, r:r + 32, c:c + 32]
    ids = look_alike_sources(x)
    assert all(len(np.unique(src[ids == g])) == 1 for g in np.unique(ids))
    assert len(np.unique(ids)) < len(src)  # crops of one photo were joined
    assert np.bincount(ids).max() <= len(src) // 2
    casts = np.linspace(-0.9, 0.9, 10)[:, None, None, None] * np.ones((10, 3, 16, 16), np.float32)
    casts += 0.02 * rng.standard_normal(casts.shape).astype(np.float32)
    assert len(np.unique(look_alike_sources(casts))) == 10  # nothing alike: every image its own source
    assert look_alike_sources(np.zeros((4, 10), np.float32)) is None  # not images


def _scaled_gemm(w, scale):
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], alpha=float(scale))], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_whole_model_check_uses_only_kept_out_samples_and_says_which_is_closer():
    from onnxprune.recover import held_out_check

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    fold = np.array([0, 1] * 6 + [-1] * 4)
    orig, pruned = _scaled_gemm(w, 1.0), _scaled_gemm(w, 0.5)
    better = held_out_check(orig, pruned, _scaled_gemm(w, 0.9), [{"x": x}], [fold], 1)
    assert better["samples"] == 4 and not better["worse"]
    assert better["err_pruned"] == pytest.approx(0.5, rel=1e-4) and better["err_recovered"] == pytest.approx(0.1, rel=1e-3)
    assert better["kl_recovered"] < better["kl_pruned"]
    worse = held_out_check(orig, pruned, _scaled_gemm(-w, 1.0), [{"x": x}], [fold], 1)
    assert worse["worse"] and worse["agree_recovered"] < worse["agree_pruned"]
    # the fitted samples do not count: a model wrong on them only is not "worse"
    x2 = x.copy()
    x2[:12] *= 100
    assert held_out_check(orig, pruned, _scaled_gemm(w, 0.9), [{"x": x2}], [fold], 1)["err_recovered"] == \
        pytest.approx(better["err_recovered"], rel=1e-4)
    assert held_out_check(orig, pruned, pruned, [{"x": x}], [np.zeros(16, int)], 1) is None  # nothing kept out


def test_whole_model_check_leaves_out_what_the_original_overflows_and_refuses_a_model_that_is_not_finite():
    """A kept-out sample on which the original itself overflows (inf) is compared without those
    values, counted and said; a recovered model that gives NaN where the original gives numbers is
    infinitely far (worse), not 'equal' (NaN compares false)."""
    from onnxprune.recover import held_out_check, held_out_text

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    fold = np.array([0, 1] * 6 + [-1] * 4)
    orig, pruned, rec = (_scaled_gemm(w, a * 1e10) for a in (1.0, 0.5, 0.9))
    x_bad = x.copy()
    x_bad[15] = 1e30  # 1e40 after the Gemm: inf in float32, in every model
    h = held_out_check(orig, pruned, rec, [{"x": x_bad}], [fold], 1)
    clean = held_out_check(orig, pruned, rec, [{"x": x[:15]}], [fold[:15]], 1)  # the same without that sample
    assert h["nonfinite"] == 5 and not clean.get("nonfinite")
    for key in ("err_pruned", "err_recovered", "kl_pruned", "kl_recovered", "agree_pruned"):
        assert h[key] == pytest.approx(clean[key], rel=1e-6), key
    assert h["err_recovered"] == pytest.approx(0.1, rel=1e-3) and not h["worse"]
    assert "not finite in 5 values" in held_out_text(h) and "not finite" not in held_out_text(clean)
    nan = held_out_check(orig, pruned, _scaled_gemm(w, float("nan")), [{"x": x}], [fold], 1)
    assert nan["err_recovered"] == np.inf and nan["kl_recovered"] == np.inf and nan["worse"]
    assert nan["agree_recovered"] == 0.0


def test_whole_model_check_weighs_each_output_channel_alike():
    """A detector's one output [N, 4 boxes + classes, anchors]: the boxes
    (large, untouched by the pruning) beside the class scores (small, what the
    pruning and recovery changed). The verdict follows the scores, not the
    noise on the boxes."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.recover import held_out_check

    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 6)).astype(np.float32)

    def detector(scale, box_noise):
        box = (1000 * np.eye(4, 6) + box_noise).astype(np.float32)
        g = helper.make_graph([helper.make_node("MatMul", ["b", "x"], ["boxes"]),
                               helper.make_node("MatMul", ["w", "x"], ["s"]),
                               helper.make_node("Mul", ["s", "k"], ["scores"]),
                               helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 9, 7])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(box, "b"),
                               numpy_helper.from_array(np.array(scale * 1e-3, np.float32), "k")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    x = rng.standard_normal((16, 6, 7)).astype(np.float32)
    fold = np.array([0, 1] * 6 + [-1] * 4)
    orig, pruned = detector(1.0, 0.0), detector(0.5, 0.0)
    rec = detector(0.9, 1e-3 * rng.standard_normal((4, 6)))  # scores much closer; the boxes moved by a hair
    h = held_out_check(orig, pruned, rec, [{"x": x}], [fold], 1)
    assert not h["worse"] and h["err_recovered"] < 0.5 * h["err_pruned"], h
    assert held_out_check(orig, rec, pruned, [{"x": x}], [fold], 1)["worse"]  # and the other way round


def test_a_pruned_model_that_already_matches_is_not_beaten_by_round_off():
    """Pruning that removed nothing the outputs see (KL 0): a recovered model
    differing by float round-off is not called worse; a real step away is."""
    from onnxprune.recover.check import worse

    assert not worse(1.8e-17, 0.0) and not worse(3e-7, 0.0)
    assert worse(1e-3, 0.0) and worse(0.5, 0.4)
    assert not worse(0.4 * (1 + 5e-4), 0.4)  # within the relative tie
    assert worse(float("nan"), 0.4) and not worse(0.4, float("nan"))  # not a number: infinitely far


def _explicit_sequential(states, width):
    """The greedy of recon.sequential with every rank-one update applied at once (the definition)."""
    states = [(H.copy(), W.astype(np.float64).copy(), pos, e) for H, W, pos, e in states]
    alive, score, level = np.ones(width, bool), np.zeros(width), 0.0
    for _ in range(width - 1):
        cost = np.zeros(width)
        for H, W, pos, e in states:
            v = pos >= 0
            cost[v] += (W[pos[v]] ** 2).sum(1) / np.diag(H)[pos[v]] / e
        cost[~alive] = np.inf
        ch = int(np.argmin(cost))
        level = max(level, float(cost[ch]))
        score[ch], alive[ch] = level, False
        for H, W, pos, _ in states:
            p = pos[ch]
            if p < 0:
                continue
            h = H[:, p].copy()
            W -= np.outer(h / h[p], W[p])
            H -= np.outer(h, h) / h[p]
            W[p], H[p, :], H[:, p], H[p, p] = 0.0, 0.0, 0.0, 1.0
    score[alive] = level * 2 + 1e-12
    return score


def test_sequential_with_held_back_updates_equals_the_explicit_greedy():
    from onnxprune.plan.importance import recon

    rng = np.random.default_rng(3)
    width = 3 * recon.FLUSH + 5  # several blocks of held-back updates and a partial one

    def state(k, pos, out):
        x = rng.normal(size=(4 * k, k)) @ rng.normal(size=(k, k)) * 0.3 + rng.normal(size=(4 * k, k))
        H = np.linalg.inv(np.cov(x.T) + 1e-3 * np.eye(k))
        W = rng.normal(size=(k, out))
        return H, W, pos, float((W ** 2).sum())

    full = state(width, np.arange(width), 7)
    half_pos = np.full(width, -1)
    half_pos[::2] = np.arange((width + 1) // 2)  # a consumer that reads every other channel
    half = state((width + 1) // 2, half_pos, 11)
    got = recon.sequential([full, half], width)
    want = _explicit_sequential([full, half], width)
    np.testing.assert_allclose(got, want, rtol=1e-7)
    np.testing.assert_array_equal(np.argsort(got, kind="stable"), np.argsort(want, kind="stable"))


@pytest.mark.parametrize("k", [24, 600])  # float64 products, float32 products
def test_input_sums_give_the_covariance_of_rows_far_from_zero(k):
    """The covariance of inputs whose mean is a hundred times their spread (a
    layer after a ReLU with a large offset) matches float64 numpy: the rows are
    centred before they are multiplied, even in float32."""
    from onnxprune.plan.importance import recon

    rng = np.random.default_rng(0)
    batches = [(100.0 + rng.normal(size=(2, 300, k)) @ rng.normal(size=(k, k)) / np.sqrt(k)).astype(np.float32)
               for _ in range(3)]
    st = recon._Stats(k)
    for b in batches:
        st.add(b, 2, rng)
    rows = np.concatenate([b.reshape(-1, k) for b in batches]).astype(np.float64)
    second, cov = st.moments()
    np.testing.assert_allclose(cov, np.cov(rows.T, bias=True), rtol=1e-3, atol=1e-4 * np.diag(cov).mean())
    np.testing.assert_allclose(second, rows.T @ rows / len(rows), rtol=1e-5)
    assert st.n == len(rows)



def _grid_errors(fit, grid):
    """Held-out error of each strength of ``grid``, by brute force over the folds."""
    from onnxprune.recover.fit import _ridge, _sq_err

    out = {}
    for lam in grid:
        e = 0.0
        for Gv, Cv, yv in fit.folds.values():
            for G, C, W0, g, c, y in zip(fit.G, fit.C, fit.w0, Gv, Cv, yv):
                e += _sq_err(g, c, y, _ridge(G - g, C - c, W0, lam))
        out[lam] = e
    return out


@pytest.mark.parametrize("noise,rows,strong", [(0.01, 200, False), (5.0, 20, True)])
def test_held_out_search_finds_the_grid_best_from_any_start(monkeypatch, noise, rows, strong):
    """The downhill walk over powers of ten lands on the best strength of the
    whole grid (within the 1% the given strength is preferred by) whether it
    starts at the default strength or at fit.SELECT_FROM; where the best lies
    at 1 or above, the start at 1 tries fewer strengths."""
    import onnxprune.recover.fit as fit_mod

    rng = np.random.default_rng(3)
    d, m_out = 30, 4
    w = rng.standard_normal((d, m_out))
    fit = _dense_fit(d, m_out)
    for b in range(4):
        x = rng.standard_normal((rows, d))
        _accumulate(fit, [(x, x @ w + noise * rng.standard_normal((rows, m_out)))], np.full(rows, b % 2))
    _totals(fit)
    grid = [10.0 ** k for k in range(-6, 2)]
    errs = _grid_errors(fit, grid)
    best = min(errs, key=errs.get)
    tried = {}
    real = fit_mod._ridge
    for start in (1e-2, 1.0):
        calls = []
        monkeypatch.setattr(fit_mod, "SELECT_FROM", start)
        monkeypatch.setattr(fit_mod, "_ridge", lambda G, C, W0, lam: calls.append(lam) or real(G, C, W0, lam))
        lam, _, held = _select(fit, 1e-2)
        assert lam is not None and not math.isinf(lam)
        assert held <= errs[best] * 1.01 + 1e-12, (start, lam, best)
        tried[start] = len({v for v in calls if not math.isinf(v)})
    if strong:  # few noisy rows: a strong ridge is best, and the start at 1 is nearer
        assert best >= 1.0 and tried[1.0] < tried[1e-2]
    else:  # many clean rows: a weak one, below the default (the walk goes down from either start)
        assert best <= 1e-3

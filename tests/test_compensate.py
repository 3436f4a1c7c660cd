"""Mean compensation (onnxprune/plan/compensate.py, rewrite.shift_output) and the
bias-only candidate of the ridge strength (onnxprune/recover/fit.py).

(a) shift_output moves a Conv's, a Gemm's (beta) and a MatMul's output (with
    its Add, or a new one) by exactly the given shift per channel, and the
    journal undoes it;
(b) channels that are constant on the data: pruned with their mean folded into
    the consumer's bias the model is exact on inputs the means never saw, without
    it far off; the damage search measures its candidates so and spends the
    budget on exactly those channels;
    the means are captured in shares when a model's activations are wide;
(c) the ridge strength's candidates include the pruned weights with only the
    bias re-fitted, chosen when refitted weights do not carry over between folds.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from onnxprune import runtime
from onnxprune.pipeline import Job
from onnxprune.plan import Ratios
from onnxprune.plan import damage as D
from onnxprune.plan.compensate import MeanShift
from onnxprune.plan.importance.calib import load as load_calib
from onnxprune.recover.fit import _Fit, _ridge, _select
from onnxprune.rewrite import Journal, shift_output
from onnxprune.runtime.capture import capture, channel_sums
from test_recover import _model, _t, small_cnn

# ------------------------------------------------------------------ (a) shift_output


def _run(model: ir.Model, x):
    from onnxprune import io

    return runtime.session(io.full_proto(model)).run(None, {"x": x})[0]


def _conv(bias: bool):
    rng = np.random.default_rng(0)
    ins = ["x", "w", "b"] if bias else ["x", "w"]
    inits = [_t("w", rng.standard_normal((4, 3, 3, 3)))] + ([_t("b", rng.standard_normal(4))] if bias else [])
    return _model([helper.make_node("Conv", ins, ["y"], name="conv", pads=[1, 1, 1, 1])], inits,
                  ["N", 3, 5, 5], "y", ["N", 4, 5, 5]), np.float32(rng.standard_normal((2, 3, 5, 5))), (1, 4, 1, 1)


def _gemm(bias_shape):
    rng = np.random.default_rng(1)
    ins = ["x", "w"] + (["b"] if bias_shape is not None else [])
    inits = [_t("w", rng.standard_normal((4, 6)))] + ([_t("b", rng.standard_normal(bias_shape))] if bias_shape else [])
    node = helper.make_node("Gemm", ins, ["y"], name="fc", transB=1, alpha=0.5, beta=2.0)
    return _model([node], inits, ["N", 6], "y", ["N", 4]), np.float32(rng.standard_normal((3, 6))), (1, 4)


def _matmul(with_add: bool):
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m" if with_add else "y"], name="mm")]
    inits = [_t("w", rng.standard_normal((6, 4)))]
    if with_add:
        nodes.append(helper.make_node("Add", ["b", "m"], ["y"], name="add"))
        inits.append(_t("b", rng.standard_normal(4)))
    return _model(nodes, inits, ["N", 5, 6], "y", ["N", 5, 4]), np.float32(rng.standard_normal((2, 5, 6))), (1, 1, 4)


@pytest.mark.parametrize("make", [lambda: _conv(True), lambda: _conv(False), lambda: _gemm((4,)), lambda: _gemm((1, 4)),
                                  lambda: _gemm(None), lambda: _matmul(True), lambda: _matmul(False)],
                         ids=["conv", "conv-no-bias", "gemm", "gemm-1x4-bias", "gemm-no-bias", "matmul-add", "matmul"])
def test_shift_output_moves_each_output_channel_by_the_shift_and_undoes(make):
    proto, x, shape = make()
    model = ir.serde.deserialize_model(proto)
    before = _run(model, x)
    node = next(n for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul"))
    shift = np.array([1.5, -2.0, 0.25, 3.0])
    j = Journal()
    assert shift_output(node, shift, j)
    moved = _run(model, x)
    np.testing.assert_allclose(moved - before, np.broadcast_to(shift.reshape(shape), before.shape), atol=1e-5)
    j.undo()
    np.testing.assert_array_equal(_run(model, x), before)


# ------------------------------------------------------------------ (b) constant channels


def _constant_cnn(level=0.3):
    """small_cnn whose conv3 has 4 of 12 outputs constant (no weights, bias
    ``level`` > 0 through the Relu) and read by the Gemm head."""
    m = small_cnn(seed=5)
    arr = {t.name: onnx.numpy_helper.to_array(t).copy() for t in m.graph.initializer}
    const = np.array([1, 4, 7, 10])
    arr["w3"][const] = 0
    arr["b3"][const] = level
    del m.graph.initializer[:]
    m.graph.initializer.extend(_t(k, v) for k, v in arr.items())
    return m, const


def _calib(tmp_path, seed=0):
    p = tmp_path / "calib.npy"
    np.save(p, np.random.default_rng(seed).standard_normal((32, 3, 16, 16)).astype(np.float32))
    return str(p)


def _sums(job, calib):
    """MeanShift's ``sums``, taken in numpy from the captured values (the reference for channel_sums)."""
    def run(axes):
        names = sorted(axes)
        got = capture(job.data_proto(), names, [calib.feed(k, ["x"]) for k in range(len(calib.batches))])
        out = {}
        for n in names:
            a = np.concatenate([np.moveaxis(v, axes[n][0], -1).reshape(-1, v.shape[axes[n][0]]) for v in got[n]])
            out[n] = (a.sum(0, dtype=np.float64), len(a))
        return out
    return run


def _head_group(job):
    return next(g for g in job.groups if g.width == 12)


def test_constant_channels_pruned_with_their_mean_folded_in_are_exact(tmp_path):
    m, const = _constant_cnn()
    job = Job.open(m)
    g = _head_group(job)
    calib = load_calib(_calib(tmp_path), job.data_proto(), n_batches=1)
    shift = MeanShift(job.ctx, [g], _sums(job, calib))
    keep = {g.id: np.setdiff1d(np.arange(12), const)}
    x = np.random.default_rng(9).standard_normal((8, 3, 16, 16)).astype(np.float32)  # not the calibration inputs
    ref = runtime.session(job.data_proto()).run(None, {"x": x})
    shifts = shift.shifts(keep)
    assert [n.name for n, _ in shifts] == ["fc"]
    with job.edited(keep, prune=True, shifts=shifts) as p:
        assert D.output_damage(ref, runtime.session(p).run(None, {"x": x})) < 1e-10
    with job.edited(keep, prune=True) as p:
        assert D.output_damage(ref, runtime.session(p).run(None, {"x": x})) > 1e-3
    assert shift.shifts({}) == []  # nothing removed, nothing moved


@pytest.mark.parametrize("opset", [11, 17])
def test_channel_sums_in_the_graph_are_the_sums_of_the_captured_values(tmp_path, opset):
    """The sums ORT takes inside the graph (ReduceSum as an attribute before
    opset 13, an input after) equal numpy's over the captured activations,
    for 4-D conv inputs (channel axis 1) and 2-D Gemm inputs alike, over
    several batches; the shifts built on them are the same."""
    m = small_cnn(seed=6)
    m.opset_import[0].version = opset
    job = Job.open(m)
    groups = [g for g in job.groups if not g.frozen]
    calib = load_calib(_calib(tmp_path), job.data_proto(), n_batches=3, batch=8)
    assert len(calib.batches) == 3
    feeds = [calib.feed(k, ["x"]) for k in range(3)]
    asked = {}

    def in_graph(axes):
        asked.update(axes)
        return channel_sums(job.model, axes, feeds)

    fast = MeanShift(job.ctx, groups, in_graph)
    ranks = {r for _, r in asked.values()}
    assert {2, 4} <= ranks, asked
    ref = _sums(job, calib)(asked)
    got = channel_sums(job.model, asked, feeds)
    for n in asked:
        assert got[n][1] == ref[n][1] > 0
        np.testing.assert_allclose(got[n][0], ref[n][0], rtol=1e-6, atol=1e-6)
    slow = MeanShift(job.ctx, groups, _sums(job, calib))
    keep = {g.id: np.arange(g.width)[::2] for g in groups}
    a, b = fast.shifts(keep), slow.shifts(keep)
    assert [n.name for n, _ in a] == [n.name for n, _ in b] and len(a) > 1
    for (_, x), (_, y) in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)


def test_a_consumer_that_also_loses_outputs_gets_the_shift_of_the_outputs_it_keeps(tmp_path):
    m = small_cnn(seed=6)
    arr = {t.name: onnx.numpy_helper.to_array(t).copy() for t in m.graph.initializer}
    const = np.array([2, 5])  # conv2's outputs, in both of its groups: constant, read by conv3
    for gi in range(2):
        arr["w2"][gi * 8 + const], arr["b2"][gi * 8 + const] = 0, 0.7
    del m.graph.initializer[:]
    m.graph.initializer.extend(_t(k, v) for k, v in arr.items())
    job = Job.open(m)
    g2 = next(g for g in job.groups if g.width == 8 and any(t.node.name == "conv3" and t.slot == 1 for t in g.tensors))
    g3 = _head_group(job)
    calib = load_calib(_calib(tmp_path), job.data_proto(), n_batches=1)
    shift = MeanShift(job.ctx, [g2], _sums(job, calib),
                      every=[g for g in job.groups if not g.frozen])
    sub = np.array([0, 1, 2, 3, 5, 8, 9, 11])  # conv3 keeps 8 of its 12 outputs
    keep = {g2.id: np.setdiff1d(np.arange(8), const), g3.id: sub}
    x = np.random.default_rng(9).standard_normal((8, 3, 16, 16)).astype(np.float32)
    with job.edited({g3.id: sub}, prune=True) as p:  # the same outputs gone, conv2's channels all there
        ref = runtime.session(p).run(None, {"x": x})
    (node, s), = shift.shifts(keep)
    assert node.name == "conv3" and s.shape == (8,)
    with job.edited(keep, prune=True, shifts=[(node, s)]) as p:
        assert D.output_damage(ref, runtime.session(p).run(None, {"x": x})) < 1e-10


def test_the_damage_search_spends_the_budget_on_channels_their_mean_replaces(tmp_path):
    m, const = _constant_cnn()
    job = Job.open(m)
    g = _head_group(job)
    live = np.setdiff1d(np.arange(12), const)
    frac = job.estimator.estimate({g.id: live})["macs"] / job.estimator.before["macs"]
    plan = job.plan(Ratios.from_dict({"target_macs": frac, "scope": "damage", "importance": "l2"}), _calib(tmp_path))
    assert {k: list(v) for k, v in plan.keep.items()} == {g.id: list(live)}
    assert plan.target["met"] and plan.target["damage"] < 1e-9


def test_without_recovery_the_damage_search_prices_the_plan_as_it_is_written(tmp_path):
    """The means folded back are what ``--recover`` writes: a plain prune's
    search measures candidates without them, so the damage it reports is the
    written model's (the constant channels are no longer free), and the API
    passes whether recovery follows."""
    from onnxprune import api

    m, const = _constant_cnn()
    calib_path = _calib(tmp_path)
    job = Job.open(m)
    g = _head_group(job)
    live = np.setdiff1d(np.arange(12), const)
    frac = job.estimator.estimate({g.id: live})["macs"] / job.estimator.before["macs"]
    ratios = Ratios.from_dict({"target_macs": frac, "scope": "damage", "importance": "l2"})
    calib = load_calib(calib_path, job.skeleton())
    plan = job.plan(ratios, calib, recovered=False)
    assert plan.target["compensated"] is False and plan.target["met"]
    feeds, _ = job._damage_feeds(calib, D.SAMPLES)
    sess = runtime.session(job.data_proto())
    ref = [sess.run(None, fd) for fd in feeds]
    with job.edited(plan.keep, prune=True) as proto:
        s2 = runtime.session(proto)
        got = [s2.run(None, fd) for fd in feeds]
    written = float(np.mean([D.output_damage(r, q) for r, q in zip(ref, got)]))
    assert written > 1e-6  # removing the constant channels is not free as written
    assert plan.target["damage"] == pytest.approx(written, rel=1e-6)
    plain = api.prune(m, ratios=ratios.to_dict(), calib=calib_path, progress=False)
    recovered = api.prune(m, ratios=ratios.to_dict(), calib=calib_path, recover="bias", progress=False)
    assert plain.plan.target["compensated"] is False and recovered.plan.target["compensated"] is True


@pytest.mark.parametrize("slow", [False, True])
def test_a_slow_model_takes_the_means_from_the_first_batches_that_hold_the_damage_samples(tmp_path, monkeypatch, slow):
    """The means folded into candidates come from the whole calibration, except
    on a model slow enough to get fewer samples per candidate: there from the
    first batches that hold damage.SAMPLES samples (a ViT-S pass over 128
    samples cost 10 s of a 3-minute budget)."""
    from onnxprune.runtime import capture as cap

    m, _ = _constant_cnn()
    p = tmp_path / "calib.npy"
    np.save(p, np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32))
    job = Job.open(m)
    calib = load_calib(str(p), job.skeleton(), n_batches=8, batch=8)
    assert len(calib.batches) == 8
    seen = []
    real = cap.channel_sums

    def counting(model, axes, feeds, threads=1):
        feeds = list(feeds)
        seen.append(len(feeds))
        return real(model, axes, feeds, threads)

    monkeypatch.setattr(cap, "channel_sums", counting)
    if slow:
        monkeypatch.setattr(D, "RUN_SECONDS", 0.0)  # any model is slow: MIN_SAMPLES per candidate
    plan = job.plan(Ratios.from_dict({"target_macs": 0.8, "scope": "damage", "importance": "l2"}), calib)
    assert plan.target["met"] and seen
    assert set(seen) == ({-(-D.SAMPLES // 8)} if slow else {8})
    assert (-(-D.SAMPLES // 8) < 8) and plan.target["compensated"] is True


# ------------------------------------------------------------------ (c) bias-only candidate


def test_ridge_at_infinite_strength_keeps_the_weights_and_fits_the_bias():
    rng = np.random.default_rng(0)
    X = np.c_[rng.standard_normal((200, 5)), np.ones(200)]
    W0 = rng.standard_normal((6, 3))
    Y = X @ W0 + np.array([1.0, -2.0, 0.5]) + 0.1 * rng.standard_normal((200, 3))
    W = _ridge(X.T @ X, X.T @ Y, W0, math.inf)
    np.testing.assert_array_equal(W[:-1], W0[:-1])
    best = W0.copy()
    best[-1] = np.linalg.lstsq(X[:, -1:], Y - X[:, :-1] @ W0[:-1], rcond=None)[0]
    np.testing.assert_allclose(W, best, atol=1e-10)


def _fold_fit(signs):
    """Two folds whose weights are ``W0 + sign x D`` (``signs``: per fold) and
    share a bias offset."""
    rng = np.random.default_rng(1)
    W0 = rng.standard_normal((6, 3))
    D_ = rng.standard_normal((5, 3))
    fit = _Fit.__new__(_Fit)
    fit.w0, fit.folds = [W0], {}
    G, C, yy = 0, 0, 0
    for k, sign in enumerate(signs):
        X = np.c_[rng.standard_normal((300, 5)), np.ones(300)]
        Wk = W0.copy()
        Wk[:-1] += sign * D_
        Y = X @ Wk + np.array([2.0, -1.0, 0.5])
        st = (X.T @ X, X.T @ Y, (Y**2).sum(0))
        fit.folds[k] = ([st[0]], [st[1]], [st[2]])
        G, C, yy = G + st[0], C + st[1], yy + st[2]
    fit.G, fit.C, fit.yy = [G], [C], [yy]
    return fit


def test_the_bias_alone_is_chosen_when_refitted_weights_do_not_carry_over():
    lam, base, held = _select(_fold_fit((1, -1)), 1e-2)
    assert math.isinf(lam) and held < base
    lam, base, held = _select(_fold_fit((1, 1)), 1e-2)  # the folds agree: weights re-fitted
    assert not math.isinf(lam) and held < base

"""The data criteria on models small enough to differentiate by hand: taylor
and hessian against gradients written out in numpy (a 1x1 Conv, a global pool
and two linear layers), recon against a brute-force least-squares re-fit, and
the fallbacks (a dead ReLU: no gradient, no calibration signal). torch is
imported here, at collection, so each test itself takes a fraction of a second."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import onnx2torch  # noqa: F401  (loaded once, at collection: the importer loads it on first use, seconds)
import onnxprune.torchbridge.importer  # noqa: F401
from onnxprune import runtime  # noqa: F401  (onnxruntime, for the captures)
from onnxprune.api import analyze
from onnxprune.plan.importance import criteria as C
from onnxprune.plan.importance import recon
from onnxprune.plan.importance.calib import Calibration

torch.set_num_threads(1)


def _tiny(text, inits):
    m = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + text)
    for k, v in inits.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(v, np.float32), k))
    return m


# x [B, 3, 4, 4] -> Conv 1x1 (5, "channels") -> Relu -> GlobalAveragePool -> Flatten -> Gemm transB (4, "mlp")
# -> Relu -> MatMul (3 logits; torch holds this weight transposed)
NET = """g (float[B,3,4,4] x) => (float[B,3] y{extra_out}) {{
  [c1] h1 = Conv (x, w1, b1)
  r1 = Relu(h1)
  p = GlobalAveragePool(r1)
  f = Flatten(p)
  [fc] h2 = Gemm <transB=1> (f, w2, b2)
  r2 = Relu(h2)
  [out] y = MatMul(r2, w3)
  {extra}
}}"""


def _net(seed=0, dead=False, two_outputs=False):
    rng = np.random.default_rng(seed)
    w = {"w1": rng.standard_normal((5, 3, 1, 1)), "b1": rng.standard_normal(5) * 0.3,
         "w2": rng.standard_normal((4, 5)), "b2": rng.standard_normal(4) * 0.3, "w3": rng.standard_normal((4, 3))}
    if dead:
        w["b1"] = np.full(5, -100.0)  # every ReLU of the first layer is off for any input below
    text = NET.format(extra_out=", float[B,3] z" if two_outputs else "", extra="z = Sigmoid(y)" if two_outputs else "")
    return _tiny(text, w), {k: np.asarray(v, np.float32).astype(np.float64) for k, v in w.items()}


def _batches(seed, n=3, b=4):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, 3, 4, 4)).astype(np.float32) for _ in range(n)]


def _grads(w, x, y=None):
    """Forward and backward in float64: mean cross-entropy with label smoothing 0.1
    (labels y, else the argmax of the logits); returns the weight gradients."""
    x = x.astype(np.float64)
    h1 = np.einsum("oc,bcij->boij", w["w1"][:, :, 0, 0], x) + w["b1"][None, :, None, None]
    r1 = np.maximum(h1, 0)
    f = r1.mean((2, 3))
    h2 = f @ w["w2"].T + w["b2"]
    r2 = np.maximum(h2, 0)
    z = r2 @ w["w3"]
    if y is None:
        y = z.argmax(1)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.full_like(p, 0.1 / z.shape[1])
    q[np.arange(len(y)), y] += 0.9
    dz = (p - q) / len(y)
    g = {"w3": r2.T @ dz}
    dh2 = (dz @ w["w3"].T) * (h2 > 0)
    g["w2"], g["b2"] = dh2.T @ f, dh2.sum(0)
    dh1 = np.broadcast_to((dh2 @ w["w2"])[:, :, None, None] / 16, h1.shape) * (h1 > 0)
    g["w1"] = np.einsum("boij,bcij->oc", dh1, x)[:, :, None, None]
    g["b1"] = dh1.sum((0, 2, 3))
    return g


def _per_channel(w, t):
    """Channel sums of per-element arrays ``t`` over each group's slices: the 5 conv channels (rows of w1, b1,
    columns of w2) and the 4 hidden features (rows of w2, b2, rows of w3)."""
    return {"channels": t["w1"].sum((1, 2, 3)) + t["b1"] + t["w2"].sum(0),
            "mlp": t["w2"].sum(1) + t["b2"] + t["w3"].sum(1)}


def _taylor(w, xs, ys):
    gs = [_grads(w, x, y) for x, y in zip(xs, ys or [None] * len(xs))]
    return _per_channel(w, {k: np.abs(w[k] * sum(g[k] for g in gs)) for k in w})


def _hessian(w, xs, ys):
    gs = [_grads(w, x, y) for x, y in zip(xs, ys or [None] * len(xs))]
    return _per_channel(w, {k: sum((w[k] * g[k]) ** 2 for g in gs) for k in w})


def _run(m, spec, calib, seed=0):
    a = analyze(m)
    live = {g.kind: g for g in a.groups if not g.frozen}
    assert sorted(live) == ["channels", "mlp"] and live["channels"].width == 5 and live["mlp"].width == 4
    return live, C.score_groups(a.ctx, a.groups, spec, seed, proto=m, calib=calib)


@pytest.mark.parametrize("crit", ["taylor", "hessian"])
def test_one_data_criterion_by_hand(crit):
    m, w = _net(1)
    xs = _batches(2)
    ys = [np.random.default_rng(k).integers(0, 3, 4) for k in range(3)]
    live, sc = _run(m, {"default": crit}, Calibration(xs, ys, "test"))
    want = (_taylor if crit == "taylor" else _hessian)(w, xs, ys)
    for kind, g in live.items():
        np.testing.assert_allclose(sc.values[g.id], want[kind], rtol=1e-4)
        assert sc.used[g.id] == crit and g.id not in sc.notes
        assert np.ptp(want[kind]) > 0.05 * want[kind].max()  # the channels differ: an ordering is tested


def test_taylor_and_hessian_in_one_spec_without_labels():
    # no labels: the model's own predictions are the targets
    m, w = _net(3)
    xs = _batches(4)
    live, sc = _run(m, {"channels": "taylor", "mlp": "hessian"}, Calibration(xs, None, "test"))
    np.testing.assert_allclose(sc.values[live["channels"].id], _taylor(w, xs, None)["channels"], rtol=1e-4)
    np.testing.assert_allclose(sc.values[live["mlp"].id], _hessian(w, xs, None)["mlp"], rtol=1e-4)
    assert sc.used == {live["channels"].id: "taylor", live["mlp"].id: "hessian"} and not sc.notes
    # a fixed label set gives other scores than the predictions do (the labels are read when given)
    ys = [np.zeros(4, np.int64)] * 3
    _, sc2 = _run(m, {"channels": "taylor", "mlp": "hessian"}, Calibration(xs, ys, "test"))
    np.testing.assert_allclose(sc2.values[live["channels"].id], _taylor(w, xs, ys)["channels"], rtol=1e-4)
    assert not np.allclose(sc2.values[live["channels"].id], sc.values[live["channels"].id], rtol=1e-3)


def test_the_first_output_is_the_logits():
    m, w = _net(5, two_outputs=True)
    xs = _batches(6, n=2)
    ys = [np.array([0, 1, 2, 1]), np.array([2, 2, 0, 1])]
    live, sc = _run(m, {"default": "taylor"}, Calibration(xs, ys, "test"))
    want = _taylor(w, xs, ys)
    for kind, g in live.items():
        np.testing.assert_allclose(sc.values[g.id], want[kind], rtol=1e-4)


@pytest.mark.parametrize("labelled", [True, False])
def test_sequence_logits_are_flattened(labelled):
    # logits [B, T, 3] with labels [B, T] (else the argmax at each position): cross-entropy over every position
    rng = np.random.default_rng(8)
    w = {"w1": rng.standard_normal((6, 5)), "w2": rng.standard_normal((5, 3))}
    m = _tiny("""g (float[2,4,6] x) => (float[2,4,3] y) {
  [fc1] h = MatMul (x, w1)
  r = Relu(h)
  [fc2] y = MatMul (r, w2)
}""", w)
    w = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in w.items()}
    xs = [rng.standard_normal((2, 4, 6)).astype(np.float32) for _ in range(2)]
    ys = [rng.integers(0, 3, (2, 4)) for _ in range(2)] if labelled else None
    tot = {"w1": 0, "w2": 0}
    for k, x in enumerate(xs):
        x2 = x.reshape(8, 6).astype(np.float64)
        h = x2 @ w["w1"]
        r = np.maximum(h, 0)
        z = r @ w["w2"]
        y2 = ys[k].reshape(8) if labelled else z.argmax(1)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        q = np.full_like(p, 0.1 / 3)
        q[np.arange(8), y2] += 0.9
        dz = (p - q) / 8
        tot["w2"] = tot["w2"] + r.T @ dz
        tot["w1"] = tot["w1"] + x2.T @ ((dz @ w["w2"].T) * (h > 0))
    want = np.abs(w["w1"] * tot["w1"]).sum(0) + np.abs(w["w2"] * tot["w2"]).sum(1)
    a = analyze(m)
    (g,) = [g for g in a.groups if not g.frozen]
    sc = C.score_groups(a.ctx, a.groups, {"default": "taylor"}, proto=m, calib=Calibration(xs, ys, "test"))
    np.testing.assert_allclose(sc.values[g.id], want, rtol=1e-4)


def test_gemm_weights_held_transposed():
    # Gemm without transB: torch holds B [in, out] as a Linear weight [out, in]; the scores are in ONNX layout
    rng = np.random.default_rng(12)
    w = {"w1": rng.standard_normal((6, 5)), "b1": rng.standard_normal(5) * 0.3, "w2": rng.standard_normal((5, 3))}
    m = _tiny("""g (float[4,6] x) => (float[4,3] y) {
  [fc1] h = Gemm (x, w1, b1)
  r = Relu(h)
  [fc2] y = Gemm (r, w2)
}""", w)
    w = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in w.items()}
    xs = [rng.standard_normal((4, 6)).astype(np.float32) for _ in range(2)]
    ys = [np.array([0, 1, 2, 0]), np.array([2, 1, 1, 0])]
    tot = {"w1": 0, "b1": 0, "w2": 0}
    for x, y in zip(xs, ys):
        x = x.astype(np.float64)
        h = x @ w["w1"] + w["b1"]
        r = np.maximum(h, 0)
        z = r @ w["w2"]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        q = np.full_like(p, 0.1 / 3)
        q[np.arange(4), y] += 0.9
        dz = (p - q) / 4
        dh = (dz @ w["w2"].T) * (h > 0)
        tot["w2"] = tot["w2"] + r.T @ dz
        tot["w1"] = tot["w1"] + x.T @ dh
        tot["b1"] = tot["b1"] + dh.sum(0)
    want = np.abs(w["w1"] * tot["w1"]).sum(0) + np.abs(w["b1"] * tot["b1"]) + np.abs(w["w2"] * tot["w2"]).sum(1)
    a = analyze(m)
    (g,) = [g for g in a.groups if not g.frozen]
    sc = C.score_groups(a.ctx, a.groups, {"default": "taylor"}, proto=m, calib=Calibration(xs, ys, "test"))
    np.testing.assert_allclose(sc.values[g.id], want, rtol=1e-4)


def test_calibration_message_names_every_data_criterion():
    m, _ = _net(0)
    a = analyze(m)
    with pytest.raises(C.UserError) as e:
        C.score_groups(a.ctx, a.groups, {"channels": "taylor", "mlp": "activation"}, proto=m, calib=None)
    assert str(e.value) == "importance activation, taylor needs calibration data: --calib DIR | FILE.npy | synthetic"


def test_dead_relu_falls_back():
    m, w = _net(7, dead=True)
    xs = _batches(8, n=2)
    l2 = np.sqrt((w["w1"] ** 2).sum((1, 2, 3)) + w["b1"] ** 2 + (w["w2"] ** 2).sum(0))
    for crit in ("taylor", "hessian"):
        live, sc = _run(m, {"channels": crit, "mlp": "l1"}, Calibration(xs, None, "test"))
        g = live["channels"]
        assert sc.used[g.id] == "l2" and sc.notes[g.id] == "no gradient reached this group's tensors; l2 used"
        np.testing.assert_allclose(sc.values[g.id], l2, rtol=1e-6)
        assert sc.used[live["mlp"].id] == "l1" and live["mlp"].id not in sc.notes
    # recon: the dead channels carry nothing to the consumer; activation (all zero) is used
    live, sc = _run(m, {"channels": "recon", "mlp": "l1"}, Calibration(xs, None, "test"))
    g = live["channels"]
    assert sc.used[g.id] == "activation" and sc.notes[g.id] == "no calibration signal at the consumers; activation used"
    np.testing.assert_array_equal(sc.values[g.id], np.zeros(5))


def _refit_error(r, w, drop):
    """Relative squared output error of the layer y = r @ w once input ``drop`` is removed and the
    remaining weights and a bias are re-fitted by least squares."""
    y = r @ w
    keep = [i for i in range(r.shape[1]) if i != drop]
    a = np.concatenate([r[:, keep], np.ones((len(r), 1))], 1)
    fit, *_ = np.linalg.lstsq(a, y, rcond=None)
    return ((a @ fit - y) ** 2).sum() / (y ** 2).sum()


def _two_gemms(rng):
    """x [50, 6] -> Gemm (5 hidden, bias) -> Relu -> Gemm (3): the model and its weights drawn from ``rng``."""
    w = {"w1": rng.standard_normal((5, 6)), "b1": rng.standard_normal(5), "w2": rng.standard_normal((3, 5))}
    m = _tiny("""g (float[50,6] x) => (float[50,3] y) {
  [fc1] h = Gemm <transB=1> (x, w1, b1)
  r = Relu(h)
  [fc2] y = Gemm <transB=1> (r, w2)
}""", w)
    return m, w


def test_recon_cheapest_channel_is_the_least_squares_refit(monkeypatch):
    monkeypatch.setattr(recon, "RIDGE", 0.0)
    monkeypatch.setattr(recon, "SHRINK", 0.0)
    monkeypatch.setattr(recon, "ROWS_PER_FEATURE", 1 << 30)  # both batches are read (one has 10 rows per feature)
    rng = np.random.default_rng(9)
    m, w = _two_gemms(rng)
    w = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in w.items()}
    xs = [rng.standard_normal((50, 6)).astype(np.float32) for _ in range(2)]
    a = analyze(m)
    (g,) = [g for g in a.groups if not g.frozen]
    sc = C.score_groups(a.ctx, a.groups, {"default": "recon"}, proto=m, calib=Calibration(xs, None, "test"))
    assert sc.used[g.id] == "recon" and not sc.notes
    r = np.concatenate([np.maximum(x.astype(np.float64) @ w["w1"].T + w["b1"], 0) for x in xs])
    errs = [_refit_error(r, w["w2"].T, c) for c in range(5)]
    s = sc.values[g.id]
    assert s.shape == (5,) and int(np.argmin(s)) == int(np.argmin(errs))
    np.testing.assert_allclose(s.min(), min(errs), rtol=1e-4)
    assert (np.diff(np.sort(s)) > 0).all()  # removal order: strictly increasing


def test_recon_samples_rows_with_the_seed(monkeypatch):
    monkeypatch.setattr(recon, "MAX_ROWS", 5)  # the consumer (after the pool) reads 8 rows a batch: 5 are drawn
    m, _ = _net(10)
    xs = _batches(11, n=3, b=8)
    cal = Calibration(xs, None, "test")
    a = analyze(m)
    (g,) = [g for g in a.groups if g.kind == "channels" and not g.frozen]
    runs = [C.score_groups(a.ctx, a.groups, {"channels": "recon", "mlp": "l2"}, s, proto=m, calib=cal).values[g.id]
            for s in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])
    default = C.score_groups(a.ctx, a.groups, {"channels": "recon", "mlp": "l2"}, proto=m, calib=cal).values[g.id]
    np.testing.assert_array_equal(default, C.score_groups(a.ctx, a.groups, {"channels": "recon", "mlp": "l2"}, 0,
                                                          proto=m, calib=cal).values[g.id])


def test_recon_reads_batches_only_until_every_covariance_has_enough_rows(monkeypatch):
    """fc2 reads 5 features and each batch gives 50 rows: at 8 rows per feature the first batch is
    enough and the other three are never run; at 25 rows per feature (125 rows) three are run. The
    scores are then those of the batches read."""
    rng = np.random.default_rng(4)
    m, w = _two_gemms(rng)
    xs = [rng.standard_normal((50, 6)).astype(np.float32) for _ in range(4)]
    a = analyze(m)
    (g,) = [g for g in a.groups if not g.frozen]
    ran = []
    capture = C._capture

    def counted(*args, **kw):
        for k, vals in capture(*args, **kw):
            ran.append(k)
            yield k, vals

    monkeypatch.setattr(C, "_capture", counted)

    def scores(batches):
        ran.clear()
        s = C.score_groups(a.ctx, a.groups, {"default": "recon"}, proto=m, calib=Calibration(batches, None, "test"))
        return s.values[g.id], list(ran)

    monkeypatch.setattr(recon, "ROWS_PER_FEATURE", 8)
    s4, read = scores(xs)
    assert read == [0]
    np.testing.assert_array_equal(s4, scores(xs[:1])[0])
    monkeypatch.setattr(recon, "ROWS_PER_FEATURE", 25)
    s4, read = scores(xs)
    assert read == [0, 1, 2]
    np.testing.assert_array_equal(s4, scores(xs[:3])[0])
    assert not np.allclose(s4, scores(xs[:1])[0])

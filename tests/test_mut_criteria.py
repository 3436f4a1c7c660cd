"""Importance criteria on models small enough to work out by hand: norm scale
(BatchNorm gamma), the fallbacks and their notes, seeded random draws, GOHSP's
matrix and power iteration, and GOHSP's head scores on a two-head attention
computed in numpy. No torch here: these run in a second."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.api import analyze
from onnxprune.errors import UserError
from onnxprune.plan import Ratios
from onnxprune.plan.importance import criteria as C
from onnxprune.plan.importance.calib import Calibration


def _tiny(text, inits):
    m = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + text)
    for k, v in inits.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(v, np.float32), k))
    return m


RNG = np.random.default_rng(21)
# x [2, 3, 4, 4] -> Conv 3 -> 5 (1x1) -> BatchNorm (gamma GAMMA) -> Relu -> Conv 5 -> 2: one group of 5
GAMMA = np.array([0.5, -2.0, 1.0, -0.25, 3.0])
BN = {"w1": RNG.standard_normal((5, 3, 1, 1)), "g": GAMMA, "b": RNG.standard_normal(5), "mu": RNG.standard_normal(5),
      "var": 1 + RNG.random(5), "w2": RNG.standard_normal((2, 5, 1, 1))}


def _bn():
    return _tiny("""g (float[2,3,4,4] x) => (float[2,2,4,4] y) {
  [c1] h = Conv (x, w1)
  n = BatchNormalization (h, g, b, mu, var)
  r = Relu(n)
  [c2] y = Conv (r, w2)
}""", BN)


def _only(a):
    (g,) = [g for g in a.groups if not g.frozen]
    return g


def _scores(m, spec, calib=None, seed=0):
    a = analyze(m)
    return a, a.scores(Ratios.from_dict({"importance": spec, "seed": seed}), calib)


def test_bn_scale_is_abs_gamma():
    a, sc = _scores(_bn(), "bn_scale")
    g = _only(a)
    np.testing.assert_allclose(sc.values[g.id], np.abs(GAMMA), rtol=1e-6)
    assert sc.used[g.id] == "bn_scale" and g.id not in sc.notes


def test_l2_and_l1_with_a_batch_norm():
    a, l2 = _scores(_bn(), "l2")
    _, l1 = _scores(_bn(), "l1")
    g = _only(a)
    w = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in BN.items()}
    # channel c's slices: row c of w1, entry c of every BatchNorm parameter, column c of w2
    sq = (w["w1"] ** 2).sum((1, 2, 3)) + sum(w[k] ** 2 for k in ("g", "b", "mu", "var")) + (w["w2"] ** 2).sum((0, 2, 3))
    ab = np.abs(w["w1"]).sum((1, 2, 3)) + sum(np.abs(w[k]) for k in ("g", "b", "mu", "var")) + np.abs(w["w2"]).sum((0, 2, 3))
    np.testing.assert_allclose(l2.values[g.id], np.sqrt(sq), rtol=1e-6)
    np.testing.assert_allclose(l1.values[g.id], ab, rtol=1e-6)
    assert l2.used[g.id] == "l2" and l1.used[g.id] == "l1"


MLP = """g (float[4,6] x) => (float[4,3] y) {
  [fc1] h = Gemm <transB=1> (x, w1, b1)
  r = Relu(h)
  [fc2] y = Gemm <transB=1> (r, w2)
}"""


def _mlp():
    w = {"w1": RNG.standard_normal((5, 6)), "b1": RNG.standard_normal(5), "w2": RNG.standard_normal((3, 5))}
    return _tiny(MLP, w), {k: np.asarray(v, np.float32).astype(np.float64) for k, v in w.items()}


def test_fallbacks_to_l2_are_noted():
    m, w = _mlp()
    want = np.sqrt((w["w1"] ** 2).sum(1) + w["b1"] ** 2 + (w["w2"] ** 2).sum(0))
    a, sc = _scores(m, "bn_scale")
    g = _only(a)
    assert sc.used[g.id] == "l2" and sc.notes[g.id] == "no normalisation scale in this group; l2 used"
    np.testing.assert_allclose(sc.values[g.id], want, rtol=1e-6)
    a, sc = _scores(m, "gohsp", Calibration([np.zeros((4, 6), np.float32)], None, "test"))
    g = _only(a)
    assert sc.used[g.id] == "l2" and sc.notes[g.id] == "gohsp ranks heads only; l2 used for this mlp group"
    np.testing.assert_allclose(sc.values[g.id], want, rtol=1e-6)
    assert sc.gohsp == {}


def test_data_criteria_need_calibration():
    m, _ = _mlp()
    for crit in ("activation", "taylor", "hessian", "recon"):
        with pytest.raises(UserError) as e:
            _scores(m, crit)
        assert str(e.value) == f"importance {crit} needs calibration data: --calib DIR | FILE.npy | synthetic"
    a = analyze(m)
    with pytest.raises(UserError, match="^importance activation needs calibration"):
        C.score_groups(a.ctx, a.groups, {"default": "activation"}, proto=None,
                       calib=Calibration([np.zeros((4, 6), np.float32)], None, "test"))
    with pytest.raises(UserError, match="^importance activation needs calibration"):
        C.score_groups(a.ctx, a.groups, {"default": "taylor", "mlp": "activation"}, proto=m, calib=None)


def test_random_is_uniform_seeded_in_group_order():
    m = _tiny("""g (float[1,3,4,4] x) => (float[1,2,4,4] y) {
  [c1] h = Conv (x, w1)
  r = Relu(h)
  [c2] h2 = Conv (r, w2)
  r2 = Relu(h2)
  [c3] y = Conv (r2, w3)
}""", {"w1": RNG.standard_normal((4, 3, 1, 1)), "w2": RNG.standard_normal((6, 4, 3, 3)), "w3": RNG.standard_normal((2, 6, 1, 1))})
    a = analyze(m)
    live = [g for g in a.groups if not g.frozen]
    assert [g.width for g in live] == [4, 6]
    sc = a.scores(Ratios.from_dict({"importance": "random", "seed": 5}))
    draws = np.random.default_rng(5).random(10)  # one uniform stream, groups in order
    np.testing.assert_array_equal(sc.values[live[0].id], draws[:4])
    np.testing.assert_array_equal(sc.values[live[1].id], draws[4:])
    assert all(sc.used[g.id] == "random" for g in live) and not sc.notes
    # a per-kind spec: kinds not named take the default
    assert C.criterion_for({"heads": "gohsp", "default": "l1"}, "channels") == "l1"
    assert C.criterion_for({"heads": "gohsp", "default": "l1"}, "heads") == "gohsp"
    assert C.criterion_for({"heads": "gohsp"}, "mlp") == "l2"


def test_after_group_is_called_once_per_live_group():
    m, _ = _mlp()
    a = analyze(m)
    seen = []
    C.score_groups(a.ctx, a.groups, {"default": "l2"}, after_group=seen.append)
    assert seen == [g for g in a.groups if not g.frozen]


def test_per_channel_sums_and_means_by_hand():
    per = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    lm = np.array([0, 2, 0, -1, 2])
    np.testing.assert_array_equal(C._per_channel(per, lm, 4), [4.0, 0.0, 7.0, 0.0])
    np.testing.assert_array_equal(C._per_channel(per, lm, 4, "mean"), [2.0, 0.0, 3.5, 0.0])


@pytest.mark.parametrize("chunk", [1, 5, 7, 1 << 20])
def test_slice_norms_in_any_chunking(chunk):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10
    for axis in range(3):
        per = [np.take(arr, i, axis=axis).astype(np.float64) for i in range(arr.shape[axis])]
        np.testing.assert_allclose(C._slice_norms(arr, axis, True, chunk), [(p ** 2).sum() for p in per])
        np.testing.assert_allclose(C._slice_norms(arr, axis, False, chunk), [np.abs(p).sum() for p in per])
    assert C._slice_norms(np.zeros((3, 0)), 0, True).tolist() == [0.0, 0.0, 0.0]


def test_gohsp_matrix_by_hand():
    v = np.array([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0], [0.0, 0.0]])
    c = 1 / np.sqrt(2)  # cos(v0, v1); v2 opposes v0 (clamped to 0); v3 is zero: no similarity
    raw = np.array([[1, c, 0, 0], [c, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    want = raw / np.array([1 + c, 1 + c, 1, 1])[None, :]
    np.testing.assert_allclose(C.gohsp_matrix(v), want, atol=1e-15)


def test_power_iteration_by_hand(monkeypatch):
    # column-stochastic P, stationary (2/3, 1/3); from (1/2, 1/2) the step shrinks 0.7x each time:
    # |s_k - s_(k-1)|_1 = 0.1 x 0.7^(k-1) <= 1e-12 first at k = 73
    P = np.array([[0.9, 0.2], [0.1, 0.8]])
    s, it = C._power_iteration(P)
    np.testing.assert_allclose(s, [2 / 3, 1 / 3], atol=1e-11)
    assert 72 <= it <= 74
    s, P2, it = C.gohsp_scores(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    # heads 0 and 2 agree, head 1 stands alone: two closed classes, the uniform start stays put
    np.testing.assert_allclose(P2, [[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]])
    np.testing.assert_allclose(s, [1 / 3] * 3)
    assert it == 1
    monkeypatch.setattr(C, "GOHSP_MAX_ITERS", 3)
    s, it = C._power_iteration(P)
    # three steps from (1/2, 1/2): s_k = s* + 0.7^k (1/2 - 2/3, ...)
    np.testing.assert_allclose(s, [2 / 3 - 0.7 ** 3 / 6, 1 / 3 + 0.7 ** 3 / 6])
    assert it == 3


# -- GOHSP on a two-head attention, head outputs computed here in numpy ----------------------------
ATT = """g (float[B,3,4] x) => (float[B,3,4] y) {
  [q] q0 = MatMul(x, wq)
  [k] k0 = MatMul(x, wk)
  [v] v0 = MatMul(x, wv)
  q1 = Reshape(q0, s4)
  k1 = Reshape(k0, s4)
  v1 = Reshape(v0, s4)
  q2 = Transpose <perm=[0,2,1,3]> (q1)
  k2 = Transpose <perm=[0,2,3,1]> (k1)
  v2 = Transpose <perm=[0,2,1,3]> (v1)
  s0 = MatMul(q2, k2)
  p = Softmax <axis=-1> (s0)
  o0 = MatMul(p, v2)
  o1 = Transpose <perm=[0,2,1,3]> (o0)
  o2 = Reshape(o1, s3)
  [proj] y = MatMul(o2, wo)
}"""


def _stationary(vectors):
    """Cosine matrix, clamped, column-normalised; the limit of P^k on the uniform start by squaring."""
    u = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    P = np.maximum(u @ u.T, 0)
    P = P / P.sum(0, keepdims=True)
    Q = P.copy()
    for _ in range(40):
        Q = Q @ Q
        Q = Q / Q.sum(0, keepdims=True)
    return Q @ np.full(len(P), 1.0 / len(P))


def test_gohsp_head_scores_by_hand():
    rng = np.random.default_rng(3)
    w = {k: rng.standard_normal((4, 4)) for k in ("wq", "wk", "wv", "wo")}
    m = _tiny(ATT, {**w, "s4": [0, 3, 2, 2], "s3": [0, 3, 4]})
    for k in ("s4", "s3"):  # int64 shapes
        i = [t.name for t in m.graph.initializer].index(k)
        m.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.array(numpy_helper.to_array(m.graph.initializer[i]),
                                                                         np.int64), k))
    w = {k: v.astype(np.float32).astype(np.float64) for k, v in w.items()}
    xs = [rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(2)]
    a = analyze(m)
    (heads,) = [g for g in a.groups if g.kind == "heads" and not g.frozen]
    sc = a.scores(Ratios.from_dict({"importance": {"heads": "gohsp"}}), Calibration(xs, None, "test"))
    # head h's output: softmax(q_h k_h^T) v_h, [B, 3 rows, 2 dims]; summed over every sample of every batch
    tot = np.zeros((2, 3, 2))
    for x in xs:
        x = x.astype(np.float64)
        for h in range(2):
            cols = slice(2 * h, 2 * h + 2)
            q, k, v = (x @ w[n][:, cols] for n in ("wq", "wk", "wv"))
            s = q @ k.transpose(0, 2, 1)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            tot[h] += (p @ v).sum(0)
    want = _stationary(tot.reshape(2, -1))
    np.testing.assert_allclose(sc.values[heads.id], want, atol=1e-6)
    assert sc.used[heads.id] == "gohsp"
    info = sc.gohsp[heads.id]
    assert info["samples"] == 4 and info["negatives_clamped"] is True and info["iterations"] >= 1
    np.testing.assert_allclose(info["stationary"], want, atol=1e-6)
    u = tot.reshape(2, -1) / np.linalg.norm(tot.reshape(2, -1), axis=1, keepdims=True)
    P = np.maximum(u @ u.T, 0)
    np.testing.assert_allclose(info["P"], P / P.sum(0, keepdims=True), atol=1e-6)
    assert info["value"] in {n.output[0] for n in m.graph.node if n.op_type in ("MatMul", "Transpose", "Reshape")}
    # activation on the same model: mean |value| where each group is read
    sc2 = a.scores(Ratios.from_dict({"importance": "activation"}), Calibration(xs, None, "test"))
    assert all(sc2.used[g.id] == "activation" for g in a.groups if not g.frozen)
    assert all((sc2.values[g.id] >= 0).all() and sc2.values[g.id].any() for g in a.groups if not g.frozen)


# -- three heads of two dims, batches of 4: GOHSP's scores are not uniform, activation averages a head's dims --
ATT3 = ATT.replace("float[B,3,4] x", "float[B,3,6] x").replace("float[B,3,4] y", "float[B,3,6] y")


def _att3():
    rng = np.random.default_rng(17)
    w = {k: rng.standard_normal((6, 6)) for k in ("wq", "wk", "wv", "wo")}
    m = _tiny(ATT3, w)
    for k, v in (("s4", [0, 3, 3, 2]), ("s3", [0, 3, 6])):
        m.graph.initializer.append(numpy_helper.from_array(np.array(v, np.int64), k))
    # batches of 4 (not 3, the head count): the batch is split off axis 0 of the [B, heads, rows, dims] output
    xs = [rng.standard_normal((4, 3, 6)).astype(np.float32) for _ in range(2)]
    return m, {k: v.astype(np.float32).astype(np.float64) for k, v in w.items()}, xs


def _heads_out(w, x):
    """[B, 3 rows, 3 heads, 2 dims]: softmax(q_h k_h^T) v_h of every head."""
    x = x.astype(np.float64)
    out = np.zeros(x.shape[:2] + (3, 2))
    for h in range(3):
        cols = slice(2 * h, 2 * h + 2)
        q, k, v = (x @ w[n][:, cols] for n in ("wq", "wk", "wv"))
        s = q @ k.transpose(0, 2, 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, h] = p @ v
    return out


def test_gohsp_three_heads_by_hand():
    m, w, xs = _att3()
    a = analyze(m)
    (heads,) = [g for g in a.groups if g.kind == "heads" and not g.frozen]
    sc = a.scores(Ratios.from_dict({"importance": {"heads": "gohsp"}}), Calibration(xs, None, "test"))
    tot = sum(_heads_out(w, x).sum(0) for x in xs)  # [3 rows, 3 heads, 2 dims], every sample summed
    vec = tot.transpose(1, 0, 2).reshape(3, -1)
    want = _stationary(vec)
    assert np.ptp(want) > 1e-3  # three heads: not uniform
    np.testing.assert_allclose(sc.values[heads.id], want, atol=1e-6)
    assert sc.gohsp[heads.id]["samples"] == 8


def test_activation_of_heads_is_the_mean_over_their_dims():
    m, w, xs = _att3()
    a = analyze(m)
    (heads,) = [g for g in a.groups if g.kind == "heads" and not g.frozen]
    sc = a.scores(Ratios.from_dict({"importance": "activation"}), Calibration(xs, None, "test"))
    # read where the output projection reads the heads: mean |head output| over samples, rows and its 2 dims
    want = np.mean([np.abs(_heads_out(w, x)).mean((0, 1, 3)) for x in xs], 0)
    np.testing.assert_allclose(sc.values[heads.id], want, rtol=1e-5)
    assert sc.used[heads.id] == "activation"


def test_score_groups_default_seed_is_zero():
    m, _ = _mlp()
    a = analyze(m)
    g = _only(a)
    sc = C.score_groups(a.ctx, a.groups, {"default": "random"})
    np.testing.assert_array_equal(sc.values[g.id], np.random.default_rng(0).random(g.width))


def test_l2_of_a_quantized_weight_reads_its_dequantized_values():
    q1 = np.array(RNG.integers(-100, 100, (4, 3, 1, 1)), np.int8)
    s1, z1 = np.array([0.1, 0.02, 0.3, 0.05], np.float32), np.array([3, -2, 5, 0], np.int8)
    w2 = RNG.standard_normal((2, 4, 1, 1)).astype(np.float32)
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,4,4] x) => (float[1,2,4,4] y) {
  w1 = DequantizeLinear <axis=0> (q1, s1, z1)
  [c1] h = Conv (x, w1)
  r = Relu (h)
  [c2] y = Conv (r, w2)
}""")
    for k, v in (("q1", q1), ("s1", s1), ("z1", z1), ("w2", w2)):
        m.graph.initializer.append(numpy_helper.from_array(v, k))
    a, sc = _scores(m, "l2")
    g = _only(a)
    deq = (q1.astype(np.float64) - z1[:, None, None, None]) * s1.astype(np.float64)[:, None, None, None]
    # channel c: row c of the dequantized weight, its scale (a float member), column c of w2; the int8 zero
    # point is not a float tensor and adds nothing
    want = np.sqrt((deq ** 2).sum((1, 2, 3)) + s1.astype(np.float64) ** 2 + (w2.astype(np.float64) ** 2).sum((0, 2, 3)))
    np.testing.assert_allclose(sc.values[g.id], want, rtol=1e-5)

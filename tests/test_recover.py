"""Closed-form recovery (onnxprune/recover/): small hand-built models, fast.

(a) the recovered model is valid and closer to the original than the pruned one
    on held-out inputs (CNN with a grouped strided conv, a token MLP with 3-D
    MatMuls, and the trained reference ViT);
(b) channels planted dead: pruning is exact and recovery changes nothing;
(c) a linear model whose kept inputs span the removed ones is reconstructed
    exactly by the closed form.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import runtime
from onnxprune.api import prune
from onnxprune.errors import UserError
from onnxprune.recover import LayerRow, format_rows, recover

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"


def _t(name, arr):
    return numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name)


def _model(nodes, inits, x_shape, y_name, y_shape, opset=20):
    g = helper.make_graph(
        nodes, "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, y_shape)],
        initializer=inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def small_cnn(seed=0, dead=None):
    """x[N,3,16,16] -> Conv 3->16 -> Relu -> Conv 16->16 (group 2, stride 2) -> Relu
    -> Conv 16->12 1x1 -> Relu -> GAP -> Flatten -> Gemm 12->5 (transB).
    ``dead``: plant that many channels dead in each hidden layer (producer rows,
    biases and consumer columns zero; for the grouped conv, per group)."""
    rng = np.random.default_rng(seed)

    def w(*s):
        return rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))

    w1, b1 = w(16, 3, 3, 3), 0.1 * rng.standard_normal(16)
    w2, b2 = w(16, 8, 3, 3), 0.1 * rng.standard_normal(16)
    w3, b3 = w(12, 16, 1, 1), 0.1 * rng.standard_normal(12)
    w4, b4 = w(5, 12), 0.1 * rng.standard_normal(5)
    if dead:
        # conv1 -> conv2 (grouped: the same per-group channels in both groups)
        d1 = rng.choice(8, dead[0], replace=False)
        for gi in range(2):
            idx = gi * 8 + d1
            w1[idx], b1[idx] = 0, 0
            w2[gi * 8:(gi + 1) * 8][:, d1] = 0
        d2 = rng.choice(8, dead[1], replace=False)  # conv2's per-group outputs
        for gi in range(2):
            idx = gi * 8 + d2
            w2[idx], b2[idx] = 0, 0
            w3[:, idx] = 0
        d3 = rng.choice(12, dead[2], replace=False)
        w3[d3], b3[d3] = 0, 0
        w4[:, d3] = 0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2], group=2),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], name="fc", transB=1),
    ]
    inits = [_t("w1", w1), _t("b1", b1), _t("w2", w2), _t("b2", b2), _t("w3", w3), _t("b3", b3), _t("w4", w4), _t("b4", b4)]
    return _model(nodes, inits, ["N", 3, 16, 16], "y", ["N", 5])


def token_mlp(seed=0, linear=False, hidden=24):
    """x[N,T,8] -> MatMul 8->hidden + Add -> Gelu -> MatMul hidden->16 (no bias) ->
    LayerNorm-free residual-free head: ReduceMean over tokens -> Gemm 16->4.
    ``linear``: no Gelu, and the second MatMul is the output (so the model is
    linear and its hidden layer spans at most 8 + 1 dimensions)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, hidden)) / np.sqrt(8)
    b1 = 0.5 * rng.standard_normal(hidden)
    w2 = rng.standard_normal((hidden, 16)) / np.sqrt(hidden)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["h"], name="fc1_bias"),
    ]
    inits = [_t("w1", w1), _t("b1", b1), _t("w2", w2)]
    if linear:
        nodes.append(helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"))
        return _model(nodes, inits, ["N", 6, 8], "y", ["N", 6, 16])
    w3 = rng.standard_normal((4, 16)) / 4
    nodes += [
        helper.make_node("Gelu", ["h"], ["g"], name="gelu"),
        helper.make_node("MatMul", ["g", "w2"], ["m2"], name="fc2"),
        helper.make_node("ReduceMean", ["m2", "axes"], ["pooled"], name="pool", keepdims=0),
        helper.make_node("Gemm", ["pooled", "w3"], ["y"], name="head", transB=1),
    ]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "axes"), _t("w3", w3)]
    return _model(nodes, inits, ["N", 6, 8], "y", ["N", 4])


def _batches(shape, n, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _rel(a_proto, b_proto, batches):
    sa, sb = runtime.session(a_proto), runtime.session(b_proto)
    num = den = 0.0
    for x in batches:
        ya, yb = sa.run(None, {"x": x})[0], sb.run(None, {"x": x})[0]
        num += float(((ya - yb) ** 2).sum())
        den += float((ya ** 2).sum())
    return float(np.sqrt(num / den))


def _valid(proto):
    onnx.checker.check_model(proto, full_check=True)
    runtime.session(proto).run(None, runtime.random_inputs(proto, batch=3))


def _run(model, ratios, calib, **kw):
    res = prune(model, ratios)
    out, rows = recover(model, res.proto, res.analyzed.ctx, res.plan.keep, calib, progress=False, **kw)
    return res, out, rows


# --------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("method", ["ridge", "bias", "stats"])
def test_cnn_recovery_is_valid_and_closer(method):
    m = small_cnn()
    m_bytes = m.SerializeToString()
    calib = _batches((16, 3, 16, 16), 4, seed=1)
    held = _batches((16, 3, 16, 16), 2, seed=2)
    res, out, rows = _run(m, {"default": 0.5}, calib, method=method)
    _valid(out)
    print(format_rows(rows))
    by = {r.node: r for r in rows}
    assert set(by) == {"conv2", "conv3", "fc"}  # exactly the consumers of pruned channels
    assert all(r.status == "refit" for r in rows), format_rows(rows)
    assert by["conv2"].features == 4 * 9  # kept channels per group x kernel: handled per group
    e_pruned, e_rec = _rel(m, res.proto, held), _rel(m, out, held)
    margin = {"ridge": 0.5, "bias": 0.9, "stats": 0.9}[method]
    assert e_pruned > 0.2
    assert e_rec < margin * e_pruned, (e_pruned, e_rec)
    for r in rows:
        assert r.err_after <= r.err_before + 1e-9
    # the inputs are not modified: the pruned proto recovery read is byte for byte a fresh prune's
    assert res.proto.SerializeToString() == prune(m, {"default": 0.5}).proto.SerializeToString()
    assert m.SerializeToString() == m_bytes  # nor is the original


def test_activations_that_overflow_skip_their_fits_instead_of_failing():
    """Calibration inputs far outside the model's range (here 1e38 times the
    usual scale) overflow float32 activations to inf: the layers whose sums
    are not finite are skipped with that reason, the rest of the run goes on,
    and the written model is valid (the SVD of a NaN matrix used to stop the run)."""
    m = small_cnn()
    calib = [np.clip(x, -3, 3) * np.float32(1e38) for x in _batches((16, 3, 16, 16), 4, seed=1)]
    assert all(np.all(np.isfinite(x)) for x in calib)  # finite inputs; the first conv's sums overflow
    res, out, rows = _run(m, {"default": 0.5}, calib)
    reasons = [r.reason for r in rows if r.status == "skipped"]
    assert any("not finite" in r for r in reasons), [(r.node, r.status, r.reason) for r in rows]
    _valid(out)


def test_token_mlp_matmul_3d_and_inserted_bias():
    m = token_mlp()
    calib = _batches((32, 6, 8), 4, seed=1)
    held = _batches((32, 6, 8), 2, seed=2)
    res, out, rows = _run(m, {"default": 0.5}, calib)
    _valid(out)
    by = {r.node: r for r in rows}
    assert by["fc2"].status == "refit" and by["fc2"].op == "MatMul"
    # tokens flattened to rows: once the whole-model check on an eighth of the 128 samples (each its own
    # source, kept out of every fit) has passed, recovery is done again on all of them
    assert by["fc2"].samples == 4 * 32 * 6
    _, _, first = _run(m, {"default": 0.5}, calib, refit_all=False)
    assert {r.node: r for r in first}["fc2"].samples == (4 * 32 - 16) * 6
    # fc2 had no bias: recovery added one after it, keeping the output names
    assert any(n.op_type == "Add" and n.name.startswith("fc2__recover_bias") for n in out.graph.node)
    assert [o.name for o in out.graph.output] == ["y"]
    e_pruned, e_rec = _rel(m, res.proto, held), _rel(m, out, held)
    assert e_rec < 0.6 * e_pruned, (e_pruned, e_rec)


@pytest.mark.skipif(not (MODELS / "ref_vit.onnx").exists(), reason="models/ref_vit.onnx missing")
def test_reference_vit_qkv_proj_fc2_head():
    m = onnx.load(str(MODELS / "ref_vit.onnx"))
    calib = _batches((8, 3, 64, 64), 2, seed=1)
    held = _batches((8, 3, 64, 64), 1, seed=2)
    ratios = {"kinds": {"mlp": 0.3, "head_dim": 0.3, "embed": 0.1}, "scope": "local"}
    res, out, rows = _run(m, ratios, calib, rows_per_batch=256)
    _valid(out)
    print(format_rows(rows))
    layers = [r for r in rows if r.method != "qk-logits"]
    assert all(r.status == "refit" for r in layers), format_rows(rows)
    assert {r.op for r in layers} == {"MatMul", "Gemm"}
    assert len(layers) == 4 * 4 + 1  # qkv, proj, fc1, fc2 per block (embed feeds them all) and the head
    logits = [r for r in rows if r.method == "qk-logits"]  # head dims went: q.k^T re-fitted jointly per block
    assert len(logits) == 4 and all(r.held_after < r.held_before for r in logits), format_rows(rows)
    e_pruned, e_rec = _rel(m, res.proto, held), _rel(m, out, held)
    assert e_rec < 0.8 * e_pruned, (e_pruned, e_rec)


# --------------------------------------------------------------------------- (b)


@pytest.mark.parametrize("method", ["ridge", "bias", "stats"])
def test_planted_dead_channels_change_nothing(method):
    # ratio 0.4 per group: 3 of 8 channels per conv group, 4 of 12, and none of
    # the 2 conv groups; exactly what is planted
    m = small_cnn(dead=(3, 3, 4))
    calib = _batches((16, 3, 16, 16), 3, seed=1)
    held = _batches((16, 3, 16, 16), 2, seed=2)
    res, out, rows = _run(m, {"default": 0.4, "scope": "local"}, calib, method=method)
    assert {r.node for r in rows} == {"conv2", "conv3", "fc"}
    _valid(out)
    assert _rel(m, res.proto, held) < 1e-5  # the planted channels were the ones removed
    assert _rel(m, out, held) < 1e-4
    for r in rows:
        assert r.err_before < 1e-5 and r.err_after < 1e-5, format_rows(rows)
    a = {t.name: numpy_helper.to_array(t) for t in res.proto.graph.initializer}
    for t in out.graph.initializer:
        base = t.name.split("__")[0] if t.name not in a else t.name
        if base in a and a[base].shape == tuple(t.dims):
            w = numpy_helper.to_array(t)
            assert np.abs(w - a[base]).max() <= 1e-4 * (np.abs(a[base]).max() + 1e-6), t.name


def residual_mlp(seed=0, hidden=32, width=16, shortcut=False, layer_scale=False):
    """x[N,6,8] -> embed MatMul 8->width = s0; block 0: MatMul + Add -> Relu ->
    MatMul (fc_b0), added to s0 (or, with ``shortcut``, to a MatMul fc_s of s0);
    block 1 the same with a hidden bias of 4 (its Relu never clips: a linear
    block), added to the stream: the output y[N,6,width]. ``layer_scale``: each
    block's output multiplied by a constant per channel before the Add."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "win"], ["s0"], name="embed")]
    inits = [_t("win", rng.standard_normal((8, width)) / np.sqrt(8))]
    skip = "s0"
    if shortcut:
        nodes.append(helper.make_node("MatMul", ["s0", "ws"], ["short"], name="fc_s"))
        inits.append(_t("ws", rng.standard_normal((width, width)) / np.sqrt(width)))
        skip = "short"
    s = "s0"
    for i, hb in enumerate((0.0, 4.0)):
        a, b = rng.standard_normal((width, hidden)) / np.sqrt(width), rng.standard_normal((hidden, width)) / np.sqrt(hidden)
        inits += [_t(f"a{i}", a), _t(f"ab{i}", hb + 0.3 * rng.standard_normal(hidden)), _t(f"b{i}", b)]
        out = "s1" if i == 0 else "y"
        nodes += [helper.make_node("MatMul", [s, f"a{i}"], [f"m{i}"], name=f"fc_a{i}"),
                  helper.make_node("Add", [f"m{i}", f"ab{i}"], [f"h{i}"], name=f"bias_a{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("MatMul", [f"r{i}", f"b{i}"], [f"o{i}"], name=f"fc_b{i}")]
        branch = f"o{i}"
        if layer_scale:
            inits.append(_t(f"gamma{i}", rng.uniform(0.2, 2.0, width)))
            nodes.append(helper.make_node("Mul", [branch, f"gamma{i}"], [f"ls{i}"], name=f"scale{i}"))
            branch = f"ls{i}"
        nodes.append(helper.make_node("Add", [branch, skip if i == 0 else s], [out], name=f"res{i}"))
        s = out
    return _model(nodes, inits, ["N", 6, 8], "y", ["N", 6, width])


@pytest.mark.parametrize("seed,layer_scale", [(0, False), (1, False), (2, False), (0, True), (1, True)])
def test_residual_branch_takes_up_what_the_stream_lost(seed, layer_scale):
    # block 0 loses half its hidden units: what its re-fit cannot give back
    # stays in the stream; block 1's last layer, added to that stream (through
    # a layer scale or not), is fitted to the original's sum minus the pruned
    # stream and takes part of it up
    m = residual_mlp(seed, layer_scale=layer_scale)
    calib = _batches((32, 6, 8), 4, seed=1)
    held = _batches((32, 6, 8), 2, seed=2)
    ratios = {"layers": {"fc_a0": 0.5}}
    res, plain, rows0 = _run(m, ratios, calib, residual=False)
    _, out, rows = _run(m, ratios, calib)
    _valid(out)
    by = {r.node: r for r in rows}
    assert by["fc_b1"].status == "refit", format_rows(rows)
    # the table marks the layers fitted to the sum, and only those
    assert {r.node for r in rows if r.target == "stream"} == {"fc_b0", "fc_b1"}
    assert "* fitted to the original's residual sum" in format_rows(rows)
    assert not any(r.target == "stream" for r in rows0) and "residual sum" not in format_rows(rows0)
    e_pruned, e_plain, e_res = _rel(m, res.proto, held), _rel(m, plain, held), _rel(m, out, held)
    assert e_plain < 0.6 * e_pruned
    assert e_res < 0.93 * e_plain, (e_pruned, e_plain, e_res)


@pytest.mark.parametrize("kind,shape,scale_shape", [("conv", (2, 6, 3, 3), (6, 1, 1)), ("conv", (2, 6, 3, 3), None),
                                                     ("dense", (2, 4, 6), (6,)), ("dense", (2, 4, 6), (1,))])
def test_stream_target_gives_the_original_sum(kind, shape, scale_shape):
    # the target t of a layer with kept outputs k: scale * t + r_pruned is the
    # original's scale * y + r on k (channels scaled by almost nothing excepted)
    from types import SimpleNamespace

    from onnxprune.recover import _with_stream_error

    rng = np.random.default_rng(0)
    axis = 1 if kind == "conv" else len(shape) - 1
    kept = np.array([0, 2, 3, 5])
    y, r_o = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    r_p = np.take(r_o, kept, axis=axis) + 0.3 * rng.standard_normal(np.take(r_o, kept, axis=axis).shape).astype(np.float32)
    scale = None if scale_shape is None else rng.uniform(0.1, 3.0, scale_shape)
    if scale is not None and scale.size > 1:
        scale.reshape(-1)[3] = 1e-9  # a channel the scale all but removes
    t = _with_stream_error(SimpleNamespace(kind=kind, kept_out=kept), y, r_o, r_p, scale)
    s = np.ones(shape[axis]) if scale is None else np.broadcast_to(scale.reshape(-1), (shape[axis],))
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    s = s.reshape(bshape)
    want = np.take(s * y + r_o, kept, axis=axis)
    got = np.take(s * t, kept, axis=axis) + r_p
    live = [i for i, k in enumerate(kept) if abs(s.reshape(-1)[k]) > 1e-6]
    np.testing.assert_allclose(np.take(got, live, axis=axis), np.take(want, live, axis=axis), rtol=1e-4, atol=1e-4)
    dead = [i for i, k in enumerate(kept) if abs(s.reshape(-1)[k]) <= 1e-6]
    np.testing.assert_array_equal(np.take(np.take(t, kept, axis=axis), dead, axis=axis),
                                  np.take(np.take(y, kept, axis=axis), dead, axis=axis))
    removed = [i for i in range(shape[axis]) if i not in kept]  # not fitted: left as they were
    np.testing.assert_array_equal(np.take(t, removed, axis=axis), np.take(y, removed, axis=axis))


def test_residual_target_only_from_a_final_stream(monkeypatch):
    # fc_b0 is added to fc_s's output: fc_s (level 0) is re-fitted before
    # fc_b0 (level 1), so fc_b0 may take up its error, but not the other way
    # round (the two would both correct for each other); fc_b1 reads the stream s1
    import onnxprune.recover as rc

    seen = {}

    def spy(*a, **k):
        got = real(*a, **k)
        seen.update(got)
        return got

    real = rc._residuals
    monkeypatch.setattr(rc, "_residuals", spy)
    m = residual_mlp(0, shortcut=True)
    calib = _batches((32, 6, 8), 4, seed=1)
    _, out, rows = _run(m, {"default": 0.5}, calib)
    _valid(out)
    by = {r.node: r for r in rows}
    assert {"fc_s", "fc_b0", "fc_b1"} <= {n for n, r in by.items() if r.status == "refit"}, format_rows(rows)
    assert {k: v[0] for k, v in seen.items()} == {"fc_b0": "short", "fc_b1": "s1"}
    assert all(v[1] is None for v in seen.values())
    seen.clear()
    m = residual_mlp(0, layer_scale=True)  # the scale is read from the original, per channel
    _run(m, {"default": 0.5}, calib)
    gamma = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert set(seen) == {"fc_b0", "fc_b1"}
    for k, (r, scale) in seen.items():
        np.testing.assert_array_equal(scale, gamma["gamma" + k[-1]])


# --------------------------------------------------------------------------- (c)


def test_linear_model_is_reconstructed_exactly():
    # hidden 24 from an 8-dim input: any 12 kept hidden units (plus a bias) span
    # the removed ones, so the closed form must reproduce the output exactly
    m = token_mlp(linear=True)
    calib = _batches((32, 6, 8), 3, seed=1)
    held = _batches((32, 6, 8), 2, seed=2)
    res, out, rows = _run(m, {"default": 0.5}, calib, ridge=0.0)
    _valid(out)
    assert [r.node for r in rows] == ["fc2"] and rows[0].status == "refit"
    assert _rel(m, res.proto, held) > 0.1
    assert rows[0].err_after < 1e-5
    assert _rel(m, out, held) < 1e-4
    # a small ridge stays close to exact; the bias alone cannot do it
    _, out_r, _ = _run(m, {"default": 0.5}, calib, ridge=1e-6)
    assert _rel(m, out_r, held) < 1e-2
    _, out_b, _ = _run(m, {"default": 0.5}, calib, method="bias")
    assert _rel(m, out_b, held) > 0.05


def linear_convs(group, strides, dilations, pads, seed=0):
    """x[N,3,12,12] -> Conv 1x1 3->16 (+bias) -> Conv 3x3 16->8 (group, strides,
    dilations, pads): linear, every hidden channel an affine function of x."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((16, 3, 1, 1)), rng.standard_normal(16)
    w2, b2 = rng.standard_normal((8, 16 // group, 3, 3)) / 6, rng.standard_normal(8)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
        helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="conv2", group=group, strides=strides,
                         dilations=dilations, pads=pads),
    ]
    return _model(nodes, [_t("w1", w1), _t("b1", b1), _t("w2", w2), _t("b2", b2)], ["N", 3, 12, 12], "y", ["N", 8, "H", "W"])


@pytest.mark.parametrize("group,strides,dilations,pads", [
    (1, [1, 1], [1, 1], [1, 1, 1, 1]),
    (2, [2, 2], [1, 1], [1, 0, 1, 2]),
    (1, [1, 2], [2, 1], [2, 0, 2, 1]),
])
def test_linear_conv_is_reconstructed_exactly(group, strides, dilations, pads):
    # im2col of the kept channels (kernel order, padding, stride, dilation, groups)
    # must match ONNX's Conv exactly: 10 (or 5 per group) kept channels span 3 + 1 dims
    m = linear_convs(group, strides, dilations, pads)
    calib = _batches((8, 3, 12, 12), 3, seed=1)
    held = _batches((8, 3, 12, 12), 2, seed=2)
    res, out, rows = _run(m, {"default": 0.4, "scope": "local"}, calib, ridge=0.0)
    _valid(out)
    assert [r.node for r in rows] == ["conv2"] and rows[0].status == "refit", format_rows(rows)
    assert _rel(m, res.proto, held) > 0.1
    assert rows[0].err_after < 1e-5
    assert _rel(m, out, held) < 1e-4


# --------------------------------------------------------------------------- robustness


def test_unhandled_layers_are_skipped_with_a_reason():
    m = small_cnn()
    res = prune(m, {"default": 0.5})
    # an "original" whose nodes have other names: nothing can be matched
    other = onnx.ModelProto()
    other.CopyFrom(m)
    for n in other.graph.node:
        n.name = n.name + "_x"
    out, rows = recover(other, res.proto, res.analyzed.ctx, res.plan.keep, _batches((4, 3, 16, 16), 1, 0), progress=False)
    assert rows and all(r.status == "skipped" and "not found" in r.reason for r in rows)
    _valid(out)
    assert isinstance(rows[0], LayerRow)
    with pytest.raises(ValueError):
        recover(m, res.proto, res.analyzed.ctx, res.plan.keep, [], method="nope")


def test_recover_result_takes_a_prune_result_and_a_calibration(tmp_path):
    from onnxprune.plan.importance.calib import Calibration
    from onnxprune.recover import recover_result

    m = small_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    res = prune(str(path), {"default": 0.5})
    cal = Calibration(_batches((8, 3, 16, 16), 2, seed=1), None, "random")
    out, rows = recover_result(res, str(path), cal, method="bias", progress=False)
    _valid(out)
    assert {r.node for r in rows} == {"conv2", "conv3", "fc"} and all(r.status == "refit" for r in rows)


def test_cli_recover_holds_out_sources_and_prints_the_check(tmp_path, capsys):
    """``--recover`` from an .npz naming the source of each sample: the run
    prints per-layer held-out errors, the whole-model check on the kept-out
    sources and the time split; the report carries the rows."""
    import json

    from onnxprune.cli import main

    m = small_cnn()
    path, out, rep = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(m, str(path))
    x = np.concatenate(_batches((32, 3, 16, 16), 4, seed=1))
    np.savez(tmp_path / "cal.npz", x=x, source=np.arange(len(x)) % 10)  # 10 sources of 12 or 13 samples
    rc = main([str(path), "--ratios", '{"default": 0.5, "importance": "l2"}', "--calib", str(tmp_path / "cal.npz"),
               "--recover", "-o", str(out), "--report", str(rep)])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "held-out before" in text and "recovery time:" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("held-out check ("))
    kept_out = int(line.split("(")[1].split(" samples")[0])
    timing = next(ln for ln in text.splitlines() if ln.startswith("recovery time:"))
    assert line.endswith("the written fits also learnt from the kept-out sources (the checked ones, without them, are "
                         "what this judges)") and "the second, on every source" not in timing
    assert kept_out in (12, 13)  # 1 whole source of the 10 (an eighth of the samples alone would give 16 of 128)
    report = json.loads(rep.read_text())
    rows, st = report["recovery"], report["recovery_stats"]
    assert st["held_out"]["samples"] == kept_out and st["held_out"]["shadow"] is True
    assert st["run_s"] > 0 and st["passes"] > 0 and "refit_all_s" not in st
    fitted = [r for r in rows if r["status"] == "refit"]
    assert fitted and all(r["held_after"] < r["held_before"] for r in fitted)
    assert all(r["samples"] > 0 for r in fitted)


def test_one_pass_writes_fits_on_every_source_and_the_check_judges_fits_without_the_kept_out_ones():
    """The whole-model check keeps an eighth of the sources out; in one pass each
    layer is solved without them (the checked fits, which the check runs) and
    with them (the written fits: the same model as a recovery that kept none
    out). ``refit_all=True`` recovers again on every source after a checked
    pass; ``refit_all=False`` writes the checked pass."""
    import onnxprune.recover as R
    import onnxprune.recover.check as C
    from onnxprune.plan.importance.calib import Calibration
    from onnxprune.recover.fit import _folds

    m = small_cnn()
    xb = _batches((32, 3, 16, 16), 4, seed=1)
    src = [np.arange(32 * i, 32 * (i + 1)) % 10 for i in range(4)]
    feeds = [{"x": b} for b in xb]
    fold = _folds(feeds, src, 0, reserve=R.CHECK_FRACTION)
    for b, f in zip(xb, fold):  # the kept-out source unlike the others: fits that learnt from it differ
        b[f < 0] = b[f < 0] * 3 + 1
    cal = Calibration(xb, None, "random", sources=src)
    res = prune(m, {"default": 0.5, "importance": "l2"})

    def rec(**kw):
        stats: dict = {}
        out, _ = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, cal, progress=False, stats=stats, **kw)
        _valid(out)
        return out, runtime.session(out).run(None, {"x": x})[0], stats

    x = _batches((16, 3, 16, 16), 1, seed=7)[0]
    # one fixed ridge strength: the written fits are then those of a recovery that kept nothing out
    _, one, st = rec(ridge_select=False)
    _, every, st0 = rec(ridge_select=False, check_fraction=0.0)
    _, checked, st1 = rec(ridge_select=False, refit_all=False)
    assert st["held_out"]["shadow"] is True and "the written fits also learnt" in R.held_out_text(st["held_out"])
    assert st0.get("held_out") is None  # nothing kept out: no check
    np.testing.assert_allclose(one, every, rtol=1e-4, atol=1e-5)
    assert np.abs(one - checked).max() > 1e-4  # the kept-out sources changed the fits
    _, unchecked, _ = rec(ridge_select=False, validate=False)  # no check: nothing kept out
    np.testing.assert_allclose(unchecked, every, rtol=1e-4, atol=1e-5)
    assert st["passes"] == st1["passes"] <= st0["passes"] + 1  # one pass each (+ the outputs for the check)
    # the check ran the checked fits, not the written ones: the written model, which learnt from the kept-out
    # sources, is closer to the original on them than the check says
    out, default, st = rec()
    _, unscaled, _ = rec(scale_ridge=False)  # the cross-validated strength as chosen: other fits
    assert np.abs(default - unscaled).max() > 1e-5
    written = C.held_out_check(m, res.proto, out, feeds, fold, 1)
    assert not st["held_out"]["worse"] and st["held_out"]["samples"] == written["samples"] > 0
    assert st["held_out"]["err_pruned"] == pytest.approx(written["err_pruned"], rel=1e-5)
    assert written["err_recovered"] < st["held_out"]["err_recovered"] * 0.9
    # two passes: checked, then again on every source (the same model as keeping none out)
    _, again, st2 = rec(refit_all=True)
    _, every, st3 = rec(check_fraction=0.0)
    assert st2["held_out"]["refit_all"] is True and "then recovered again on every source" in R.held_out_text(st2["held_out"])
    np.testing.assert_allclose(again, every, rtol=1e-5, atol=1e-5)
    assert st2["passes"] == st["passes"] + st3["passes"] and st2["refit_all_s"] > 0
    _, _, st4 = rec(refit_all=False)
    assert "never saw the kept-out sources" in R.held_out_text(st4["held_out"]) and "shadow" not in st4["held_out"]


def test_the_whole_model_check_reads_both_frontiers_and_matches_running_the_models(monkeypatch):
    """The check takes the original's and the recovered model's outputs from
    recovery's frontiers (only the pruned model runs again from the input, and
    the recovered proto on one sample); its numbers are those of running the
    three models on the kept-out samples."""
    import onnxprune.recover.check as C
    from onnxprune.plan.importance.calib import Calibration
    from onnxprune.recover import CHECK_FRACTION
    from onnxprune.recover.fit import _folds

    m = small_cnn()
    xb = _batches((32, 3, 16, 16), 4, seed=1)
    src = [np.arange(32 * i, 32 * (i + 1)) % 10 for i in range(4)]
    cal = Calibration(xb, None, "random", sources=src)
    res = prune(m, {"default": 0.5, "importance": "l2"})
    runs = []
    real = C._outputs
    monkeypatch.setattr(C, "_outputs", lambda proto, feeds, threads: runs.append(sum(len(f["x"]) for f in feeds))
                        or real(proto, feeds, threads))
    stats: dict = {}
    out, _ = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, cal, progress=False, stats=stats, refit_all=False)
    got = stats["held_out"]
    feeds = [{"x": b} for b in xb]
    fold = _folds(feeds, src, 0, reserve=CHECK_FRACTION)
    assert runs == [got["samples"]] and 0 < got["samples"] < 128  # the pruned model only, on the kept-out samples
    runs.clear()
    want = C.held_out_check(m, res.proto, out, feeds, fold, 1)
    assert len(runs) == 3 and got["outputs"] == want["outputs"] == 1
    for k in ("err_pruned", "err_recovered", "agree_pruned", "agree_recovered", "kl_pruned", "kl_recovered"):
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    assert got["err_recovered"] < got["err_pruned"]


def test_the_api_runs_the_recovery_stage(tmp_path):
    from onnxprune.errors import UserError

    m = small_cnn(seed=2)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "c.npy", rng.standard_normal((64, 3, 16, 16)).astype(np.float32))
    calib = str(tmp_path / "c.npy")
    plain = prune(m, {"default": 0.5, "importance": "l2"})
    res = prune(m, {"default": 0.5, "importance": "l2"}, calib=calib, recover="ridge")  # fields written win
    assert res.recovery and any(r.status == "refit" for r in res.recovery) and "run_s" in res.recovery_stats
    assert {g: list(k) for g, k in res.plan.keep.items()} == {g: list(k) for g, k in plain.plan.keep.items()}
    x = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)  # not the calibration inputs
    ref = runtime.session(m).run(None, {"x": x})[0]

    def err(p):
        return float(np.linalg.norm(runtime.session(p).run(None, {"x": x})[0] - ref) / np.linalg.norm(ref))
    assert err(res.proto) < err(plain.proto)
    assert res.checks  # the recovered model was validated
    budget = prune(m, {"target_macs": 0.8}, calib=calib, recover="ridge")  # as --recover: the budget's defaults
    assert budget.plan.target["scope"] == "damage" and budget.plan.criteria == {"channels": "l2"}
    with pytest.raises(UserError, match="calib"):
        prune(m, {"default": 0.5}, recover="ridge")
    with pytest.raises(UserError, match="recover must be one of"):
        prune(m, {"default": 0.5}, calib=calib, recover="lasso")


@pytest.mark.parametrize("scale_shape,budget", [(None, 5), ((6,), 5), ((1,), 100), ((6,), 100)])
def test_dense_rows_take_the_stream_error_on_the_sampled_rows_alone(scale_shape, budget):
    # what the dense path adds after sampling equals the sampled rows of the whole target
    from types import SimpleNamespace

    from onnxprune.recover import _stream_inverse, _with_stream_error
    from onnxprune.recover.fit import _dense_rows

    rng = np.random.default_rng(1)
    kept = np.array([0, 2, 3, 5])
    x = rng.standard_normal((3, 4, 7)).astype(np.float32)
    y, r_o = rng.standard_normal((3, 4, 6)).astype(np.float32), rng.standard_normal((3, 4, 6)).astype(np.float32)
    r_p = r_o[..., kept] + 0.5 * rng.standard_normal((3, 4, 4)).astype(np.float32)
    scale = None if scale_shape is None else rng.uniform(0.1, 3.0, scale_shape)
    f = SimpleNamespace(kind="dense", kept_out=kept, dense={})
    ok, inv = _stream_inverse(f, y, r_o, r_p, scale)
    assert ok
    rows, sample = _dense_rows(f, x, y, np.random.default_rng(7), budget, (r_o, r_p, inv))
    whole, sample_w = _dense_rows(f, x, _with_stream_error(f, y, r_o, r_p, scale), np.random.default_rng(7), budget)
    np.testing.assert_array_equal(sample, sample_w)
    np.testing.assert_array_equal(rows[0][0], whole[0][0])
    np.testing.assert_allclose(rows[0][1], whole[0][1], rtol=1e-6, atol=1e-6)
    assert len(rows[0][1]) == min(budget, 12)
    plain, _ = _dense_rows(f, x, y, np.random.default_rng(7), budget)
    assert np.abs(plain[0][1] - rows[0][1]).max() > 0.1  # the stream error was added
    assert _stream_inverse(f, y, r_o[:, :3], r_p, scale) == (False, None)  # shapes that do not line up


def test_dense_rows_name_the_sample_of_each_row_whichever_axis_holds_the_batch():
    """Held-out sources stay out of the fits only if each row is given its own
    sample: batch first, sequence first (torch's nn.MultiheadAttention without
    batch_first), and 2-D inputs flattened from either."""
    from types import SimpleNamespace

    from onnxprune.recover.fit import _dense_rows, _row_samples

    B, L, C = 3, 5, 4
    tag = np.arange(B, dtype=np.float32)  # each sample's rows carry its index in the first feature
    bf = np.broadcast_to(tag[:, None, None], (B, L, C)).copy()
    sf = np.ascontiguousarray(bf.transpose(1, 0, 2))  # [L, B, C]
    f = SimpleNamespace(kind="dense", kept_out=np.arange(C), dense={})
    for x in (bf, sf):
        rows, sample = _dense_rows(f, x, x, np.random.default_rng(0), 100, None, B)
        np.testing.assert_array_equal(sample, rows[0][0][:, 0].astype(int))
    flat_sf = sf.reshape(L * B, C)  # [L * B, C], as out_proj's Gemm reads it
    f2 = SimpleNamespace(kind="dense", kept_out=np.arange(C), dense={"src_dims": [L, None, 2, C // 2]})
    rows, sample = _dense_rows(f2, flat_sf, flat_sf, np.random.default_rng(0), 100, None, B)
    np.testing.assert_array_equal(sample, rows[0][0][:, 0].astype(int))
    flat_bf = bf.reshape(B * L, C)
    for dims in (None, [None, L, C], [B, L, C]):
        g = SimpleNamespace(kind="dense", kept_out=np.arange(C), dense={"src_dims": dims})
        np.testing.assert_array_equal(_row_samples(g, flat_bf, B * L, B), np.repeat(np.arange(B), L))
    np.testing.assert_array_equal(_row_samples(f, np.zeros((B, C)), B, B), np.arange(B))  # a classifier's [B, C]


def test_a_dense_layer_reading_a_flattened_sequence_first_tensor_knows_its_source_dims(tmp_path):
    import torch

    from onnxprune.io import load
    from onnxprune.recover.graph import _source_dims

    class M(torch.nn.Module):
        def __init__(s):
            super().__init__()
            s.mha = torch.nn.MultiheadAttention(8, 2)

        def forward(s, x):  # [L, N, E]
            return s.mha(x, x, x, need_weights=False)[0]

    path = str(tmp_path / "m.onnx")
    torch.onnx.export(M().eval(), (torch.randn(5, 2, 8),), path, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {1: "n"}})
    g = load(path, {"x": [5, 3, 8]}).graph  # the batch on axis 1, given as --input-shape x:5,3,8 gives it
    gemm = [n for n in g if n.op_type == "Gemm"]
    assert len(gemm) == 1
    assert _source_dims(gemm[0].inputs[0]) == [5, 3, 2, 4]  # [L, N, heads, head dim], flattened to [L * N, E]
    assert _source_dims(gemm[0].outputs[0]) is None  # not flattened from a wider tensor


def test_sequence_first_layers_put_each_row_in_its_own_samples_fold(tmp_path, monkeypatch):
    """torch's nn.MultiheadAttention without batch_first: in_proj reads [L, N, E], out_proj
    a [L * N, E] Gemm. Every row of theirs lands in the fold of the sample it came from:
    per batch, L times the classifier's count per fold (one row per sample)."""
    import torch

    import onnxprune.recover as R

    class M(torch.nn.Module):
        def __init__(s):
            super().__init__()
            s.embed = torch.nn.Conv2d(3, 16, 4, 4)
            s.mha = torch.nn.MultiheadAttention(16, 4)
            s.fc = torch.nn.Linear(16, 5)

        def forward(s, x):
            t = s.embed(x).flatten(2).permute(2, 0, 1)  # [L, N, E]
            t = t + s.mha(t, t, t, need_weights=False)[0]
            return s.fc(t.mean(0))

    torch.manual_seed(0)
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(M().eval(), (torch.randn(2, 3, 16, 16),), path, dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((64, 3, 16, 16)).astype(np.float32), source=np.arange(64) // 4)
    seen = []
    real = R._accumulate

    def spy(fit, rows, fold, *rest, **kw):
        seen.append((fit.row.node, {int(v): int((fold == v).sum()) for v in np.unique(fold)}))
        return real(fit, rows, fold, *rest, **kw)

    monkeypatch.setattr(R, "_accumulate", spy)
    res = prune(path, {"default": 0, "kinds": {"heads": 0.5, "embed": 0.25}}, calib=str(tmp_path / "c.npz"),
                recover="ridge")
    assert res.recovery_stats["held_out"]
    by_node = {}
    for node, counts in seen:
        by_node.setdefault(node, []).append(counts)
    fc = by_node.pop("/fc/Gemm")  # the classifier: one row per sample
    assert set(by_node) == {"/mha/MatMul", "/mha/Gemm"} and any(-1 in c for c in fc)
    L = 16
    for node, calls in by_node.items():  # one call per batch, in the same order
        assert calls == [{k: L * v for k, v in c.items()} for c in fc], (node, calls, fc)


@pytest.mark.parametrize("k,attrs", [
    (2, "strides=[2,2]"),
    (4, "strides=[2,2], pads=[1,1,1,1]"),
    (3, "strides=[2,2], pads=[1,0,1,0], output_padding=[1,1]"),
    (5, "strides=[3,3], pads=[2,1,0,2]"),
    (3, "pads=[1,1,1,1]"),
], ids=["k2s2", "k4s2p1", "k3s2-output-padding", "k5s3-uneven-pads", "k3s1"])
def test_a_conv_transpose_that_loses_input_channels_is_refitted_from_the_ones_kept(k, attrs):
    """A ConvTranspose is fitted as the stride-1 Conv it equals on its zero-interleaved
    input (kernel flipped, channel axes swapped) and written back transposed: where
    the removed channels are scaled copies of kept ones (a Relu keeps them so), the
    re-fit gives the original's outputs back on inputs no fit saw, for strides,
    uneven pads and output_padding alike."""
    from test_rules import W, make

    rng = np.random.default_rng(3)
    w1, b1, wt, bt = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8), rng.standard_normal((8, 6, k, k)), W(6)
    for j, i in ((5, 0), (6, 1), (7, 2)):  # r_j = 0.1 r_i, read by small weights: the lowest l2, pruned first
        w1[j], b1[j], wt[j] = 0.1 * w1[i], 0.1 * b1[i], 0.1 * wt[j]
    m = make(f"""[c1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu(a)
  [ct] y = ConvTranspose <{attrs}> (r, wt, bt)""", {"w1": w1.astype(np.float32), "b1": b1.astype(np.float32),
                                                  "wt": wt.astype(np.float32), "bt": bt}, out="float[1,6,H,W] y")
    res = prune(m, {"kinds": {"channels": 0.375}, "scope": "local", "importance": "l2"})
    assert sorted(set(range(8)) - set(next(iter(res.plan.keep.values())).tolist())) == [5, 6, 7]
    calib = [np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32) for i in range(12)]
    rec, rows = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, calib, progress=False, ridge=1e-9,
                        ridge_select=False)
    ct = [r for r in rows if r.node == "ct"]
    assert len(ct) == 1 and ct[0].status == "refit" and ct[0].err_after < 1e-4 < ct[0].err_before, format_rows(rows)
    x = np.random.default_rng(99).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref, pruned, got = (runtime.session(p).run(None, {"x": x})[0] for p in (m, res.proto, rec))
    err = lambda a: float(np.linalg.norm(a - ref) / np.linalg.norm(ref))  # noqa: E731
    assert err(got) < 1e-5 and err(pruned) > 1e-3, (err(got), err(pruned))


def test_blocked_normal_equations_of_a_conv_transpose_solve_like_the_dense_ones():
    """The per-phase statistics (rows zero outside their phase's taps) give the same
    ridge solutions, errors and held-out splits as the dense Gram matrix of the same
    rows, for every strength, the bias-only one included."""
    from types import SimpleNamespace

    from onnxprune.recover.fit import _accumulate, _Blocks, _ridge, _sq_err, _totals, tap_blocks

    geo = {"k": (4, 3), "up": (2, 3), "pads": [2, 1, 2, 1]}
    blocks = tap_blocks(5, geo)
    d = 5 * 4 * 3
    assert sorted(np.concatenate(blocks).tolist()) == list(range(d))  # every tap in exactly one phase
    rng = np.random.default_rng(0)
    phase = rng.integers(0, len(blocks), 400)
    X = np.zeros((400, d), np.float32)
    for p, cols in enumerate(blocks):
        X[np.ix_(phase == p, cols)] = rng.standard_normal((int((phase == p).sum()), len(cols)))
    Y = (X @ rng.standard_normal((d, 3)) + 0.3 * rng.standard_normal((400, 3))).astype(np.float32)
    fold = rng.integers(0, 2, 400)
    blocked = SimpleNamespace(conv={"blocks": blocks}, folds={}, n=0)
    dense = SimpleNamespace(conv={}, folds={}, n=0)
    _accumulate(blocked, [(X, Y, phase)], fold)
    _accumulate(dense, [(X, Y)], fold)
    for f in (blocked, dense):
        _totals(f)
    assert isinstance(blocked.G[0], _Blocks)
    W0 = rng.standard_normal((d + 1, 3))
    for lam in (1e-4, 1e-1, 10.0, math.inf):
        wb, wd = _ridge(blocked.G[0], blocked.C[0], W0, lam), _ridge(dense.G[0], dense.C[0], W0, lam)
        np.testing.assert_allclose(wb, wd, rtol=1e-6, atol=1e-8)
        assert _sq_err(blocked.G[0], blocked.C[0], blocked.yy[0], wb) == pytest.approx(
            _sq_err(dense.G[0], dense.C[0], dense.yy[0], wd), rel=1e-8)
    held = blocked.G[0] - blocked.folds[1][0][0]  # what a fit on fold 0 sees
    np.testing.assert_allclose(held @ W0, (dense.G[0] - dense.folds[1][0][0]) @ W0, rtol=1e-8, atol=1e-8)


def test_wide_row_products_in_float32_give_the_float64_statistics_and_leave_kept_out_rows_out():
    """Inputs of FLOAT32_FROM features or more are multiplied in float32 around
    the first rows' mean: the sums (and the ridge solutions from them) match
    float64 products of the raw rows, even where the inputs sit far from zero;
    rows of fold -1 (kept out for the whole-model check) are in no fold's sums."""
    from types import SimpleNamespace

    from onnxprune.recover.fit import FLOAT32_FROM, _accumulate, _ridge, _totals

    rng = np.random.default_rng(3)
    d, m = FLOAT32_FROM + 20, 7
    offset = rng.uniform(-40, 40, d)  # far from zero: uncentred float32 products would cancel
    batches = []
    for b in range(3):
        X = (rng.standard_normal((500, d)) * rng.uniform(0.2, 2, d) + offset).astype(np.float32)
        Y = (X @ rng.standard_normal((d, m)) * 0.05 + 2).astype(np.float32)
        batches.append((X, Y, rng.integers(-1, 2, 500)))
    fit = SimpleNamespace(conv={}, folds={}, shift={}, n=0)
    for X, Y, fold in batches:
        _accumulate(fit, [(X, Y)], fold)
    _totals(fit)
    assert fit.n == sum(int((f >= 0).sum()) for _, _, f in batches)
    for k in (0, 1):
        Xk = np.concatenate([X[f == k] for X, _, f in batches]).astype(np.float64)
        Yk = np.concatenate([Y[f == k] for _, Y, f in batches]).astype(np.float64)
        Xa = np.hstack([Xk, np.ones((len(Xk), 1))])
        G, C, yy = (a[0] for a in fit.folds[k])
        assert G[-1, -1] == len(Xk)  # kept-out rows not counted
        np.testing.assert_allclose(G[-1], Xa.T @ Xa[:, -1], rtol=1e-6)
        mu = G[-1, :-1] / len(Xk)
        cov, want = G[:-1, :-1] / len(Xk) - np.outer(mu, mu), np.cov(Xk.T, bias=True)
        assert np.abs(cov - want).max() < 1e-5 * np.abs(want).max()
        np.testing.assert_allclose(C, Xa.T @ Yk, rtol=1e-5, atol=1e-5 * np.abs(Xa.T @ Yk).max())
        np.testing.assert_allclose(yy, (Yk * Yk).sum(0), rtol=1e-9)
    Xall = np.concatenate([X[f >= 0] for X, _, f in batches]).astype(np.float64)
    Yall = np.concatenate([Y[f >= 0] for _, Y, f in batches]).astype(np.float64)
    Xa = np.hstack([Xall, np.ones((len(Xall), 1))])
    W0 = rng.standard_normal((d + 1, m)) * 0.05
    got, want = _ridge(fit.G[0], fit.C[0], W0, 1e-2), _ridge(Xa.T @ Xa, Xa.T @ Yall, W0, 1e-2)
    assert np.abs(Xa @ got - Xa @ want).max() < 1e-3 * np.abs(Yall - Yall.mean(0)).max()


def test_a_model_whose_nodes_have_no_names_is_recovered_like_a_named_one():
    """Old exporters (torch 1.2, opset 9) name no node, and recovery addresses
    layers by name: every layer used to collapse into one row, 'node not found'.
    Unnamed nodes are named after their op and first output (the same in the
    original and the pruned model), and the fits equal the named model's."""
    named = small_cnn()
    bare = onnx.ModelProto()
    bare.CopyFrom(named)
    for n in bare.graph.node:
        n.name = ""
    bare_bytes = bare.SerializeToString()
    calib = _batches((16, 3, 16, 16), 4, seed=1)
    held = _batches((16, 3, 16, 16), 2, seed=2)
    _, out_named, rows_named = _run(named, {"default": 0.5}, calib)
    res, out_bare, rows_bare = _run(bare, {"default": 0.5}, calib)
    assert [r.node for r in rows_bare] == ["Conv:c2", "Conv:c3", "Gemm:y"]
    assert [r.status for r in rows_bare] == [r.status for r in rows_named] and "refit" in [r.status for r in rows_bare]
    assert _rel(bare, out_bare, held) < 0.5 * _rel(bare, res.proto, held)
    assert abs(_rel(bare, out_bare, held) - _rel(named, out_named, held)) < 1e-6
    assert bare.SerializeToString() == bare_bytes  # the original is not renamed


def test_node_names_are_made_unique_the_same_way_for_the_original_and_its_copy():
    from onnxprune.rewrite import needs_names, unique_node_names

    nodes = [("a", "Conv", "x1"), ("", "Relu", "x2"), ("a", "Conv", "x3"), ("Relu:x2", "Add", "x4"), ("", "Gemm", "y")]
    names = unique_node_names(nodes)
    assert names == ["a", "Relu:x2_", "Conv:x3", "Relu:x2", "Gemm:y"]  # a name in use is never taken
    assert len(set(names)) == len(names) and unique_node_names(nodes) == names
    assert needs_names(n for n, _, _ in nodes) and not needs_names(names)


def test_a_file_onnxruntime_refuses_is_refused_with_its_reason(tmp_path):
    """Two nodes with one name: onnxruntime refuses the original, and the error
    says why instead of only suggesting an input shape."""
    m = small_cnn()
    for n in m.graph.node:
        n.name = "layer"
    with pytest.raises(UserError, match="two nodes with same node name"):
        prune(m, {"default": 0.5})


def _seq_first(w):
    """x[N, T, 4] -> MatMul w -> Transpose -> y[T, N, 3] (a CTC recogniser's sequence-first output)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Transpose", ["h"], ["y"], perm=[1, 0, 2], name="tr")]
    return _model(nodes, [_t("w", w)], ["N", 5, 4], "y", [5, "N", 3])


def test_the_held_out_check_finds_the_batch_axis_of_a_sequence_first_output():
    """A [T, N, C] output used to be skipped (its axis 0 is not the batch), so the
    check compared nothing and called an error of 0 'not worse'; now it compares
    per sample on the batch axis, and says so when no output holds the samples."""
    from onnxprune.recover import held_out_text
    from onnxprune.recover.check import batch_axis, held_out_check

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3))
    orig, pruned, rec = _seq_first(w), _seq_first(w * 0.5), _seq_first(w * 0.9)
    feeds = [{"x": rng.standard_normal((8, 5, 4)).astype(np.float32)}]
    fold = [np.array([-1, -1, -1, 0, 0, 1, 1, -1])]
    h = held_out_check(orig, pruned, rec, feeds, fold, 1)
    assert h["outputs"] == 1 and h["samples"] == 4
    assert h["err_pruned"] == pytest.approx(0.5, rel=1e-4) and h["err_recovered"] == pytest.approx(0.1, rel=1e-3)
    assert not h["worse"] and held_out_check(orig, rec, pruned, feeds, fold, 1)["worse"]
    assert batch_axis((5, 8, 3), 8) == 1 and batch_axis((8, 8), 8) == 0 and batch_axis((5, 3), 8) is None
    assert "nothing compared" in held_out_text({**h, "outputs": 0})


# --------------------------------------------------------------------------- targets behind a clamp


def test_clamped_targets_leave_free_what_the_clamp_hides():
    from onnxprune.recover.fit import _clamped_targets, _Fit

    # one feature, weight 1, bias 0: the pruned prediction is the feature itself
    X = np.array([[-3.0], [2.0], [-1.0], [5.0], [9.0], [7.0]], np.float32)
    Y = np.array([[-5.0], [-4.0], [0.5], [3.0], [8.0], [6.0]], np.float32)  # the original's values
    f = _Fit(row=None, node=None, x_name="x", y_name="y", kept_out=np.arange(1), groups=[(slice(None), slice(None))],
             w0=[np.array([[1.0], [0.0]])], kind="dense", clamp=(0.0, 6.0))
    (_, T), = _clamped_targets(f, [(X, Y)], f.w0)
    # row 0: both below 0 -> the prediction stays (-3); row 1: the prediction crossed -> the bound (0);
    # rows 2, 3: inside -> the original; row 4: both above 6 -> the prediction (9); row 5: at 6 -> max(7, 6)
    assert T[:, 0].tolist() == [-3.0, 0.0, 0.5, 3.0, 9.0, 7.0]
    f.clamp = (0.0, math.inf)  # a Relu: nothing above is free
    (_, T), = _clamped_targets(f, [(X, Y)], f.w0)
    assert T[:, 0].tolist() == [-3.0, 0.0, 0.5, 3.0, 8.0, 6.0]
    (_, T), = _clamped_targets(f, [(X, Y)], [np.array([[0.5], [-1.0]])])  # another anchor: 0.5 x - 1
    assert T[:, 0].tolist() == [-2.5, 0.0, 0.5, 3.0, 8.0, 6.0]
    f.clamp = None
    assert _clamped_targets(f, [(X, Y)], f.w0)[0][1] is Y


def _conv_then(act_nodes, inits_extra=(), opset=20, out="y"):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), *act_nodes]
    inits = [_t("w", rng.standard_normal((4, 3, 1, 1))), *inits_extra]
    return _model(nodes, inits, ["N", 3, 4, 4], out, ["N", 4, 4, 4], opset=opset)


@pytest.mark.parametrize("case,expected", [
    ("relu", (0.0, math.inf)),
    ("clip6", (0.0, 6.0)),
    ("clip_max_only", (-math.inf, 6.0)),
    ("clip_attrs", (-1.0, 1.0)),
    ("clip_none", None),
    ("hardswish", (-3.0, math.inf)),
    ("hardsigmoid_torch", (-3.0, 3.0)),
    ("hardsigmoid_default", (-2.5, 2.5)),
    ("two_readers", None),
    ("graph_output", None),
    ("sigmoid", None),
])
def test_the_clamp_after_a_layer_is_read_only_when_nothing_else_sees_its_output(case, expected):
    import onnx_ir as ir

    from onnxprune.recover.graph import _Graph, clamp_after

    c = numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi")
    m = {
        "relu": lambda: _conv_then([helper.make_node("Relu", ["c"], ["y"])]),
        "clip6": lambda: _conv_then([helper.make_node("Clip", ["c", "lo", "hi"], ["y"])], c),
        "clip_max_only": lambda: _conv_then([helper.make_node("Clip", ["c", "", "hi"], ["y"])], c[1:]),
        "clip_attrs": lambda: _conv_then([helper.make_node("Clip", ["c"], ["y"], min=-1.0, max=1.0)], opset=6),
        "clip_none": lambda: _conv_then([helper.make_node("Clip", ["c"], ["y"])]),
        "hardswish": lambda: _conv_then([helper.make_node("HardSwish", ["c"], ["y"])]),
        "hardsigmoid_torch": lambda: _conv_then([helper.make_node("HardSigmoid", ["c"], ["y"], alpha=1 / 6)]),
        "hardsigmoid_default": lambda: _conv_then([helper.make_node("HardSigmoid", ["c"], ["y"])]),
        "two_readers": lambda: _conv_then([helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Add", ["r", "c"], ["y"])]),
        "graph_output": lambda: _conv_then([helper.make_node("Relu", ["c"], ["y"])], out="c"),
        "sigmoid": lambda: _conv_then([helper.make_node("Sigmoid", ["c"], ["y"])]),
    }[case]()
    g = _Graph(ir.serde.deserialize_model(m))
    got = clamp_after(g, g.nodes["conv"], 4, 1, 4)
    assert got == (expected if expected is None else pytest.approx(expected)), got


def relu_gated(seed):
    """x[N,6,8,8] -> Conv 1x1 6->24 -> Relu -> Conv 1x1 24->8 -> Relu. Half of the
    hidden channels are weak (the l2 ranking drops them) but push the second
    conv's outputs down hard: what they took away mostly ends below zero,
    where the last Relu hides it."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((24, 6, 1, 1)) / np.sqrt(6)
    w1[12:] *= 0.3
    w2 = rng.standard_normal((8, 24, 1, 1)) / np.sqrt(12)
    w2[:, 12:] = -0.5 * np.abs(w2[:, 12:]) / 0.3
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["y"], name="relu2"),
    ]
    return _model(nodes, [_t("w1", w1), _t("w2", w2)], ["N", 6, 8, 8], "y", ["N", 8, 8, 8])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_layer_before_a_relu_is_fitted_to_what_passes_it(seed):
    # conv2 loses the weak half of its inputs; what they took away lies mostly below zero, where
    # the Relu hides it, so a fit that does not chase it is closer to the original on held-out inputs
    m = relu_gated(seed)
    calib = _batches((16, 6, 8, 8), 4, seed=10 + seed)
    held = _batches((16, 6, 8, 8), 2, seed=20 + seed)
    errs = {}
    for clamp in (False, True):
        res, out, rows = _run(m, {"default": 0.5, "scope": "local"}, calib, ridge=1e-4, ridge_select=False,
                              validate=False, clamp=clamp)
        _valid(out)
        assert [r.status for r in rows if r.node == "conv2"] == ["refit"], format_rows(rows)
        errs[clamp] = _rel(m, out, held)
        conv2 = next(r for r in rows if r.node == "conv2")
        assert (conv2.target == "clamped") == clamp and ("^ fitted to what passes" in format_rows(rows)) == clamp
    assert errs[True] < 0.95 * errs[False], errs


def relu_heavy(seed):
    """x[N,6,8,8] -> Conv 1x1 6->24 -> Relu -> Conv 3x3 24->8 with a negative bias
    -> Relu: most of the second conv's values are hidden by its Relu."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((24, 6, 1, 1)) / np.sqrt(6)
    w2, b2 = rng.standard_normal((8, 24, 3, 3)) / np.sqrt(24 * 9), np.full(8, -0.6)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"], name="relu2"),
    ]
    return _model(nodes, [_t("w1", w1), _t("w2", w2), _t("b2", b2)], ["N", 6, 8, 8], "y", ["N", 8, 8, 8])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_clamped_targets_do_no_worse_than_the_plain_fit_however_much_a_layer_lost(ratio):
    # anchored on the plain fit's own values, the clamped passes can only give up what the Relu hides
    m = relu_heavy(0)
    calib, held = _batches((16, 6, 8, 8), 4, seed=10), _batches((16, 6, 8, 8), 2, seed=20)
    errs = {}
    for clamp in (False, True):
        _, out, rows = _run(m, {"default": ratio, "scope": "local"}, calib, ridge=1e-4, ridge_select=False,
                            validate=False, clamp=clamp)
        assert [r.status for r in rows if r.node == "conv2"] == ["refit"], format_rows(rows)
        errs[clamp] = _rel(m, out, held)
    assert errs[True] <= 1.01 * errs[False], errs


@pytest.mark.parametrize("layout", ["dense", "wide", "blocks"])
def test_a_pass_with_new_targets_over_the_same_rows_keeps_the_gram_and_replaces_the_rest(layout):
    """reset_targets + _accumulate(targets_only) over the same rows with new
    targets gives the statistics of a fresh pass with those targets (the Gram
    matrices kept, the cross products and target sums replaced), per fold."""
    from types import SimpleNamespace

    from onnxprune.recover.fit import FLOAT32_FROM, _accumulate, _totals, reset_targets, tap_blocks

    rng = np.random.default_rng(5)
    if layout == "blocks":
        blocks = tap_blocks(2, {"k": (2, 2), "up": (2, 2), "pads": [0, 0, 0, 0]})
        d = 8
    else:
        blocks, d = None, (FLOAT32_FROM + 4 if layout == "wide" else 12)
    batches = []
    for _ in range(3):
        X = (rng.standard_normal((300, d)) + (5.0 if layout == "wide" else 0.0)).astype(np.float32)
        phase = rng.integers(0, 4, 300)
        if blocks is not None:
            for p, cols in enumerate(blocks):
                X[np.ix_(phase != p, cols)] = 0
        Y1, Y2 = (rng.standard_normal((300, 3)).astype(np.float32) for _ in range(2))
        batches.append((X, Y1, Y2, phase, rng.integers(-1, 2, 300)))

    def rows(X, Y, phase):
        return [(X, Y, phase)] if blocks is not None else [(X, Y)]

    def new():
        return SimpleNamespace(conv={"blocks": blocks} if blocks else {}, folds={}, shift={}, n=0, G=[], C=[], yy=[])

    again, fresh = new(), new()
    for X, Y1, _, phase, fold in batches:
        _accumulate(again, rows(X, Y1, phase), fold)
    reset_targets(again)
    for X, _, Y2, phase, fold in batches:
        _accumulate(again, rows(X, Y2, phase), fold, targets_only=True)
        _accumulate(fresh, rows(X, Y2, phase), fold)
    assert again.n == fresh.n and set(again.folds) == set(fresh.folds) == {0, 1}
    for k in fresh.folds:
        (Ga,), (Ca,), (ya,) = again.folds[k]
        (Gf,), (Cf,), (yf,) = fresh.folds[k]
        np.testing.assert_allclose(Ca, Cf, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(ya, yf, rtol=1e-6)
        W = rng.standard_normal((d + 1, 3))
        np.testing.assert_allclose(Ga @ W, Gf @ W, rtol=1e-6, atol=1e-6)
    _totals(again)
    assert len(again.C) == 1


def test_the_clamp_is_found_through_per_channel_affine_steps():
    import onnx_ir as ir

    from onnxprune.recover.graph import _Graph, clamp_after

    rng = np.random.default_rng(0)
    s, B, mu, var = np.array([2.0, -0.5, 1.0, 0.0]), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    bn = [_t("s", s), _t("B", B), _t("mu", mu), _t("var", var)]
    m = _conv_then([helper.make_node("BatchNormalization", ["c", "s", "B", "mu", "var"], ["n"], epsilon=1e-3),
                    helper.make_node("Relu", ["n"], ["y"])], bn)
    g = _Graph(ir.serde.deserialize_model(m))
    lo, hi = clamp_after(g, g.nodes["conv"], 4, 1, 4)
    k = s / np.sqrt(var + 1e-3)  # relu(k (y - mu) + B) is 0 where y <= mu - B / k (k > 0), y >= it (k < 0)
    edge = mu - B / np.where(k == 0, 1, k)
    np.testing.assert_allclose(lo[[0, 2]], edge[[0, 2]], rtol=1e-5)
    np.testing.assert_allclose(hi[1], edge[1], rtol=1e-5)
    assert hi[0] == hi[2] == np.inf and lo[1] == -np.inf
    assert lo[3] == np.inf and hi[3] == -np.inf  # scale 0: the channel is constant after the norm, all of it free
    # x * c (per channel) + 0.5 -> Clip(0, 6)
    c = np.array([2.0, -1.0, 4.0, 0.5]).reshape(4, 1, 1)
    m = _conv_then([helper.make_node("Mul", ["k", "c"], ["p"]), helper.make_node("Add", ["p", "half"], ["q"]),
                    helper.make_node("Clip", ["q", "lo", "hi"], ["y"])],
                   [_t("k", c), _t("half", np.array(0.5)), _t("lo", np.array(0.0)), _t("hi", np.array(6.0))])
    m.graph.node[1].input[:] = ["c", "k"]  # Mul(c, k): the constant second
    g = _Graph(ir.serde.deserialize_model(m))
    lo, hi = clamp_after(g, g.nodes["conv"], 4, 1, 4)
    cv = c.reshape(-1)
    np.testing.assert_allclose(lo, np.where(cv > 0, -0.5 / cv, 5.5 / cv), rtol=1e-6)
    np.testing.assert_allclose(hi, np.where(cv > 0, 5.5 / cv, -0.5 / cv), rtol=1e-6)
    # what is not a per-channel affine step stops the search
    for nodes, inits in (
        ([helper.make_node("Mul", ["c", "sp"], ["p"]), helper.make_node("Relu", ["p"], ["y"])],
         [_t("sp", rng.standard_normal((1, 4, 4)))]),  # varies along a spatial axis
        ([helper.make_node("Sub", ["one", "c"], ["p"]), helper.make_node("Relu", ["p"], ["y"])],
         [_t("one", np.array(1.0))]),  # 1 - x
        ([helper.make_node("Add", ["c", "c"], ["p"]), helper.make_node("Relu", ["p"], ["y"])], []),  # not a constant
    ):
        g = _Graph(ir.serde.deserialize_model(_conv_then(nodes, inits)))
        assert clamp_after(g, g.nodes["conv"], 4, 1, 4) is None


def relu_gated_bn(seed):
    """:func:`relu_gated` with a BatchNormalization between
    the second conv and its Relu, as exporters that do not fold it write."""
    m = relu_gated(seed)
    rng = np.random.default_rng(100 + seed)
    s = rng.uniform(0.5, 2, 8)
    inits = [_t("s", s), _t("B", 0.2 * rng.standard_normal(8)), _t("mu", 0.2 * rng.standard_normal(8)),
             _t("var", rng.uniform(0.5, 2, 8))]
    nodes = list(m.graph.node)
    nodes[-1].input[0] = "n"
    nodes.insert(-1, helper.make_node("BatchNormalization", ["c2", "s", "B", "mu", "var"], ["n"], name="bn"))
    return _model(nodes, list(m.graph.initializer) + inits, ["N", 6, 8, 8], "y", ["N", 8, 8, 8])


def token_relu(seed):
    """x[N,T,6] -> MatMul 6->24 -> Relu -> MatMul 24->8 -> Add bias -> Relu: a
    MatMul's clamp is behind its bias Add; the weak hidden half pushes down."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((6, 24)) / np.sqrt(6)
    w1[:, 12:] *= 0.3
    w2 = rng.standard_normal((24, 8)) / np.sqrt(12)
    w2[12:] = -0.5 * np.abs(w2[12:]) / 0.3
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("MatMul", ["r", "w2"], ["m2"], name="fc2"),
             helper.make_node("Add", ["m2", "b2"], ["a2"], name="fc2_bias"), helper.make_node("Relu", ["a2"], ["y"], name="relu2")]
    return _model(nodes, [_t("w1", w1), _t("w2", w2), _t("b2", 0.3 * rng.standard_normal(8))], ["N", 5, 6], "y", ["N", 5, 8])


@pytest.mark.parametrize("build,shape,layer", [(relu_gated_bn, (16, 6, 8, 8), "conv2"), (token_relu, (32, 5, 6), "fc2")],
                         ids=["conv-batchnorm-relu", "matmul-bias-relu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_layer_whose_clamp_is_behind_affine_steps_is_fitted_to_what_passes_it(build, shape, layer, seed):
    m = build(seed)
    calib, held = _batches(shape, 4, seed=10 + seed), _batches(shape, 2, seed=20 + seed)
    errs = {}
    for clamp in (False, True):
        _, out, rows = _run(m, {"default": 0.5, "scope": "local"}, calib, ridge=1e-4, ridge_select=False,
                            validate=False, clamp=clamp)
        _valid(out)
        row = next(r for r in rows if r.node == layer)
        assert row.status == "refit" and (row.target == "clamped") == clamp, format_rows(rows)
        errs[clamp] = _rel(m, out, held)
    assert errs[True] < 0.98 * errs[False], errs


def test_rows_kept_for_the_clamp_passes_give_what_rows_built_again_give(monkeypatch):
    """The clamp passes reuse the level's regression rows (within CLAMP_ROWS_BYTES); with no room they are
    built again from the replayed random state: the written weights must be the same either way."""
    import onnxprune.recover as rec

    m = relu_heavy(1)
    calib = _batches((16, 6, 8, 8), 4, seed=11)
    got = {}
    for room in (rec.CLAMP_ROWS_BYTES, 0):
        monkeypatch.setattr(rec, "CLAMP_ROWS_BYTES", room)
        _, out, rows = _run(m, {"default": 0.5, "scope": "local"}, calib, validate=False, clamp=True)
        assert [(r.status, r.target) for r in rows if r.node == "conv2"] == [("refit", "clamped")], format_rows(rows)
        got[room] = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    kept, built = got.values()
    assert kept.keys() == built.keys()
    for k in kept:
        np.testing.assert_array_equal(kept[k], built[k], err_msg=k)


def test_the_ridge_search_started_at_an_earlier_choice_finds_it_with_fewer_solves(monkeypatch):
    """_select(start=...) (a clamp pass's final choice starts where the plain fit's was): on a problem whose
    held-out error has one minimum it returns the strength the default search finds, with fewer solves."""
    from types import SimpleNamespace

    import onnxprune.recover.fit as fitmod
    from onnxprune.recover.fit import _accumulate, _select, _totals

    rng = np.random.default_rng(3)
    d, m = 20, 4
    Wt = rng.standard_normal((d, m))
    fit = SimpleNamespace(conv={}, folds={}, shift={}, n=0, G=[], C=[], yy=[], w0=[np.zeros((d + 1, m))])
    for k in range(2):  # two folds of few, noisy rows: a strength well away from the default start wins
        X = rng.standard_normal((40, d)).astype(np.float32)
        Y = (X @ Wt + 3.0 * rng.standard_normal((40, m))).astype(np.float32)
        _accumulate(fit, [(X, Y)], np.full(40, k))
    _totals(fit)
    solves = []
    real = fitmod._ridge
    monkeypatch.setattr(fitmod, "_ridge", lambda *a: solves.append(a[-1]) or real(*a))
    lam, _, err = _select(fit, 1e-2)
    searched = len(solves)
    assert math.isfinite(lam) and lam != fitmod.SELECT_FROM, lam
    solves.clear()
    again, _, err_again = _select(fit, 1e-2, start=lam)
    assert again == lam and err_again == err
    assert len(solves) < searched, (solves, searched)
    assert min(s for s in solves if math.isfinite(s)) == 10.0 ** (round(math.log10(lam)) - 1)  # began beside it


def test_the_ridge_strength_chosen_on_some_folds_is_scaled_to_the_rows_of_the_fit():
    """A strength chosen by cross-validation (each fit on the other folds) is
    relative to those fits' Gram matrices; the fit on the totals has more rows,
    so it is solved at the strength times the share of rows a cross-validation
    fit trained on: folds of 30 and 50 rows and 20 kept out, all summed: each
    cross-validation fit saw 50 or 30 rows, 40 on average, of the 100."""
    from onnxprune.recover.fit import _Fit, _ridge, _solve, _totals, train_share

    rng = np.random.default_rng(0)
    f = _Fit.__new__(_Fit)
    f.folds, f.w0 = {}, [rng.standard_normal((4, 2))]
    for k, n in ((0, 30), (1, 50), (-1, 20)):
        X = np.c_[rng.standard_normal((n, 3)), np.ones(n)]
        Y = rng.standard_normal((n, 2))
        f.folds[k] = ([X.T @ X], [X.T @ Y], [(Y * Y).sum(0)])
    _totals(f, out=True)
    assert train_share(f) == pytest.approx(0.4)
    np.testing.assert_allclose(_solve(f, "ridge", 0.5)[0], _ridge(f.G[0], f.C[0], f.w0[0], 0.2))
    _totals(f)  # the checked fit: 40 of 80
    np.testing.assert_allclose(_solve(f, "ridge", 0.5)[0], _ridge(f.G[0], f.C[0], f.w0[0], 0.25))
    del f.folds[1]  # one fold: nothing chosen by cross-validation, nothing scaled
    _totals(f)
    np.testing.assert_allclose(_solve(f, "ridge", 0.5)[0], _ridge(f.G[0], f.C[0], f.w0[0], 0.5))

"""Recovery of attention logits: when head dims go, q and k are re-fitted
together for q.k^T (onnxprune/recover/attention.py).

(a) the arithmetic: the rank-r factorisation's logit error, computed from the
    statistics, equals the error over all pairs of rows computed directly, is
    zero at full rank and beats keeping a subset of the dims;
(b) a hand-built two-block self-attention model (fused qkv MatMul, head split
    by Reshape/Transpose/Gather, scaled logits, Softmax): pruning head dims,
    the joint fit is applied in both blocks (also the first, whose qkv reads
    unchanged inputs) and the recovered model is closer to the original on
    inputs no fit saw than with separate q/k fits;
(c) nothing changes when no head lost dims.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import runtime
from onnxprune.api import prune
from onnxprune.recover import format_rows, recover
from onnxprune.recover.fit import _logit_err, _logit_factor, _match_columns

T, D, H, DH = 10, 16, 2, 8  # tokens, width, heads, head dim


def _t(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype=dtype), name)  # 0-d stays 0-d (Gather indices)


def _block(i, rng, nodes, inits, x):
    """Pre-norm-free attention block: x + proj(softmax(q k^T / sqrt(DH)) v)."""
    # q and k carry most of their energy in a few directions, as trained
    # attention does: a joint fit can then keep the logits with fewer dims
    # (the values too, so that the output projection's re-fit makes up for their lost dims)
    def low_rank():
        return rng.standard_normal((D, 3)) @ rng.standard_normal((3, D)) + 0.1 * rng.standard_normal((D, D))

    wqkv = np.concatenate([low_rank() @ rng.standard_normal((D, D)) / 3, low_rank() @ rng.standard_normal((D, D)) / 3,
                           low_rank() @ rng.standard_normal((D, D)) / 4], axis=1)
    p = f"b{i}_"
    inits += [_t(p + "wqkv", wqkv), _t(p + "bqkv", 0.1 * rng.standard_normal(3 * D)),
              _t(p + "wproj", rng.standard_normal((D, D)) / 4), _t(p + "bproj", 0.1 * rng.standard_normal(D)),
              _t(p + "shape5", [0, T, 3, H, DH], np.int64), _t(p + "shape3", [0, T, D], np.int64),
              _t(p + "scale", np.array(DH ** -0.5)),
              _t(p + "i0", np.array(0), np.int64), _t(p + "i1", np.array(1), np.int64), _t(p + "i2", np.array(2), np.int64)]
    nodes += [
        helper.make_node("MatMul", [x, p + "wqkv"], [p + "qkv0"], name=p + "qkv"),
        helper.make_node("Add", [p + "qkv0", p + "bqkv"], [p + "qkv1"], name=p + "qkv_bias"),
        helper.make_node("Reshape", [p + "qkv1", p + "shape5"], [p + "qkv5"], name=p + "split_heads"),
        helper.make_node("Transpose", [p + "qkv5"], [p + "qkvt"], name=p + "perm", perm=[2, 0, 3, 1, 4]),
        helper.make_node("Gather", [p + "qkvt", p + "i0"], [p + "q"], name=p + "take_q", axis=0),
        helper.make_node("Gather", [p + "qkvt", p + "i1"], [p + "k"], name=p + "take_k", axis=0),
        helper.make_node("Gather", [p + "qkvt", p + "i2"], [p + "v"], name=p + "take_v", axis=0),
        helper.make_node("Transpose", [p + "k"], [p + "kt"], name=p + "k_t", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [p + "q", p + "kt"], [p + "logits0"], name=p + "qk"),
        helper.make_node("Mul", [p + "logits0", p + "scale"], [p + "logits"], name=p + "scale_mul"),
        helper.make_node("Softmax", [p + "logits"], [p + "attn"], name=p + "softmax", axis=-1),
        helper.make_node("MatMul", [p + "attn", p + "v"], [p + "av"], name=p + "av"),
        helper.make_node("Transpose", [p + "av"], [p + "avt"], name=p + "merge_perm", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [p + "avt", p + "shape3"], [p + "o"], name=p + "merge_heads"),
        helper.make_node("MatMul", [p + "o", p + "wproj"], [p + "proj0"], name=p + "proj"),
        helper.make_node("Add", [p + "proj0", p + "bproj"], [p + "proj1"], name=p + "proj_bias"),
        helper.make_node("Add", [x, p + "proj1"], [p + "out"], name=p + "residual"),
    ]
    return p + "out"


def attention_model(seed=0, blocks=2):
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(blocks):
        x = _block(i, rng, nodes, inits, x)
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", T, D])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def _inputs(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((16, T, D)).astype(np.float32) for _ in range(n)]


def _rel(a, b, xs):
    sa, sb = runtime.session(a), runtime.session(b)
    num = den = 0.0
    for x in xs:
        ya, yb = sa.run(None, {"x": x})[0], sb.run(None, {"x": x})[0]
        num += float(((ya - yb) ** 2).sum())
        den += float(((ya - x) ** 2).sum())  # the attention branches' share of the output
    return float(np.sqrt(num / den))


# --------------------------------------------------------------------------- (a)


def test_logit_factor_error_matches_pairs_and_beats_a_subset():
    rng = np.random.default_rng(0)
    n, d, h = 400, 12, 6
    xa = np.hstack([rng.standard_normal((n, d)) * rng.uniform(0.2, 3, d), np.ones((n, 1))])
    wq, wk = rng.standard_normal((d + 1, h)), rng.standard_normal((d + 1, h))
    tq, tk = xa @ wq, xa @ wk
    stats = (xa.T @ xa, xa.T @ tq, xa.T @ tk, tq.T @ tq, tk.T @ tk)
    target = tq @ tk.T
    zero = np.zeros((d + 1, h))
    a, b = _logit_factor(stats[0], stats[1], stats[2], zero, zero, 1e-9, h)
    assert _logit_err(*stats, a, b) < 1e-9 * float((target ** 2).sum())
    for r in (4, 2):
        a, b = _logit_factor(stats[0], stats[1], stats[2], zero, zero, 1e-9, r)
        direct = float((((xa @ a) @ (xa @ b).T - target) ** 2).sum())
        assert np.isclose(_logit_err(*stats, a, b), direct, rtol=1e-6)
        subset = float((((xa @ wq[:, :r]) @ (xa @ wk[:, :r]).T - target) ** 2).sum())
        assert direct < 0.5 * subset, (r, direct, subset)


def test_columns_are_matched_by_data_and_doubt_refuses():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((300, 20))
    cols, scale = _match_columns(0.5 * y[:, [3, 7, 1]] + 2.0, y)
    assert cols.tolist() == [3, 7, 1] and np.allclose(scale, 0.5)
    assert _match_columns(y[:, [3, 7]] + y[:, [4, 8]], y) is None  # a mix of columns is no copy


# --------------------------------------------------------------------------- (b)


def test_head_dims_pruned_q_and_k_refitted_jointly():
    m = attention_model()
    calib, held = _inputs(4, seed=1), _inputs(3, seed=2)
    res = prune(m, {"kinds": {"head_dim": 0.5}, "scope": "local", "importance": "l2"})
    assert any(len(k) < DH for k in res.plan.keep.values())  # head dims did go
    kw = dict(progress=False, rows_per_batch=512)
    sep, rows_sep = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, calib, attention_logits=False, **kw)
    joint, rows = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, calib, **kw)
    onnx.checker.check_model(joint, full_check=True)
    print(format_rows(rows))
    logit_rows = [r for r in rows if r.method == "qk-logits"]
    assert [r.node for r in logit_rows] == ["b0_qk", "b1_qk"]
    assert not any(r.method == "qk-logits" for r in rows_sep)
    for r in logit_rows:
        assert r.status == "refit", format_rows(rows)
        assert r.err_after < r.err_before and r.held_after < r.held_before
    # the first block reads the original input: its logits, low-rank at heart, are nearly all kept
    assert logit_rows[0].held_after < 0.2 * logit_rows[0].held_before
    # the first block's qkv reads the unchanged input: re-fitted only for the logits
    assert {r.node: r.status for r in rows}["b0_qkv"] == "refit"
    assert "b0_qkv" not in {r.node for r in rows_sep}
    e_pruned, e_sep, e_joint = _rel(m, res.proto, held), _rel(m, sep, held), _rel(m, joint, held)
    print(e_pruned, e_sep, e_joint)
    assert e_joint < 0.8 * e_sep < 0.8 * e_pruned, (e_pruned, e_sep, e_joint)


# --------------------------------------------------------------------------- (c)


@pytest.mark.parametrize("kinds", [{"heads": 0.5}, {"embed": 0.25}])
def test_no_head_lost_dims_nothing_changes(kinds):
    m = attention_model()
    calib = _inputs(4, seed=1)
    res = prune(m, {"kinds": kinds, "scope": "local", "importance": "l2"})
    kw = dict(progress=False, rows_per_batch=512)
    a, rows_a = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, calib, attention_logits=False, **kw)
    b, rows_b = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, calib, **kw)
    assert not any(r.method == "qk-logits" for r in rows_b)
    assert a.SerializeToString() == b.SerializeToString()

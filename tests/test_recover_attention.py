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
(c) nothing changes when no head lost dims;
(d) the same where the logits are formed inside an op: the ONNX ``Attention``
    op (3-D and 4-D q/k/v), onnxruntime's ``MultiHeadAttention`` (whose packed
    bias the op adds to q and k itself) and its packed-weight ``Attention``
    (the q/k/v projection inside the op is the re-fitted layer).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import runtime
from onnxprune.api import prune
from onnxprune.recover import format_rows, recover
from onnxprune.recover.fit import _logit_err, _logit_factors, _match_columns

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
    [(a, b)] = _logit_factors(stats[0], [(stats[1], stats[2], zero, zero, h)], 1e-9)
    assert _logit_err(*stats, a, b) < 1e-9 * float((target ** 2).sum())
    for r in (4, 2):
        [(a, b)] = _logit_factors(stats[0], [(stats[1], stats[2], zero, zero, r)], 1e-9)
        direct = float((((xa @ a) @ (xa @ b).T - target) ** 2).sum())
        assert np.isclose(_logit_err(*stats, a, b), direct, rtol=1e-6)
        subset = float((((xa @ wq[:, :r]) @ (xa @ wk[:, :r]).T - target) ** 2).sum())
        assert direct < 0.5 * subset, (r, direct, subset)


def test_logit_factors_of_several_heads_are_each_heads_best():
    """The heads of one layer share the input statistics and are factored in
    one solve: each head's pair is still its own best rank-r fit (the error
    of the Eckart-Young truncation, computed here apart, head by head), with
    heads of different widths and ranks side by side."""
    rng = np.random.default_rng(5)
    n, d = 300, 10
    xa = np.hstack([rng.standard_normal((n, d)) * rng.uniform(0.3, 2, d), np.ones((n, 1))])
    G = xa.T @ xa
    heads, stats, best = [], [], []
    for h, r in ((4, 2), (6, 3), (3, 3)):
        tq, tk = xa @ rng.standard_normal((d + 1, h)), xa @ rng.standard_normal((d + 1, h))
        Cq, Ck = xa.T @ tq, xa.T @ tk
        heads.append((Cq, Ck, np.zeros((d + 1, h)), np.zeros((d + 1, h)), r))
        stats.append((G, Cq, Ck, tq.T @ tq, tk.T @ tk))
        L = np.linalg.cholesky(G)  # the logits' error in the whitened input space: the tail of the singular values
        s = np.linalg.svd(L.T @ np.linalg.solve(G, Cq) @ np.linalg.solve(G, Ck).T @ L, compute_uv=False)
        best.append(float((s[r:] ** 2).sum()))
    pairs = _logit_factors(G, heads, 1e-12)
    assert len(pairs) == 3
    for (a, b), st, (_, _, _, _, r), e in zip(pairs, stats, heads, best):
        assert a.shape == b.shape == (d + 1, r)
        assert np.isclose(_logit_err(*st, a, b), e, rtol=1e-5, atol=1e-8 * float(np.trace(st[3] @ st[4])))


def test_columns_are_matched_by_data_and_doubt_refuses():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((300, 20))
    cols, scale = _match_columns(0.5 * y[:, [3, 7, 1]] + 2.0, y)
    assert cols.tolist() == [3, 7, 1] and np.allclose(scale, 0.5)
    assert _match_columns(y[:, [3, 7]] + y[:, [4, 8]], y) is None  # a mix of columns is no copy


# --------------------------------------------------------------------------- (b)


def _separate_and_joint(m):
    """Half the head dims of ``m`` pruned, then recovered with q and k fitted
    separately and jointly: (the prune result, held-out inputs, separate model,
    its rows, joint model, its rows)."""
    calib, held = _inputs(4, seed=1), _inputs(3, seed=2)
    res = prune(m, {"kinds": {"head_dim": 0.5}, "scope": "local", "importance": "l2"})
    assert any(len(k) < DH for k in res.plan.keep.values())  # head dims did go
    kw = dict(progress=False, rows_per_batch=512)
    sep, rows_sep = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, calib, attention_logits=False, **kw)
    joint, rows = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, calib, **kw)
    onnx.checker.check_model(joint, full_check=True)
    print(format_rows(rows))
    return res, held, sep, rows_sep, joint, rows


def test_head_dims_pruned_q_and_k_refitted_jointly():
    m = attention_model()
    res, held, sep, rows_sep, joint, rows = _separate_and_joint(m)
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


# --------------------------------------------------------------------------- (d)


def _op_block(i, rng, nodes, inits, x, kind):
    """x + proj(attention(q, k, v)) with separate q/k/v layers and the attention
    in one op: ``attention3`` (ONNX Attention, 3-D), ``attention4`` (4-D),
    ``mha`` (com.microsoft MultiHeadAttention with the q/k/v biases packed in the
    op), ``packed`` (com.microsoft Attention: the q/k/v projection inside the op)."""
    def low_rank():
        return rng.standard_normal((D, 3)) @ rng.standard_normal((3, D)) + 0.1 * rng.standard_normal((D, D))

    p = f"b{i}_"
    inits += [_t(p + "wproj", rng.standard_normal((D, D)) / 4), _t(p + "bproj", 0.1 * rng.standard_normal(D))]
    if kind == "packed":  # onnxruntime's Attention: the q/k/v projection inside the op
        w = [low_rank() @ rng.standard_normal((D, D)) / (4 if c == "v" else 3) for c in "qkv"]
        inits += [_t(p + "wqkv", np.concatenate(w, axis=1)),
                  _t(p + "bqkv", np.concatenate([rng.standard_normal(D) for _ in "qkv"]))]
        nodes += [helper.make_node("Attention", [x, p + "wqkv", p + "bqkv"], [p + "o"], name=p + "attn",
                                   domain="com.microsoft", num_heads=H),
                  helper.make_node("MatMul", [p + "o", p + "wproj"], [p + "proj0"], name=p + "proj"),
                  helper.make_node("Add", [p + "proj0", p + "bproj"], [p + "proj1"], name=p + "proj_bias"),
                  helper.make_node("Add", [x, p + "proj1"], [p + "out"], name=p + "residual")]
        return p + "out"
    ops, bias = {}, {}
    for c in "qkv":
        inits.append(_t(p + "w" + c, low_rank() @ rng.standard_normal((D, D)) / (4 if c == "v" else 3)))
        bias[c] = rng.standard_normal(D)  # large: a bias the op adds must not be counted twice
        nodes.append(helper.make_node("MatMul", [x, p + "w" + c], [p + c + "0"], name=p + c))
        ops[c] = p + c + "0"
        if kind != "mha":
            inits.append(_t(p + "b" + c, bias[c]))
            nodes.append(helper.make_node("Add", [ops[c], p + "b" + c], [p + c + "1"], name=p + c + "_bias"))
            ops[c] = p + c + "1"
    if kind == "attention4":
        inits += [_t(p + "shape4", [0, T, H, DH], np.int64), _t(p + "shape3", [0, T, D], np.int64)]
        for c in "qkv":
            nodes += [helper.make_node("Reshape", [ops[c], p + "shape4"], [p + c + "4"], name=p + c + "_split"),
                      helper.make_node("Transpose", [p + c + "4"], [p + c + "t"], name=p + c + "_perm", perm=[0, 2, 1, 3])]
            ops[c] = p + c + "t"
        nodes += [helper.make_node("Attention", [ops[c] for c in "qkv"], [p + "att4"], name=p + "attn"),
                  helper.make_node("Transpose", [p + "att4"], [p + "attt"], name=p + "merge_perm", perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [p + "attt", p + "shape3"], [p + "o"], name=p + "merge")]
    elif kind == "attention3":
        nodes.append(helper.make_node("Attention", [ops[c] for c in "qkv"], [p + "o"], name=p + "attn",
                                      q_num_heads=H, kv_num_heads=H))
    else:
        inits.append(_t(p + "bqkv", np.concatenate([bias["q"], bias["k"], bias["v"]])))
        nodes.append(helper.make_node("MultiHeadAttention", [ops[c] for c in "qkv"] + [p + "bqkv"], [p + "o"],
                                      name=p + "attn", domain="com.microsoft", num_heads=H))
    nodes += [helper.make_node("MatMul", [p + "o", p + "wproj"], [p + "proj0"], name=p + "proj"),
              helper.make_node("Add", [p + "proj0", p + "bproj"], [p + "proj1"], name=p + "proj_bias"),
              helper.make_node("Add", [x, p + "proj1"], [p + "out"], name=p + "residual")]
    return p + "out"


def op_attention_model(kind, seed=0, blocks=2, stem=False):
    """``stem``: the blocks' stream is made by a linear layer and read out by
    another (so that its width can be pruned)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    if stem:
        inits += [_t("w_stem", rng.standard_normal((D, D)) / 4), _t("w_head", rng.standard_normal((D, D)) / 4)]
        nodes.append(helper.make_node("MatMul", ["x", "w_stem"], ["stream"], name="stem"))
        x = "stream"
    for i in range(blocks):
        x = _op_block(i, rng, nodes, inits, x, kind)
    if stem:
        nodes.append(helper.make_node("MatMul", [x, "w_head"], ["head"], name="head"))
        x = "head"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    g = helper.make_graph(nodes, "attn_op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", T, D])], initializer=inits)
    opsets = [helper.make_opsetid("", 23)] + ([helper.make_opsetid("com.microsoft", 1)] if kind in ("mha", "packed") else [])
    m = helper.make_model(g, opset_imports=opsets)
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.mark.parametrize("kind,op", [("attention3", "Attention"), ("attention4", "Attention"),
                                     ("mha", "MultiHeadAttention"), ("packed", "Attention")])
def test_logits_inside_attention_ops_refitted_jointly(kind, op):
    m = op_attention_model(kind)
    res, held, sep, _, joint, rows = _separate_and_joint(m)
    logit_rows = [r for r in rows if r.method == "qk-logits"]
    assert [(r.node, r.op) for r in logit_rows] == [("b0_attn", op), ("b1_attn", op)]
    for r in logit_rows:
        assert r.status == "refit", format_rows(rows)
        assert r.held_after < 0.8 * r.held_before, format_rows(rows)
    # the first block's logits, low-rank at heart and read from the unchanged input, are nearly all kept
    assert logit_rows[0].err_after < 0.05 * logit_rows[0].err_before
    e_pruned, e_sep, e_joint = _rel(m, res.proto, held), _rel(m, sep, held), _rel(m, joint, held)
    print(e_pruned, e_sep, e_joint)
    assert e_sep < e_pruned, (e_pruned, e_sep)
    # a bias counted twice (the op's own, or the layer's bias Add) costs more than this
    assert e_joint < 0.45 * e_sep, (e_pruned, e_sep, e_joint)


def test_packed_attention_refitted_as_a_consumer_of_the_pruned_stream():
    """Embed channels go: the packed Attention reads the narrower stream, and
    its q/k/v projection is re-fitted like any linear layer."""
    m = op_attention_model("packed", stem=True)
    calib, held = _inputs(4, seed=1), _inputs(3, seed=2)
    res = prune(m, {"kinds": {"embed": 0.25}, "scope": "local", "importance": "l2"})
    rec, rows = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, calib, progress=False, rows_per_batch=512)
    onnx.checker.check_model(rec, full_check=True)
    print(format_rows(rows))
    by = {r.node: r for r in rows}
    for name, gain in (("b0_attn", 0.5), ("b1_attn", 1.0)):  # the first reads the stream where only the stem changed
        assert by[name].op == "Attention" and by[name].inputs_kept == "12/16", format_rows(rows)
        assert by[name].status == "refit" and by[name].held_after < gain * by[name].held_before, format_rows(rows)
    s0, sp, sr = (runtime.session(p) for p in (m, res.proto, rec))
    err = {"pruned": 0.0, "recovered": 0.0}
    den = 0.0
    for x in held:
        y0 = s0.run(None, {"x": x})[0]
        den += float((y0 ** 2).sum())
        err["pruned"] += float(((sp.run(None, {"x": x})[0] - y0) ** 2).sum())
        err["recovered"] += float(((sr.run(None, {"x": x})[0] - y0) ** 2).sum())
    assert err["recovered"] < 0.8 * err["pruned"], err


def test_torch_dynamo_opset23_export_attention_op_refitted(tmp_path):
    """timm's ViT through torch's dynamo exporter at opset 23:
    scaled_dot_product_attention becomes the ONNX Attention op (4-D q/k/v
    sliced from the fused qkv layer); the logits are re-fitted inside it."""
    import warnings

    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from timm_models import randomize

    warnings.filterwarnings("ignore")
    net = randomize(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), seed=2).eval()
    path = str(tmp_path / "vit23.onnx")
    torch.onnx.export(net, (torch.randn(2, 3, 32, 32),), dynamo=True, opset_version=23,
                      dynamic_shapes=({0: "batch"},)).save(path)
    assert sum(n.op_type == "Attention" for n in onnx.load(path).graph.node) == 2
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((64, 3, 32, 32)).astype(np.float32))
    held = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    ratios = {"kinds": {"head_dim": 0.5}, "importance": "l2"}
    out = {}
    for joint in (False, True):
        out[joint] = prune(path, ratios, calib=str(tmp_path / "calib.npy"), recover="ridge",
                           recover_options={"attention_logits": joint})
    rows = [r for r in out[True].recovery if r.method == "qk-logits"]
    assert [r.op for r in rows] == ["Attention", "Attention"], format_rows(out[True].recovery)
    assert all(r.status == "refit" and r.held_after < 0.8 * r.held_before for r in rows), format_rows(out[True].recovery)
    y0 = runtime.session(onnx.load(path)).run(None, {"x": held})[0]
    err = {j: float(((runtime.session(r.proto).run(None, {"x": held})[0] - y0) ** 2).sum()) for j, r in out.items()}
    assert err[True] < err[False], err


def test_torch_multihead_attention_sequence_first_logits_refitted(tmp_path):
    """torch's nn.MultiheadAttention through the legacy exporter: q and k are
    columns of one packed in_proj read as [tokens, B, E] (sequence first), the
    logits' operands [B, heads, tokens, d]. The rows are matched in the
    layer's order and the logits re-fitted jointly."""
    import warnings

    torch = pytest.importorskip("torch")
    warnings.filterwarnings("ignore")

    class Block(torch.nn.Module):
        def __init__(s, C=32, H=4):
            super().__init__()
            s.ln = torch.nn.LayerNorm(C)
            s.attn = torch.nn.MultiheadAttention(C, H)
            s.f1, s.f2 = torch.nn.Linear(C, 2 * C), torch.nn.Linear(2 * C, C)

        def forward(s, x):
            h = s.ln(x)
            x = x + s.attn(h, h, h, need_weights=False)[0]
            return x + s.f2(torch.nn.functional.gelu(s.f1(x)))

    class M(torch.nn.Module):
        def __init__(s, C=32):
            super().__init__()
            s.embed = torch.nn.Conv2d(3, C, 4, 4)
            s.blocks = torch.nn.Sequential(Block(C), Block(C))
            s.head = torch.nn.Linear(C, 10)

        def forward(s, x):
            t = s.embed(x).flatten(2).permute(2, 0, 1)  # [L, N, E]
            return s.head(s.blocks(t).mean(0))

    torch.manual_seed(0)
    path = str(tmp_path / "mha.onnx")
    torch.onnx.export(M().eval(), (torch.randn(2, 3, 16, 16),), path, dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((64, 3, 16, 16)).astype(np.float32))
    held = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    ratios = {"default": 0, "kinds": {"head_dim": 0.5}, "importance": "l2"}
    out = {}
    for joint in (False, True):
        out[joint] = prune(path, ratios, calib=str(tmp_path / "calib.npy"), recover="ridge",
                           recover_options={"attention_logits": joint})
    rows = [r for r in out[True].recovery if r.method == "qk-logits"]
    assert len(rows) == 2, format_rows(out[True].recovery)
    assert all(r.status == "refit" and r.held_after < 0.9 * r.held_before for r in rows), format_rows(out[True].recovery)
    y0 = runtime.session(onnx.load(path)).run(None, {"x": held})[0]
    err = {j: float(((runtime.session(r.proto).run(None, {"x": held})[0] - y0) ** 2).sum()) for j, r in out.items()}
    print(err)
    assert err[True] < err[False], err


@pytest.mark.parametrize("equation, kind", [
    ("bhid,bhjd->bhij", "einsum"), ("bhid,bhdj->bhij", "matmul"), ("B G H I D, B G H J D -> B G H I J", "einsum"),
    ("...id,...jd->...ij", "einsum"),
    ("bhid,bhjd->bhji", None), ("bhid,bjhd->bhij", None), ("bhid,bhjd->bij", None),
    ("bhij,bhjd->bhid", "matmul"),  # a MatMul's contraction: logits only where a Softmax follows (_logit_sites)
    ("bhid,bhid->bhii", None), ("id,jd", None)])
def test_einsum_equations_that_form_attention_logits(equation, kind):
    from onnxprune.recover.graph import _einsum_logits

    assert _einsum_logits(equation) == kind


def _einsum_net(torch, layout: str, form: str):
    """Two pre-norm attention blocks on 4x4 patches of a 16 px image; the logits
    formed by ``form``: "einsum" (``torch.einsum``) or "matmul" (``q @ k^T``)."""

    def logits(q, k, eq):
        return torch.einsum(eq, q, k) if form == "einsum" else q @ k.transpose(-1, -2)

    class Block(torch.nn.Module):
        def __init__(s, C=32, H=4):
            super().__init__()
            s.H, s.ln, s.qkv, s.proj = H, torch.nn.LayerNorm(C), torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)
            s.f1, s.f2 = torch.nn.Linear(C, 2 * C), torch.nn.Linear(2 * C, C)

        def forward(s, x):
            B, T, C = x.shape
            d = C // s.H
            if layout == "windows":  # MaxViT: [B, G, P, C] windows, heads split after the layer
                G = 4
                q, k, v = torch.chunk(s.qkv(s.ln(x)).reshape(B, G, T // G, 3 * C), 3, dim=-1)
                q, k, v = (t.reshape(B, G, T // G, s.H, d).permute(0, 1, 3, 2, 4) for t in (q, k, v))
                a = logits(q * d ** -0.5, k, "bghid,bghjd->bghij").softmax(-1)
                o = (a @ v).permute(0, 1, 3, 2, 4).reshape(B, T, C)
            else:
                q, k, v = s.qkv(s.ln(x)).reshape(B, T, 3, s.H, d).permute(2, 0, 3, 1, 4)
                if layout == "k":
                    a = logits(q * d ** -0.5, k, "bhid,bhjd->bhij")
                elif form == "einsum":  # k^T on the right, as a MatMul takes it
                    a = torch.einsum("bhid,bhdj->bhij", q * d ** -0.5, k.transpose(-1, -2))
                else:
                    a = q * d ** -0.5 @ k.transpose(-1, -2)
                o = (a.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
            x = x + s.proj(o)
            return x + s.f2(torch.nn.functional.gelu(s.f1(x)))

    class M(torch.nn.Module):
        def __init__(s, C=32):
            super().__init__()
            s.embed = torch.nn.Conv2d(3, C, 4, 4)
            s.blocks = torch.nn.Sequential(Block(C), Block(C))
            s.head = torch.nn.Linear(C, 10)

        def forward(s, x):
            return s.head(s.blocks(s.embed(x).flatten(2).transpose(1, 2)).mean(1))

    torch.manual_seed(0)
    return M().eval()


@pytest.mark.parametrize("layout", ["k", "kt", "windows"])
def test_einsum_attention_logits_refitted(tmp_path, layout):
    """Attention logits written with ``torch.einsum`` (legacy export: ``Einsum``
    ops): ``bhid,bhjd->bhij`` (k untransposed), ``bhid,bhdj->bhij`` (k^T, a
    MatMul's contraction) and MaxViT's windowed ``bghid,bghjd->bghij`` with q/k/v
    from ``torch.chunk`` of one layer. Pruning head dims, the logits are
    re-fitted jointly (held-out logit error down) and the recovered model is the
    one recovery makes of the same weights with the logits formed by a MatMul."""
    import warnings

    torch = pytest.importorskip("torch")
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((64, 3, 16, 16)).astype(np.float32))
    held = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    ratios = {"default": 0, "kinds": {"head_dim": 0.5}, "importance": "l2"}
    got = {}
    for form in ("einsum", "matmul"):
        path = str(tmp_path / f"{form}.onnx")
        torch.onnx.export(_einsum_net(torch, layout, form), (torch.randn(2, 3, 16, 16),), path, dynamo=False,
                          opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "n"}})
        assert sum(n.op_type == "Einsum" for n in onnx.load(path).graph.node) == (2 if form == "einsum" else 0)
        res = prune(path, ratios, calib=str(tmp_path / "calib.npy"), recover="ridge")
        rows = [r for r in res.recovery if r.method == "qk-logits"]
        assert [r.op for r in rows] == ["Einsum" if form == "einsum" else "MatMul"] * 2, format_rows(res.recovery)
        assert all(r.status == "refit" and r.held_after < 0.9 * r.held_before for r in rows), format_rows(res.recovery)
        got[form] = runtime.session(res.proto).run(None, {"x": held})[0]
    y0 = runtime.session(onnx.load(str(tmp_path / "einsum.onnx"))).run(None, {"x": held})[0]
    scale = float(np.abs(got["matmul"] - y0).max())
    assert scale > 1e-3  # the pruning changed the outputs: equal recoveries below are not two untouched models
    np.testing.assert_allclose(got["einsum"], got["matmul"], atol=1e-3 * scale + 1e-5)


def test_joint_fit_is_written_from_every_source_and_checked_without_the_kept_out_ones(monkeypatch):
    """With 8 or more sources an eighth is kept out of the checked fits: the
    first block's q/k (whose qkv layer reads the model's input, the same rows
    in every recovery) is written as a recovery that keeps nothing out writes
    it, and the model the whole-model check runs has it as a recovery that
    writes its checked fits has it."""
    import onnxprune.recover as R
    from onnxprune.plan.importance.calib import Calibration
    from onnxprune.recover.fit import _folds

    m = attention_model()
    xs = _inputs(4, seed=1)
    src = [np.arange(16 * i, 16 * (i + 1)) % 10 for i in range(4)]
    fold = _folds([{"x": x} for x in xs], src, 0, reserve=R.CHECK_FRACTION)
    for x, f in zip(xs, fold):  # the kept-out source unlike the rest: fits that learnt from it differ
        x[f < 0] = x[f < 0] * 2 + 0.5
    cal = Calibration(xs, None, "random", sources=src)
    res = prune(m, {"kinds": {"head_dim": 0.5}, "scope": "local", "importance": "l2"})
    judged = []
    real = R.held_out_check
    monkeypatch.setattr(R, "held_out_check", lambda o, p, rec, *a, **k: judged.append(rec) or real(o, p, rec, *a, **k))

    def qkv(**kw):
        out, rows = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, cal, progress=False, rows_per_batch=512,
                            ridge_select=False, **kw)
        assert {r.node: r.status for r in rows if r.method == "qk-logits"}.get("b0_qk") == "refit", format_rows(rows)
        return out, next(numpy_helper.to_array(t) for t in out.graph.initializer if t.name.startswith("b0_wqkv"))

    written, w_one = qkv()
    w_check = next(numpy_helper.to_array(t) for t in judged[-1].graph.initializer if t.name.startswith("b0_wqkv"))
    _, w_every = qkv(check_fraction=0.0)
    _, w_checked = qkv(refit_all=False)
    np.testing.assert_allclose(w_one, w_every, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w_check, w_checked, rtol=1e-4, atol=1e-5)
    assert np.abs(w_one - w_check).max() > 1e-3

"""Params and MACs terms of single small nodes, checked against numbers worked
out by hand from the node's definition: every factor's size and the axis it is
read from (``("in"|"out", slot, axis)``, or None for a constant such as a kernel
size), so the plan-level estimate scales the right factor when an axis is
pruned. Each model is a handful of nodes built with onnx.helper; shape
inference runs inside :func:`metrics.terms`."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP, helper, numpy_helper

from onnxprune.core import metrics
from onnxprune.core.metrics import Factor

MS = "com.microsoft"


def _model(nodes, inputs, outputs, inits=(), opset=17, ms=False):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if ms else [])
    return helper.make_model(g, opset_imports=ops, ir_version=10)


def _t(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.ones(shape, dtype), name)


def _vi(name, shape, dtype=TP.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _terms(m):
    """``{(node, metric): [factors as (dim, ref)] ...}`` in the order found."""
    out: dict = {}
    for t in metrics.terms(m):
        out.setdefault((t.node, t.metric), []).append([(f.dim, f.ref) for f in t.factors])
    return out


def _ins(slot, shape):
    return [(d, ("in", slot, a)) for a, d in enumerate(shape)]


def _outs(shape):
    return [(d, ("out", 0, a)) for a, d in enumerate(shape)]


def test_conv_strided_grouped_with_symbolic_batch():
    # X [N, 4, 9, 9], W [6, 2, 3, 3] (group 2), stride 2, pad 1 -> Y [1, 6, 5, 5] at batch 1
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, strides=[2, 2], pads=[1, 1, 1, 1])
    m = _model([conv], [_vi("x", ["N", 4, 9, 9])], [_vi("y", None)], [_t("w", (6, 2, 3, 3)), _t("b", (6,))])
    got = _terms(m)
    assert got[(0, "params")] == [_ins(1, [6, 2, 3, 3]), _ins(2, [6])]
    # every output element x C_in/group x kernel
    assert got[(0, "macs")] == [_outs([1, 6, 5, 5]) + [(2, ("in", 1, 1)), (3, None), (3, None)]]
    assert metrics.count(m) == {"params": 6 * 2 * 9 + 6, "macs": 150 * 2 * 9}
    # the caller's model is left as it was (batch still symbolic)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_conv_transpose_counts_input_elements():
    # X [1, 2, 3, 3], W [2, 5, 2, 2], stride 2 -> Y [1, 5, 6, 6]; MACs: 18 inputs x 5 x 2 x 2
    ct = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])
    m = _model([ct], [_vi("x", [1, 2, 3, 3])], [_vi("y", None)], [_t("w", (2, 5, 2, 2))])
    got = _terms(m)
    assert got[(0, "macs")] == [_ins(0, [1, 2, 3, 3]) + [(5, ("in", 1, 1)), (2, None), (2, None)]]
    assert metrics.count(m) == {"params": 40, "macs": 18 * 20}


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 1), (0, 1), (1, 0), (None, None)])
def test_gemm_contracted_width_follows_trans_a(trans_a, trans_b):
    # A is 2 x 6 (6 x 2 when transposed), B 6 x 5 (5 x 6): Y [2, 5], each output sums 6 products
    a = [6, 2] if trans_a else [2, 6]
    b = [5, 6] if trans_b else [6, 5]
    attrs = {k: v for k, v in (("transA", trans_a), ("transB", trans_b)) if v is not None}
    gemm = helper.make_node("Gemm", ["a", "b"], ["y"], **attrs)
    m = _model([gemm], [_vi("a", a)], [_vi("y", None)], [_t("b", b)])
    got = _terms(m)
    assert got[(0, "macs")] == [_outs([2, 5]) + [(6, ("in", 0, 0 if trans_a else 1))]]
    assert got[(0, "params")] == [_ins(1, b)]
    assert metrics.count(m) == {"params": 30, "macs": 60}


def test_matmul_weight_and_activation_product():
    # [1, 3, 4] @ W[4, 7] -> [1, 3, 7]: 21 outputs x 4; then [1, 3, 7] @ [1, 7, 2] (activation) -> [1, 3, 2]: 6 x 7
    mm1 = helper.make_node("MatMul", ["x", "w"], ["h"])
    mm2 = helper.make_node("MatMul", ["h", "z"], ["y"])
    m = _model([mm1, mm2], [_vi("x", [1, 3, 4]), _vi("z", [1, 7, 2])], [_vi("y", None)], [_t("w", (4, 7))])
    got = _terms(m)
    assert got[(0, "macs")] == [_outs([1, 3, 7]) + [(4, ("in", 0, 2))]]
    assert got[(1, "macs")] == [_outs([1, 3, 2]) + [(7, ("in", 0, 2))]]
    assert (1, "params") not in got
    assert metrics.count(m) == {"params": 28, "macs": 84 + 42}


def test_params_count_weights_per_use_and_skip_scalars_and_shapes():
    # w (2 elements) read twice counts twice; a one-element float, an int64 shape
    # and an int32 tensor are no weights; fp16 and int8 tensors are
    w = _t("w", (2,))
    one = _t("one", (1,))
    shape = numpy_helper.from_array(np.array([2, 1], np.int64), "shape")
    i32 = numpy_helper.from_array(np.ones((3,), np.int32), "i32")
    h = _t("h", (2, 3), np.float16)
    q = _t("q", (5,), np.int8)
    nodes = [helper.make_node("Add", ["x", "w"], ["a"]), helper.make_node("Mul", ["a", "w"], ["b"]),
             helper.make_node("Add", ["b", "one"], ["c"]), helper.make_node("Reshape", ["c", "shape"], ["d"]),
             helper.make_node("Identity", ["h"], ["e"]), helper.make_node("Identity", ["q"], ["f"]),
             helper.make_node("Identity", ["i32"], ["g"])]
    m = _model(nodes, [_vi("x", [2])], [_vi("d", None), _vi("e", None), _vi("f", None), _vi("g", None)],
               [w, one, shape, h, q, i32])
    got = _terms(m)
    assert got == {(0, "params"): [_ins(1, [2])], (1, "params"): [_ins(1, [2])],
                   (4, "params"): [_ins(0, [2, 3])], (5, "params"): [_ins(0, [5])]}
    assert metrics.count(m) == {"params": 2 + 2 + 6 + 5, "macs": 0}


def test_shapes_read_symbolic_dims_as_one():
    g = helper.make_graph([], "g", [_vi("x", ["B", 3, "T"])], [_vi("y", [2, "S"])],
                          initializer=[_t("w", (4, 5))], value_info=[_vi("v", ["Q", 7])])
    m = helper.make_model(g)
    assert metrics._shapes(m) == {"x": [1, 3, 1], "y": [2, 1], "v": [1, 7], "w": [4, 5]}


def test_term_value_is_the_product():
    t = metrics.Term(0, "macs", (Factor(3, None), Factor(5, ("in", 0, 1)), Factor(2, None)))
    assert t.value == 30


def test_quantized_ops_cost_like_their_float_op():
    u8, i8 = TP.UINT8, TP.INT8
    sc = _t("sc", ())
    zp = numpy_helper.from_array(np.array(0, np.uint8), "zp")
    wzp = numpy_helper.from_array(np.array(0, np.int8), "wzp")
    inits = [_t("wc", (3, 2, 3, 3), np.int8), _t("wm", (4, 6), np.int8), sc, zp, wzp]
    nodes = [
        # X [1, 2, 5, 5] -> [1, 3, 3, 3]: 27 outputs x 2 x 3 x 3
        helper.make_node("ConvInteger", ["x", "wc"], ["c1"]),
        helper.make_node("QLinearConv", ["x", "sc", "zp", "wc", "sc", "wzp", "sc", "zp"], ["c2"]),
        # A [2, 4] @ [4, 6] -> [2, 6]: 12 outputs x 4
        helper.make_node("MatMulInteger", ["a", "wm"], ["m1"]),
        helper.make_node("QLinearMatMul", ["a", "sc", "zp", "wm", "sc", "wzp", "sc", "zp"], ["m2"]),
    ]
    m = _model(nodes, [_vi("x", [1, 2, 5, 5], u8), _vi("a", [2, 4], u8)],
               [_vi("c1", None, TP.INT32), _vi("c2", None, u8), _vi("m1", None, TP.INT32), _vi("m2", None, u8)],
               inits, opset=13)
    got = _terms(m)
    conv = lambda ws: _outs([1, 3, 3, 3]) + [(2, ("in", ws, 1)), (3, None), (3, None)]  # noqa: E731
    assert got[(0, "macs")] == [conv(1)]
    assert got[(1, "macs")] == [conv(3)]
    assert got[(2, "macs")] == [_outs([2, 6]) + [(4, ("in", 0, 1))]]
    assert got[(3, "macs")] == [_outs([2, 6]) + [(4, ("in", 0, 1))]]
    # int8 weights are params (the scalar scales and zero points are not)
    assert got[(0, "params")] == [_ins(1, [3, 2, 3, 3])] and got[(1, "params")] == [_ins(3, [3, 2, 3, 3])]
    assert got[(3, "params")] == [_ins(3, [4, 6])]
    assert metrics.count(m) == {"params": 2 * 54 + 2 * 24, "macs": 2 * 27 * 18 + 2 * 48}


def test_conv_without_inferred_output_has_no_macs():
    # the Conv's output shape cannot be inferred (weight channels do not match), so no MACs term
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    m = _model([conv], [_vi("x", [1, 2, 4, 4])], [_vi("y", None)], [_t("w", (3, 2, 3, 3))])
    m.graph.node[0].input[0] = "x"
    assert (0, "macs") in _terms(m)
    # a Conv whose data input has no shape at all
    m2 = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [helper.make_tensor_value_info("x", TP.FLOAT, None)],
                [_vi("y", None)], [_t("w", (3, 2, 3, 3))])
    assert (0, "macs") not in _terms(m2)
    m3 = _model([helper.make_node("Gemm", ["x", "w"], ["y"])], [helper.make_tensor_value_info("x", TP.FLOAT, None)],
                [_vi("y", None)], [_t("w", (3, 2))])
    assert (0, "macs") not in _terms(m3)
    m4 = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [helper.make_tensor_value_info("x", TP.FLOAT, None)],
                [_vi("y", None)], [_t("w", (3, 2))])
    assert (0, "macs") not in _terms(m4)


# -- ONNX Attention (opset 23) --------------------------------------------------------------


def test_onnx_attention_4d():
    # Q [1, 2 heads, 3, 4], K [1, 2, 5, 4], V [1, 2, 5, 6]: QK^T 1x2x3x5 x 4, AV 1x2x3x5 x 6
    att = helper.make_node("Attention", ["q", "k", "v"], ["y"])
    m = _model([att], [_vi("q", [1, 2, 3, 4]), _vi("k", [1, 2, 5, 4]), _vi("v", [1, 2, 5, 6])], [_vi("y", None)],
               opset=23)
    qk = [(1, ("in", 0, 0)), (2, ("in", 0, 1)), (3, ("in", 0, 2)), (5, ("in", 1, 2))]
    assert _terms(m) == {(0, "macs"): [qk + [(4, ("in", 0, 3))], qk + [(6, ("in", 2, 3))]]}
    assert metrics.count(m)["macs"] == 30 * 4 + 30 * 6


def test_onnx_attention_3d():
    # Q [2, 3, 8], K [2, 5, 8], V [2, 5, 12] (2 heads folded): 2x3 rows x 5 keys x (8 + 12)
    att = helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=2, kv_num_heads=2)
    m = _model([att], [_vi("q", [2, 3, 8]), _vi("k", [2, 5, 8]), _vi("v", [2, 5, 12])], [_vi("y", None)], opset=23)
    assert _terms(m) == {(0, "macs"): [[(6, None), (5, None), (20, None)]]}
    assert metrics.count(m)["macs"] == 600


def test_onnx_attention_mixed_ranks_and_missing_shapes():
    # 4-D Q with 3-D K/V is no 4-D attention: counted by the 3-D formula over the given dims
    att = helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=2, kv_num_heads=2)
    m = _model([att], [_vi("q", [1, 2, 3, 4]), _vi("k", [1, 5, 8]), _vi("v", [1, 5, 8])], [_vi("y", None)], opset=23)
    assert _terms(m) == {(0, "macs"): [[(6, None), (5, None), (12, None)]]}
    for shapes in ([[1, 2, 3, 4], [1, 2, 5, 4], [1, 2, 5]], [[1, 2, 3, 4], [1, 2, 5], [1, 2, 5, 4]]):
        m = _model([helper.make_node("Attention", ["q", "k", "v"], ["y"])],
                   [_vi(n, s) for n, s in zip("qkv", shapes)], [_vi("y", None)], opset=23)
        # a mixed-rank K/V: the 3-D formula on Q's rows x K's second-to-last x (D + Dv)
        (t,) = metrics.terms(m)
        assert [f.dim for f in t.factors] == [6, shapes[1][-2], 4 + shapes[2][-1]]
    unknown = helper.make_tensor_value_info("v", TP.FLOAT, None)
    for names in (["q", "k", "v"], ["v", "k", "q"], ["q", "v", "k"]):
        m = _model([helper.make_node("Attention", names, ["y"])], [_vi("q", [1, 2, 3, 4]), _vi("k", [1, 2, 5, 4]), unknown],
                   [_vi("y", None)], opset=23)
        assert metrics.terms(m) == []


# -- com.microsoft fused attention ---------------------------------------------------------


def test_ms_packed_attention():
    # x [1, 3, 8] @ W [8, 24]: 3 rows x 8 x 24; QK^T 3 x 3 x 8 (q width); AV 3 x 3 x 8 (v width)
    att = helper.make_node("Attention", ["x", "w", "b"], ["y"], domain=MS, num_heads=2)
    m = _model([att], [_vi("x", [1, 3, 8])], [_vi("y", None)], [_t("w", (8, 24)), _t("b", (24,))], ms=True)
    got = _terms(m)
    bs = [(1, ("in", 0, 0)), (3, ("in", 0, 1))]
    assert got[(0, "macs")] == [bs + [(8, ("in", 1, 0)), (24, ("in", 1, 1))], bs + [(3, None), (8, ("x", "q", 0))],
                                bs + [(3, None), (8, ("x", "v", 0))]]
    assert got[(0, "params")] == [_ins(1, [8, 24]), _ins(2, [24])]


def test_ms_packed_attention_sizes_and_past():
    # explicit widths q 6, k 6, v 4 (W [8, 16]); a past of 2 steps: keys are 3 + 2
    att = helper.make_node("Attention", ["x", "w", "b", "", "past"], ["y", "present"], domain=MS, num_heads=2,
                           qkv_hidden_sizes=[6, 6, 4])
    m = _model([att], [_vi("x", [2, 3, 8]), _vi("past", [2, 2, 2, 2, 3])], [_vi("y", None)],
               [_t("w", (8, 16)), _t("b", (16,))], ms=True)
    bs = [(2, ("in", 0, 0)), (3, ("in", 0, 1))]
    assert _terms(m)[(0, "macs")] == [bs + [(8, ("in", 1, 0)), (16, ("in", 1, 1))], bs + [(5, None), (6, ("x", "q", 0))],
                                      bs + [(5, None), (4, ("x", "v", 0))]]
    # a past that is not 5-D is ignored
    att2 = helper.make_node("Attention", ["x", "w", "b", "", "past"], ["y"], domain=MS, num_heads=2)
    m2 = _model([att2], [_vi("x", [1, 3, 8]), _vi("past", [2, 1, 2, 2])], [_vi("y", None)],
                [_t("w", (8, 24)), _t("b", (24,))], ms=True)
    assert [f.dim for f in metrics.terms(m2)[-1].factors] == [1, 3, 3, 8]


def test_ms_attention_without_usable_shapes_has_no_macs():
    cases = [
        # x not 3-D
        (["x", "w", "b"], [_vi("x", [3, 8])], [_t("w", (8, 24)), _t("b", (24,))]),
        # weight not 2-D
        (["x", "w", "b"], [_vi("x", [1, 3, 8])], [_t("w", (8, 24, 1)), _t("b", (24,))]),
        # no weight input at all
        (["x"], [_vi("x", [1, 3, 8])], []),
        # no input at all
        ([], [], []),
    ]
    for ins, vis, inits in cases:
        att = helper.make_node("Attention", ins, ["y"], domain=MS, num_heads=2)
        m = _model([att], vis, [_vi("y", None)], inits, ms=True)
        assert [t for t in metrics.terms(m) if t.metric == "macs"] == [], ins
    # another com.microsoft op, and a weight given but with unknown shape
    gelu = helper.make_node("FastGelu", ["x"], ["y"], domain=MS)
    m = _model([gelu], [_vi("x", [1, 3, 8])], [_vi("y", None)], ms=True)
    assert metrics.terms(m) == []
    att = helper.make_node("Attention", ["x", "w"], ["y"], domain=MS, num_heads=2)
    m = _model([att], [_vi("x", [1, 3, 8]), helper.make_tensor_value_info("w", TP.FLOAT, None)], [_vi("y", None)], ms=True)
    assert metrics.terms(m) == []


def test_ms_multi_head_attention():
    # q [1, 3, 8], k [1, 5, 8], v [1, 5, 6]: QK^T 3 x 5 x 8, AV 3 x 5 x 6
    mha = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain=MS, num_heads=2)
    m = _model([mha], [_vi("q", [1, 3, 8]), _vi("k", [1, 5, 8]), _vi("v", [1, 5, 6])], [_vi("y", None)], ms=True)
    bs = [(1, ("in", 0, 0)), (3, ("in", 0, 1))]
    assert _terms(m) == {(0, "macs"): [bs + [(5, None), (8, ("in", 0, 2))], bs + [(5, None), (6, ("in", 2, 2))]]}
    # past_key (slot 6) [B, heads, 4 steps, D]: keys are 5 + 4
    ins = ["q", "k", "v", "", "", "", "pk", "pv"]
    mha = helper.make_node("MultiHeadAttention", ins, ["y"], domain=MS, num_heads=2)
    m = _model([mha], [_vi("q", [1, 3, 8]), _vi("k", [1, 5, 8]), _vi("v", [1, 5, 6]), _vi("pk", [1, 2, 4, 4]),
                       _vi("pv", [1, 2, 4, 3])], [_vi("y", None)], ms=True)
    assert _terms(m) == {(0, "macs"): [bs + [(9, None), (8, ("in", 0, 2))], bs + [(9, None), (6, ("in", 2, 2))]]}
    # a 3-D past is no past
    m = _model([mha], [_vi("q", [1, 3, 8]), _vi("k", [1, 5, 8]), _vi("v", [1, 5, 6]), _vi("pk", [1, 4, 8]),
                       _vi("pv", [1, 2, 4, 3])], [_vi("y", None)], ms=True)
    assert [f.dim for f in metrics.terms(m)[0].factors] == [1, 3, 5, 8]


def test_ms_multi_head_attention_packed_or_missing_kv_has_no_macs():
    for ins, vis in [(["q"], [_vi("q", [1, 3, 8])]),
                     (["q", "k"], [_vi("q", [1, 3, 8]), _vi("k", [1, 5, 8])]),
                     (["q", "", "v"], [_vi("q", [1, 3, 8]), _vi("v", [1, 5, 8])]),
                     (["q", "k", ""], [_vi("q", [1, 3, 8]), _vi("k", [1, 5, 8])]),
                     (["q", "k", "v"], [_vi("q", [1, 3, 8]), _vi("k", [1, 2, 5, 4]), _vi("v", [1, 5, 8])]),
                     (["q", "k", "v"], [_vi("q", [1, 3, 8]), _vi("k", [1, 5, 8]), _vi("v", [1, 2, 5, 4])])]:
        mha = helper.make_node("MultiHeadAttention", ins, ["y"], domain=MS, num_heads=2)
        m = _model([mha], vis, [_vi("y", None)], ms=True)
        assert metrics.terms(m) == [], ins


def test_ms_group_query_attention():
    # q [1, 3, 8] (4 heads of 2), k/v [1, 3, 4] (2 kv heads); past_key (slot 3) [1, 2, 6, 2]: keys 3 + 6
    ins = ["q", "k", "v", "pk", "pv", "sl", "tl"]
    gqa = helper.make_node("GroupQueryAttention", ins, ["y", "pko", "pvo"], domain=MS, num_heads=4, kv_num_heads=2)
    vis = [_vi("q", [1, 3, 8]), _vi("k", [1, 3, 4]), _vi("v", [1, 3, 4]), _vi("pk", [1, 2, 6, 2]), _vi("pv", [1, 2, 6, 2]),
           _vi("sl", [1], TP.INT32), _vi("tl", [1], TP.INT32)]
    m = _model([gqa], vis, [_vi("y", None)], ms=True)
    term = [(1, ("in", 0, 0)), (3, ("in", 0, 1)), (9, None), (8, ("in", 0, 2))]
    assert _terms(m) == {(0, "macs"): [term, term]}
    assert metrics.count(m)["macs"] == 2 * 3 * 9 * 8


def test_nodes_with_too_few_shapes_or_inputs():
    unknown = lambda n: helper.make_tensor_value_info(n, TP.FLOAT, None)  # noqa: E731
    # a Conv whose weight is an input of unknown shape: no MACs (its output cannot be inferred)
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [_vi("x", [1, 2, 4, 4]), unknown("w")], [unknown("y")])
    assert metrics.terms(m) == []
    # Gemm / MatMul whose data input is unknown but whose output is declared: still no MACs
    for op in ("Gemm", "MatMul"):
        m = _model([helper.make_node(op, ["x", "w"], ["y"])], [unknown("x")], [_vi("y", [3, 2])], [_t("w", (4, 2))])
        assert [t.metric for t in metrics.terms(m)] == ["params"], op
    # ONNX Attention with a mask (4 inputs): the mask does not change the count
    att = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"])
    m = _model([att], [_vi("q", [1, 2, 3, 4]), _vi("k", [1, 2, 5, 4]), _vi("v", [1, 2, 5, 6]), _vi("mask", [3, 5])],
               [_vi("y", None)], opset=23)
    assert metrics.count(m)["macs"] == 30 * 4 + 30 * 6


def test_ms_ops_with_optional_inputs_left_out():
    # packed Attention without a bias (2 inputs) and with an empty mask slot (4 inputs): no past
    for ins in (["x", "w"], ["x", "w", "b", ""]):
        att = helper.make_node("Attention", ins, ["y"], domain=MS, num_heads=2)
        m = _model([att], [_vi("x", [1, 3, 8])], [_vi("y", None)], [_t("w", (8, 24)), _t("b", (24,))], ms=True)
        macs = [t for t in metrics.terms(m) if t.metric == "macs"]
        assert [[f.dim for f in t.factors] for t in macs] == [[1, 3, 8, 24], [1, 3, 3, 8], [1, 3, 3, 8]], ins
        # every factor is a whole number of elements
        assert all(type(f.dim) is int for t in macs for f in t.factors)
    # MultiHeadAttention with six inputs (no past slot) and GroupQueryAttention with three
    for op, ins in (("MultiHeadAttention", ["q", "k", "v", "", "", ""]), ("GroupQueryAttention", ["q", "k", "v"])):
        node = helper.make_node(op, ins, ["y"], domain=MS, num_heads=2, kv_num_heads=2)
        m = _model([node], [_vi("q", [1, 3, 8]), _vi("k", [1, 5, 8]), _vi("v", [1, 5, 8])], [_vi("y", None)], ms=True)
        assert [[f.dim for f in t.factors] for t in metrics.terms(m)] == [[1, 3, 5, 8], [1, 3, 5, 8]], op

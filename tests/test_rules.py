"""Per-rule-family tests: small hand-written ONNX models, their analysis, the
zero-contribution oracle and the pruned model's tensors, shapes and attributes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune import io
from onnxprune.api import analyze, prune
from onnxprune.errors import UserError
from onnxprune.plan import Ratios
from onnxprune.verify import oracle

HALF = {"default": 0.5}


# -- helpers -------------------------------------------------------------------------
def make(text: str, inits: dict, opset: int = 17) -> onnx.ModelProto:
    """Parse a graph (without initializers) and attach ``inits`` as initializers."""
    m = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n{text}')
    for name, arr in inits.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    onnx.checker.check_model(m, full_check=True)
    return m


_rng = np.random.default_rng(1234)


def W(*shape) -> np.ndarray:
    """Distinct random float32 weights."""
    return (_rng.standard_normal(shape) * 0.5).astype(np.float32)


def I64(*vals) -> np.ndarray:
    return np.array(vals, dtype=np.int64)


def prunable(a):
    return [g for g in a.groups if not g.frozen]


def frozen(a):
    return [g for g in a.groups if g.frozen]


def init(proto, name) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == name))


def node(proto, name) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if n.name == name)


def weight(proto, node_name, slot=1) -> np.ndarray:
    return init(proto, node(proto, node_name).input[slot])


def attr(proto, node_name, key):
    return onnx.helper.get_attribute_value(next(a for a in node(proto, node_name).attribute if a.name == key))


def run(proto):
    return io.session(proto).run(None, io.random_inputs(proto, batch=1, seed=3))


def assert_oracle(m, ratios=HALF, approx_ok=False):
    rows = oracle(m, Ratios.from_dict(ratios))
    ok = {"PASS", "approximate (not tested)"} if approx_ok else {"PASS"}
    assert rows, "oracle produced no rows (nothing removed)"
    for r in rows:
        assert r.status in ok, (r.scope, r.status, r.max_rel_err)
    assert any(r.status == "PASS" for r in rows)
    return rows


def assert_prune_same_outputs_shapes(m, ratios=HALF):
    res = prune(m, ratios)
    before, after = run(m), run(res.proto)
    assert [o.shape for o in before] == [o.shape for o in after]
    return res


def members(g, op=None, role=None):
    return [t for t in g.tensors if (op is None or t.node.op_type == op) and (role is None or t.role == role)]


IN3 = "(float[1,3,8,8] x)"


# -- 1. Conv -> Relu -> Conv ---------------------------------------------------------
CONV_CONV = f"""g {IN3} => (float[1,4,8,8] y) {{
  [c1] h = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu(h)
  [c2] y = Conv (r, w2, b2)
}}"""


def conv_conv():
    return make(CONV_CONV, {"w1": W(8, 3, 3, 3), "b1": W(8), "w2": W(4, 8, 1, 1), "b2": W(4)})


def test_conv_relu_conv():
    m = conv_conv()
    a = analyze(m)
    (g,) = prunable(a)
    assert (g.kind, g.width, g.exact) == ("channels", 8, True)
    assert g.set_name
    roles = {(t.node.op_type, t.slot, t.axis, t.role) for t in g.tensors}
    assert roles == {("Conv", 1, 0, "out"), ("Conv", 2, 0, "param"), ("Conv", 1, 1, "in")}
    (f,) = frozen(a)
    assert f.width == 4 and any("graph output" in r for r in f.frozen) and f.set_name == ""
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    keep = res.plan.keep[g.id]
    assert len(keep) == 4
    np.testing.assert_array_equal(weight(res.proto, "c1"), init(m, "w1")[keep])
    np.testing.assert_array_equal(weight(res.proto, "c1", 2), init(m, "b1")[keep])
    np.testing.assert_array_equal(weight(res.proto, "c2"), init(m, "w2")[:, keep])
    assert weight(res.proto, "c2", 2).shape == (4,)


def test_keep_follows_l2_importance():
    m = conv_conv()
    w1 = init(m, "w1").copy()
    w1[[1, 5, 6]] *= 50.0  # the three loudest channels must survive
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    res = prune(m, {"default": 0.6})  # remove floor(4.8)=4 of 8
    (keep,) = res.plan.keep.values()
    assert len(keep) == 4 and {1, 5, 6} <= set(keep.tolist())


def test_round_to():
    res = prune(conv_conv(), {"default": 0.4, "round_to": 4})  # keep 5 -> 4
    assert [len(k) for k in res.plan.keep.values()] == [4]


# -- 2./3. depthwise and grouped convs -----------------------------------------------
def dw_model(groups: int, cin_per_group: int):
    return make(f"""g {IN3} => (float[1,4,8,8] y) {{
  [c1] a = Conv (x, w1, b1)
  [dw] d = Conv <group={groups}, pads=[1,1,1,1]> (a, wd, bd)
  r = Relu(d)
  [c3] y = Conv (r, w3)
}}""", {"w1": W(8, 3, 1, 1), "b1": W(8), "wd": W(8, cin_per_group, 3, 3), "bd": W(8), "w3": W(4, 8, 1, 1)})


def test_depthwise_conv_group_follows_width():
    m = dw_model(8, 1)
    a = analyze(m)
    (g,) = prunable(a)
    assert g.width == 8 and g.kind == "channels"
    dw = members(g, "Conv")
    assert {(t.node.name, t.role) for t in dw} >= {("c1", "out"), ("dw", "out"), ("dw", "param"), ("c3", "in")}
    assert any(m_.attr == "group" for m_ in g.attrs)
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    kept = len(res.plan.keep[g.id])
    assert kept == 4
    assert attr(res.proto, "dw", "group") == kept
    assert weight(res.proto, "dw").shape == (kept, 1, 3, 3)
    assert weight(res.proto, "c1").shape[0] == kept


def test_grouped_conv_prunes_consistently():
    m = dw_model(2, 4)
    a = analyze(m)
    assert len(prunable(a)) >= 2
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    grp = attr(res.proto, "dw", "group")
    wd = weight(res.proto, "dw")
    cin = weight(res.proto, "c1").shape[0]
    assert 1 <= grp <= 2
    assert wd.shape[1] * grp == cin and wd.shape[0] % grp == 0
    assert weight(res.proto, "c3").shape[1] == wd.shape[0]
    assert res.after["params"] < res.before["params"] if "params" in res.before else True


# -- 4. ConvTranspose ----------------------------------------------------------------
def test_conv_transpose():
    m = make("""g (float[1,3,8,8] x) => (float[1,4,16,16] y) {
  [c1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu(a)
  [ct] t = ConvTranspose <strides=[2,2]> (r, wt, bt)
  s = Relu(t)
  [c3] y = Conv (s, w3)
}""", {"w1": W(8, 3, 3, 3), "b1": W(8), "wt": W(8, 6, 2, 2), "bt": W(6), "w3": W(4, 6, 1, 1)})
    a = analyze(m)
    assert sorted(g.width for g in prunable(a)) == [6, 8]
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    assert weight(res.proto, "ct").shape == (4, 3, 2, 2)
    assert weight(res.proto, "ct", 2).shape == (3,)


# -- 5. Flatten -> Gemm ----------------------------------------------------------------
def test_flatten_gemm_channel_owns_spatial_features():
    m = make("""g (float[1,3,8,8] x) => (float[1,5] y) {
  [c1] a = Conv <strides=[4,4]> (x, w1, b1)
  r = Relu(a)
  f = Flatten(r)
  [fc] y = Gemm <transB=1> (f, wf, bf)
}""", {"w1": W(8, 3, 4, 4), "b1": W(8), "wf": W(5, 32), "bf": W(5)})
    a = analyze(m)
    (g,) = prunable(a)
    assert g.width == 8
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    keep = res.plan.keep[g.id]
    cols = (keep[:, None] * 4 + np.arange(4)).ravel()
    np.testing.assert_array_equal(weight(res.proto, "fc"), init(m, "wf")[:, cols])


# -- 6. MatMul MLP with GELU -------------------------------------------------------------
MLP = """g (float[1,6,8] x) => (float[1,6,8] y) {{
  [fc1] h0 = MatMul(x, w1)
  h = Add(h0, b1)
  {gelu}
  [fc2] y = MatMul(g, w2)
}}"""
GELU_ERF = """d = Div(h, sqrt2)
  e = Erf(d)
  e1 = Add(e, one)
  hm = Mul(h, half)
  g = Mul(hm, e1)"""


@pytest.mark.parametrize("gelu,opset", [(GELU_ERF, 17), ("g = Gelu(h)", 20)], ids=["erf", "gelu20"])
def test_matmul_mlp(gelu, opset):
    consts = {"sqrt2": np.float32(np.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5)}
    inits = {"w1": W(8, 16), "b1": W(16), "w2": W(16, 8)} | (consts if "Erf" in gelu else {})
    m = make(MLP.format(gelu=gelu), inits, opset)
    a = analyze(m)
    (g,) = prunable(a)
    assert (g.kind, g.width, g.exact) == ("channels", 16, True)
    assert {(t.node.name or t.node.op_type, t.role) for t in g.tensors} == {("fc1", "out"), ("Add", "param"), ("fc2", "in")}
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    assert weight(res.proto, "fc1").shape == (8, 8) and weight(res.proto, "fc2").shape == (8, 8)


# -- 7./8. normalisations ---------------------------------------------------------------
def norm_model(norm: str, params: dict, opset=17):
    names = ", ".join(params)
    return make(f"""g {IN3} => (float[1,4,8,8] y) {{
  [c1] a = Conv <pads=[1,1,1,1]> (x, w1)
  [nm] n = {norm} (a, {names})
  r = Relu(n)
  [c2] y = Conv (r, w2)
}}""", {"w1": W(8, 3, 3, 3), "w2": W(4, 8, 1, 1)} | params, opset)


def test_batchnorm_params_are_members():
    bn = {"s": W(8), "bb": W(8), "mu": W(8), "var": np.abs(W(8)) + 0.5}
    m = norm_model("BatchNormalization", bn)
    (g,) = prunable(analyze(m))
    assert sorted(t.slot for t in members(g, "BatchNormalization", "param")) == [1, 2, 3, 4]
    assert g.exact
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    keep = res.plan.keep[g.id]
    for slot, nm in enumerate(bn, start=1):
        np.testing.assert_array_equal(weight(res.proto, "nm", slot), bn[nm][keep])


def test_instance_norm():
    m = norm_model("InstanceNormalization", {"s": W(8), "bb": W(8)})
    (g,) = prunable(analyze(m))
    assert g.exact and len(members(g, "InstanceNormalization", "param")) == 2
    assert_oracle(m)
    assert_prune_same_outputs_shapes(m)


def test_group_norm_opset21():
    m = norm_model("GroupNormalization <num_groups=2>", {"s": W(8), "bb": W(8)}, opset=21)
    a = analyze(m)
    gs = prunable(a)
    assert gs and all(g.width < 8 for g in gs)  # channels factor into groups x per-group
    assert any(not g.exact for g in gs)  # removing channels inside a group is approximate
    assert_oracle(m, approx_ok=True)
    res = assert_prune_same_outputs_shapes(m)
    c = weight(res.proto, "c1").shape[0]
    ng = attr(res.proto, "nm", "num_groups")
    assert c < 8 and 1 <= ng <= 2 and c % ng == 0
    assert weight(res.proto, "nm", 1).shape == (c,) and weight(res.proto, "c2").shape[1] == c


# -- 9. element-wise per-channel constants and activations ---------------------------------
def test_elementwise_chain():
    m = make(f"""g {IN3} => (float[1,4,8,8] y) {{
  [c1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  [mul] b = Mul(a, scale)
  [add] c = Add(b, bias)
  [prelu] d = PRelu(c, slope)
  [clip] e = Clip(d, lo, hi)
  f = HardSwish(e)
  s = Sigmoid(f)
  h = Mul(f, s)
  k = HardSigmoid(h)
  [c2] y = Conv (k, w2)
}}""", {"w1": W(8, 3, 3, 3), "b1": W(8), "scale": W(1, 8, 1, 1), "bias": W(1, 8, 1, 1),
        "slope": W(8, 1, 1), "lo": np.float32(-2), "hi": np.float32(3), "w2": W(4, 8, 1, 1)})
    a = analyze(m)
    (g,) = prunable(a)
    assert g.width == 8 and g.kind == "channels" and g.exact
    params = {(t.node.name, t.axis) for t in g.tensors if t.role == "param"}
    assert {("mul", 1), ("add", 1), ("prelu", 0), ("c1", 0)} <= params
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    keep = res.plan.keep[g.id]
    np.testing.assert_array_equal(weight(res.proto, "mul"), init(m, "scale")[:, keep])
    np.testing.assert_array_equal(weight(res.proto, "prelu"), init(m, "slope")[keep])


# -- 10. pools and reductions ----------------------------------------------------------------
def test_pools_and_spatial_reduce():
    m = make("""g (float[1,3,16,16] x) => (float[1,4,1,1] y) {
  [c1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (a)
  q = AveragePool <kernel_shape=[2,2], strides=[2,2]> (p)
  m = ReduceMean <keepdims=1> (q, axes)
  v = GlobalAveragePool(m)
  [c2] y = Conv (v, w2)
}""", {"w1": W(8, 3, 3, 3), "b1": W(8), "axes": I64(2, 3), "w2": W(4, 8, 1, 1)}, opset=18)
    (g,) = prunable(analyze(m))
    assert g.width == 8 and g.exact
    assert_oracle(m)
    assert_prune_same_outputs_shapes(m)


def test_reduce_over_channels_is_approximate():
    m = make(f"""g {IN3} => (float[1,1,8,8] y) {{
  [c1] a = Conv <pads=[1,1,1,1]> (x, w1)
  r = Relu(a)
  [c2] b = Conv (r, w2)
  y = ReduceMean <keepdims=1, axes=[1]> (b)
}}""", {"w1": W(8, 3, 3, 3), "w2": W(6, 8, 1, 1)})
    a = analyze(m)
    by_w = {g.width: g for g in prunable(a)}
    assert by_w[8].exact and not by_w[6].exact
    rows = assert_oracle(m, approx_ok=True)
    assert any(r.status == "approximate (not tested)" for r in rows)
    assert_prune_same_outputs_shapes(m)


# -- 11./12./13. Concat, Split, Slice --------------------------------------------------------
def test_concat_two_groups():
    m = make(f"""g {IN3} => (float[1,4,8,8] y) {{
  [ca] a = Conv (x, wa, ba)
  [cb] b = Conv (x, wb, bb)
  c = Concat <axis=1> (a, b)
  r = Relu(c)
  [cc] y = Conv (r, wc)
}}""", {"wa": W(4, 3, 1, 1), "ba": W(4), "wb": W(6, 3, 1, 1), "bb": W(6), "wc": W(4, 10, 1, 1)})
    a = analyze(m)
    gs = prunable(a)
    assert sorted(g.width for g in gs) == [4, 6] and all(g.kind == "channels" for g in gs)
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    ka, kb = (res.plan.keep[g.id] for g in sorted(gs, key=lambda g: g.width))
    assert len(ka) + len(kb) == 5
    cols = np.concatenate([ka, kb + 4])
    np.testing.assert_array_equal(weight(res.proto, "cc"), init(m, "wc")[:, cols])


def test_split_sizes_follow_kept_widths():
    m = make(f"""g {IN3} => (float[1,4,8,8] y1, float[1,4,8,8] y2) {{
  [c1] a = Conv (x, w1, b1)
  r = Relu(a)
  [sp] s1, s2 = Split <axis=1> (r, sizes)
  [ca] y1 = Conv (s1, wa)
  [cb] y2 = Conv (s2, wb)
}}""", {"w1": W(8, 3, 1, 1), "b1": W(8), "sizes": I64(4, 4), "wa": W(4, 4, 1, 1), "wb": W(4, 4, 1, 1)})
    a = analyze(m)
    gs = prunable(a)
    assert [g.width for g in gs] == [4, 4]
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    kept = [len(res.plan.keep[g.id]) for g in gs]
    assert kept == [2, 2]
    np.testing.assert_array_equal(weight(res.proto, "sp"), kept)
    assert weight(res.proto, "ca").shape[1] == 2 and weight(res.proto, "c1").shape[0] == 4


def test_slice_on_channels():
    m = make(f"""g {IN3} => (float[1,4,8,8] y) {{
  [c1] a = Conv (x, w1, b1)
  r = Relu(a)
  [sl] s = Slice(r, st, en, ax)
  [c2] y = Conv (s, w2)
}}""", {"w1": W(8, 3, 1, 1), "b1": W(8), "st": I64(0), "en": I64(4), "ax": I64(1), "w2": W(4, 4, 1, 1)})
    a = analyze(m)
    gs = [g for g in a.groups if g.width == 4 and any(t.node.name == "c2" and t.role == "in" for t in g.tensors)]
    assert len(gs) == 1
    res = assert_prune_same_outputs_shapes(m)
    if gs[0].frozen:
        return
    assert_oracle(m)
    k = len(res.plan.keep[gs[0].id])
    assert weight(res.proto, "c2").shape[1] == k
    assert int(weight(res.proto, "sl", 2)[0]) == k  # Slice end follows the kept width


# -- 14. residual ----------------------------------------------------------------------
def test_residual_stream_is_embed():
    m = make(f"""g {IN3} => (float[1,4,8,8] y) {{
  [ca] a = Conv <pads=[1,1,1,1]> (x, wa, ba)
  r = Relu(a)
  [cb] b = Conv <pads=[1,1,1,1]> (r, wb, bb)
  s = Add(r, b)
  [cc] y = Conv (s, wc)
}}""", {"wa": W(8, 3, 3, 3), "ba": W(8), "wb": W(8, 8, 3, 3), "bb": W(8), "wc": W(4, 8, 1, 1)})
    a = analyze(m)
    (g,) = prunable(a)
    assert g.kind == "embed" and g.width == 8
    outs = {t.node.name for t in g.tensors if t.role == "out"}
    assert outs == {"ca", "cb"}
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    assert weight(res.proto, "cb").shape == (4, 4, 3, 3)
    assert prune(m, {"kinds": {"channels": 0.5}}).plan.keep == {}  # kind ratios are per kind


# -- 15. channels-last LayerNorm --------------------------------------------------------------
def test_channels_last_layernorm_is_approximate():
    m = make(f"""g {IN3} => (float[1,4,8,8] y) {{
  [c1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  t = Transpose <perm=[0,2,3,1]> (a)
  [ln] n = LayerNormalization <axis=-1> (t, s, bb)
  u = Transpose <perm=[0,3,1,2]> (n)
  [c2] y = Conv (u, w2)
}}""", {"w1": W(8, 3, 3, 3), "b1": W(8), "s": W(8), "bb": W(8), "w2": W(4, 8, 1, 1)})
    (g,) = prunable(analyze(m))
    assert g.width == 8 and not g.exact
    assert len(members(g, "LayerNormalization", "param")) == 2
    rows = oracle(m, Ratios.from_dict(HALF))
    assert rows and all(r.status == "approximate (not tested)" for r in rows)
    res = assert_prune_same_outputs_shapes(m)
    assert weight(res.proto, "ln", 1).shape == (4,) and weight(res.proto, "c2").shape[1] == 4


# -- 16. Resize and Pad -------------------------------------------------------------------------
RESIZE_PAD = """g (float[1,3,8,8] x) => (float[1,4,{h},{w}] y) {{
  [c1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  z = Resize <mode="nearest"> (a, roi, sc)
  [pad] p = Pad(z, pads)
  [c2] y = Conv (p, w2)
}}"""


def test_resize_and_spatial_pad():
    m = make(RESIZE_PAD.format(h=18, w=18), {"w1": W(8, 3, 3, 3), "b1": W(8), "roi": np.zeros(0, np.float32),
             "sc": np.array([1, 1, 2, 2], np.float32), "pads": I64(0, 0, 1, 1, 0, 0, 1, 1), "w2": W(4, 8, 1, 1)})
    (g,) = prunable(analyze(m))
    assert g.width == 8
    assert_oracle(m)
    assert_prune_same_outputs_shapes(m)


def test_pad_on_channel_axis_freezes():
    m = make(RESIZE_PAD.format(h=16, w=16),
             {"w1": W(8, 3, 3, 3), "b1": W(8), "roi": np.zeros(0, np.float32), "sc": np.array([1, 1, 2, 2], np.float32),
              "pads": I64(0, 1, 0, 0, 0, 1, 0, 0), "w2": W(4, 10, 1, 1)})
    a = analyze(m)
    assert not prunable(a)
    g = next(g for g in a.groups if g.width == 8)
    assert any("Pad" in r and "channel" in r for r in g.frozen)
    res = prune(m, HALF)
    assert res.plan.keep == {} and weight(res.proto, "c1").shape == (8, 3, 3, 3)


# -- 17. Reshape before Gemm ------------------------------------------------------------------------
def test_reshape_shape_constant_follows_width():
    m = make("""g (float[1,3,8,8] x) => (float[1,5] y) {
  [c1] a = Conv (x, w1, b1)
  r = Relu(a)
  [rs] f = Reshape(r, shp)
  [fc] y = Gemm <transB=1> (f, wf, bf)
}""", {"w1": W(8, 3, 8, 8), "b1": W(8), "shp": I64(-1, 8), "wf": W(5, 8), "bf": W(5)})
    (g,) = prunable(analyze(m))
    assert g.width == 8 and any(s.node.name == "rs" for s in g.shapes)
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    k = len(res.plan.keep[g.id])
    shp = weight(res.proto, "rs")
    assert shp.tolist() == [-1, k]
    assert weight(res.proto, "fc").shape == (5, k)


# -- 18. shared initializer ------------------------------------------------------------------------
def test_shared_initializer_is_unshared():
    m = make(f"""g {IN3} => (float[1,2,8,8] y1, float[1,2,8,8] y2) {{
  [c1] a = Conv (x, w)
  ra = Relu(a)
  [cA] y1 = Conv (ra, wA)
  [c2] b = Conv (x, w)
  rb = Relu(b)
  [cB] y2 = Conv (rb, wB)
}}""", {"w": W(4, 3, 1, 1), "wA": W(2, 4, 1, 1), "wB": W(2, 4, 1, 1)})
    a = analyze(m)
    assert len(prunable(a)) == 2
    ratios = {"layers": {"c1": 0.5, "c2": 0.25}}
    res = assert_prune_same_outputs_shapes(m, ratios)
    w1, w2 = weight(res.proto, "c1"), weight(res.proto, "c2")
    assert node(res.proto, "c1").input[1] != node(res.proto, "c2").input[1]
    assert (w1.shape[0], w2.shape[0]) == (2, 3)
    k1 = next(k for k in res.plan.keep.values() if len(k) == 2)
    np.testing.assert_array_equal(w1, init(m, "w")[k1])
    assert weight(res.proto, "cA").shape[1] == 2 and weight(res.proto, "cB").shape[1] == 3
    assert_oracle(m, ratios)


# -- 19. unknown ops -----------------------------------------------------------------------------
def test_unknown_op_freezes_touching_group():
    m = make(f"""g {IN3} => (float[1,4,16,16] y) {{
  [c0] a = Conv <pads=[1,1,1,1]> (x, w0)
  r = Relu(a)
  [c1] b = Conv (r, w1)
  d = DepthToSpace <blocksize=2> (b)
  [c2] y = Conv (d, w2)
}}""", {"w0": W(8, 3, 3, 3), "w1": W(8, 8, 1, 1), "w2": W(4, 2, 1, 1)})
    a = analyze(m)
    (g,) = prunable(a)
    assert any(t.node.name == "c0" and t.role == "out" for t in g.tensors)
    f = next(g for g in a.groups if any(t.node.name == "c1" and t.role == "out" for t in g.tensors))
    assert any("DepthToSpace" in r for r in f.frozen)
    assert_oracle(m)
    res = assert_prune_same_outputs_shapes(m)
    assert weight(res.proto, "c1").shape == (8, 4, 1, 1)  # output channels untouched
    np.testing.assert_array_equal(weight(res.proto, "c2"), init(m, "w2"))


def test_custom_domain_op_freezes():
    text = f"""<ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>
g {IN3} => (float[1,4,8,8] y) {{
  [c1] a = Conv (x, w1)
  b = my.ops.Weird(a)
  [c2] y = Conv (b, w2)
}}"""
    m = onnx.parser.parse_model(text)
    for k, v in {"w1": W(8, 3, 1, 1), "w2": W(4, 8, 1, 1)}.items():
        m.graph.initializer.append(numpy_helper.from_array(v, k))
    a = analyze(m)
    assert not prunable(a)
    g8 = next(g for g in a.groups if g.width == 8)
    assert any("my.ops" in r for r in g8.frozen)


# -- 20. ratio errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    {"default": 1.0}, {"default": -0.1}, {"default": "0.5"}, {"bogus": 0.1}, {"kinds": {"heads_x": 0.2}},
    {"scope": "everything"}, {"importance": "taylor"}, {"round_to": 0}, {"layers": {"c1": 1.5}}, {"ignore": "c1"},
])
def test_bad_ratios_raise_user_error(bad):
    with pytest.raises(UserError):
        Ratios.from_dict(bad)


def test_ignore_and_scope_variants():
    m = conv_conv()
    assert prune(m, {"default": 0.5, "ignore": ["c1"]}).plan.keep == {}
    for scope in ("global", "local"):
        res = prune(m, {"default": 0.5, "scope": scope, "importance": "l1"})
        assert [len(k) for k in res.plan.keep.values()] == [4]

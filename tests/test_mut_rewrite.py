"""The rewriter's output checked directly on tiny models (no runtime): member
tensors sliced to the kept channels, shape constants (Reshape, Split, Slice)
and attributes (a depthwise Conv's ``group``, Split's ``split``) set to the kept
widths, shared constants un-shared under fresh names, and the journal restoring
every edit exactly. Expected tensors are built here in numpy from the keep
lists. Runs in about a second."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from onnxprune import io
from onnxprune.api import analyze
from onnxprune.rewrite import Journal, apply_plan, zero_removed

_rng = np.random.default_rng(77)


def W(*shape):
    return _rng.standard_normal(shape).astype(np.float32)


def I64(*vals):
    return np.array(vals, np.int64)


def make(body, inits, out="float[1,4,8,8] y", inp="float[1,3,8,8] x", opset=17):
    m = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\ng ({inp}) => ({out}) {{\n{body}\n}}')
    for k, v in inits.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(v), k))
    return m


def live(a):
    return [g for g in a.groups if not g.frozen]


def of(a, node, slot=1, axis=None):
    """The live group with a member at ``node``'s input ``slot`` (on ``axis``)."""
    return next(g for g in live(a) for t in g.tensors
                if t.node.name == node and t.slot == slot and (axis is None or t.axis == axis))


def inits(p):
    return {i.name: numpy_helper.to_array(i) for i in p.graph.initializer}


def wt(p, node, slot=1):
    n = next(n for n in p.graph.node if n.name == node)
    return inits(p)[n.input[slot]]


def attr(p, node, key):
    n = next(n for n in p.graph.node if n.name == node)
    return onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == key))


def snapshot(p):
    """Everything the journal must restore: initializers (names, dtypes, values), nodes (inputs, attributes),
    declared shapes of intermediate values, inputs and outputs."""
    return ({k: (v.dtype.str, v.shape, v.tolist()) for k, v in inits(p).items()},
            [(n.name, n.op_type, list(n.input), list(n.output),
              sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)) for n in p.graph.node],
            sorted((v.name, str(v.type)) for v in p.graph.value_info),
            [str(v) for v in p.graph.input], [str(v) for v in p.graph.output])


def rewrite(m, keep_by_node, journal=True):
    """Analyse ``m`` and rewrite it with ``{node name | (node, slot, axis): kept channels}`` (the live group with
    that member); with a journal, undo and check the model is back as it was. Returns the analysis, the count
    apply_plan reports and the rewritten proto."""
    a = analyze(m)
    keep = {of(a, *(k if isinstance(k, tuple) else (k,))).id: np.array(v) for k, v in keep_by_node.items()}
    before = snapshot(io.full_proto(a.model))
    j = Journal() if journal else None
    n = apply_plan(a.ctx, keep, j)
    out = io.full_proto(a.model)
    if j is not None:
        j.undo()
        assert snapshot(io.full_proto(a.model)) == before
        assert not j._undo
    return a, n, out


# -- Conv -> Relu -> Conv ----------------------------------------------------------------------------
CONV = {"w1": W(8, 3, 3, 3), "b1": W(8), "w2": W(4, 8, 1, 1), "b2": W(4)}


def conv_conv():
    return make("""[c1] h = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu(h)
  [c2] y = Conv (r, w2, b2)""", CONV)


@pytest.mark.parametrize("journal", [True, False])
def test_conv_members_are_sliced(journal):
    keep = [1, 4, 6]
    _, n, p = rewrite(conv_conv(), {"c1": keep}, journal)
    assert n == 3  # w1, b1, w2; b2 is not a member of the group
    np.testing.assert_array_equal(wt(p, "c1"), CONV["w1"][[1, 4, 6]])
    np.testing.assert_array_equal(wt(p, "c1", 2), CONV["b1"][[1, 4, 6]])
    np.testing.assert_array_equal(wt(p, "c2"), CONV["w2"][:, [1, 4, 6]])
    np.testing.assert_array_equal(wt(p, "c2", 2), CONV["b2"])
    assert sorted(inits(p)) == ["b1", "b2", "w1", "w2"]  # sliced in place, under their names
    assert wt(p, "c1").dtype == np.float32
    # stale intermediate shapes are dropped; the graph output keeps its shape
    shaped = {v.name for v in p.graph.value_info if v.type.tensor_type.HasField("shape")}
    assert shaped <= {"w1", "b1", "w2", "b2"} and "h" not in shaped and "r" not in shaped
    assert [d.dim_value for d in p.graph.output[0].type.tensor_type.shape.dim] == [1, 4, 8, 8]


def test_keeping_every_channel_changes_nothing():
    m = conv_conv()
    a, n, p = rewrite(m, {"c1": list(range(8))})
    assert n == 0
    for k, v in CONV.items():
        np.testing.assert_array_equal(inits(p)[k], v)


def test_large_tensors_are_sliced_lazily():
    w = {"w1": W(64, 3, 3, 3), "b1": W(64), "w2": W(16, 64, 1, 1)}
    m = make("""[c1] h = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu(h)
  [c2] y = Conv (r, w2)""", w, out="float[1,16,8,8] y")
    a = analyze(m)
    keep = np.arange(0, 64, 3)
    apply_plan(a.ctx, {of(a, "c1").id: keep})
    inits_ = a.model.graph.initializers
    consts = {v.name: v.const_value for v in inits_.values()}
    assert isinstance(consts["w1"], ir.LazyTensor) and consts["w1"].shape == ir.Shape([22, 3, 3, 3])  # 6912 bytes
    assert not isinstance(consts["b1"], ir.LazyTensor)  # 256 bytes: sliced at once
    assert not isinstance(consts["w2"], ir.LazyTensor)  # 4096 bytes before: still at once
    assert inits_["w1"].shape == ir.Shape([22, 3, 3, 3]) and inits_["b1"].shape == ir.Shape([22])
    assert inits_["w2"].shape == ir.Shape([16, 22, 1, 1])
    p = io.full_proto(a.model)
    np.testing.assert_array_equal(wt(p, "c1"), w["w1"][keep])
    np.testing.assert_array_equal(wt(p, "c1", 2), w["b1"][keep])
    np.testing.assert_array_equal(wt(p, "c2"), w["w2"][:, keep])


# -- a depthwise Conv: its group attribute follows the width ---------------------------------------
@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_group_attribute(mult):
    w = {"w1": W(8, 3, 1, 1), "b1": W(8), "wd": W(8 * mult, 1, 3, 3), "bd": W(8 * mult), "w3": W(4, 8 * mult, 1, 1)}
    m = make(f"""[c1] a = Conv (x, w1, b1)
  [dw] d = Conv <group=8, pads=[1,1,1,1]> (a, wd, bd)
  r = Relu(d)
  [c3] y = Conv (r, w3)""", w)
    keep = [0, 3, 7]
    _, n, p = rewrite(m, {"c1": keep})
    rows = (np.array(keep)[:, None] * mult + np.arange(mult)).ravel()
    assert attr(p, "dw", "group") == 3 and attr(p, "dw", "pads") == [1, 1, 1, 1]
    np.testing.assert_array_equal(wt(p, "c1"), w["w1"][keep])
    np.testing.assert_array_equal(wt(p, "dw"), w["wd"][rows])
    np.testing.assert_array_equal(wt(p, "dw", 2), w["bd"][rows])
    np.testing.assert_array_equal(wt(p, "c3"), w["w3"][:, rows])
    assert n == 5


def test_group_attribute_unchanged_when_every_channel_is_kept():
    w = {"w1": W(4, 3, 1, 1), "wd": W(4, 1, 3, 3), "w3": W(4, 4, 1, 1), "w0": W(4, 3, 1, 1)}
    m = make("""[c1] a = Conv (x, w1)
  [dw] d = Conv <group=4, pads=[1,1,1,1]> (a, wd)
  r = Relu(d)
  [c3] y = Conv (r, w3)""", w)
    a = analyze(m)
    node = next(n for n in a.model.graph if n.name == "dw")
    attr_before = node.attributes["group"]
    apply_plan(a.ctx, {of(a, "c1").id: np.arange(4)})
    assert node.attributes["group"] is attr_before  # not replaced


# -- shape constants ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(-1, 8), (0, 8)])
def test_reshape_constant(shape):
    w = {"w1": W(8, 3, 8, 8), "b1": W(8), "shp": I64(*shape), "wf": W(5, 8), "bf": W(5)}
    m = make("""[c1] a = Conv (x, w1, b1)
  r = Relu(a)
  [rs] f = Reshape(r, shp)
  [fc] y = Gemm <transB=1> (f, wf, bf)""", w, out="float[N,5] y", inp="float[N,3,8,8] x")
    keep = [2, 3, 5, 6, 7]
    _, n, p = rewrite(m, {"c1": keep})
    assert wt(p, "rs").tolist() == [shape[0], 5] and wt(p, "rs").dtype == np.int64
    np.testing.assert_array_equal(wt(p, "fc"), w["wf"][:, keep])
    np.testing.assert_array_equal(wt(p, "fc", 2), w["bf"])
    assert n == 4


def test_shared_shape_constant_is_copied_only_where_it_changes():
    # three branches read one shape constant; only the first is pruned. The two unchanged uses come first
    # (most uses first) and keep the original; the pruned one gets a copy
    w = {f"w{i}": W(8, 3, 8, 8) for i in (1, 2, 3)} | {"shp": I64(0, 8)} | {f"f{i}": W(5, 8) for i in (1, 2, 3)}
    body = "\n".join(f"""  [c{i}] a{i} = Conv (x, w{i})
  r{i} = Relu(a{i})
  [rs{i}] s{i} = Reshape(r{i}, shp)
  [g{i}] y{i} = Gemm <transB=1> (s{i}, f{i})""" for i in (1, 2, 3))
    m = make(body, w, out="float[N,5] y1, float[N,5] y2, float[N,5] y3", inp="float[N,3,8,8] x")
    _, n, p = rewrite(m, {"c1": [0, 4, 5], "c2": list(range(8)), "c3": list(range(8))})
    ins = {x.name: x.input[1] for x in p.graph.node if x.op_type == "Reshape"}
    assert ins == {"rs1": "shp__pruned1", "rs2": "shp", "rs3": "shp"}
    assert wt(p, "rs1").tolist() == [0, 3] and inits(p)["shp"].tolist() == [0, 8]
    np.testing.assert_array_equal(wt(p, "g1"), w["f1"][:, [0, 4, 5]])
    np.testing.assert_array_equal(wt(p, "c1"), w["w1"][[0, 4, 5]])
    assert n == 3  # w1, f1 and the new shape constant


def test_attribute_of_an_unchanged_conv_before_a_changed_one():
    w = {"w1": W(8, 3, 1, 1), "d1": W(8, 1, 3, 3), "w2": W(6, 8, 1, 1), "d2": W(6, 1, 3, 3), "w3": W(4, 6, 1, 1)}
    m = make("""[c1] a = Conv (x, w1)
  [dw1] b = Conv <group=8, pads=[1,1,1,1]> (a, d1)
  r = Relu(b)
  [c2] c = Conv (r, w2)
  [dw2] d = Conv <group=6, pads=[1,1,1,1]> (c, d2)
  r2 = Relu(d)
  [c3] y = Conv (r2, w3)""", w)
    _, n, p = rewrite(m, {"c1": list(range(8)), ("c2", 1, 0): [1, 5]})
    assert attr(p, "dw1", "group") == 8 and attr(p, "dw2", "group") == 2
    np.testing.assert_array_equal(wt(p, "dw2"), w["d2"][[1, 5]])
    np.testing.assert_array_equal(wt(p, "c3"), w["w3"][:, [1, 5]])


def test_split_sizes_constant_and_attribute():
    w = {"w1": W(8, 3, 1, 1), "b1": W(8), "sizes": I64(5, 3), "wa": W(4, 5, 1, 1), "wb": W(4, 3, 1, 1)}
    body = """[c1] a = Conv (x, w1, b1)
  r = Relu(a)
  [sp] s1, s2 = Split <axis=1{attr}> (r{sizes})
  [ca] y1 = Conv (s1, wa)
  [cb] y2 = Conv (s2, wb)"""
    out = "float[1,4,8,8] y1, float[1,4,8,8] y2"
    ka, kb = [1, 2, 4], [0, 2]
    rows = ka + [5 + k for k in kb]
    for opset in (17, 11):
        text = body.format(attr="", sizes=", sizes") if opset == 17 else body.format(attr=", split=[5,3]", sizes="")
        ws = w if opset == 17 else {k: v for k, v in w.items() if k != "sizes"}
        _, n, p = rewrite(make(text, ws, out=out, opset=opset), {"ca": ka, "cb": kb})
        if opset == 17:
            assert wt(p, "sp").tolist() == [3, 2] and n == 5
        else:
            assert attr(p, "sp", "split") == [3, 2] and n == 4
        np.testing.assert_array_equal(wt(p, "c1"), w["w1"][rows])
        np.testing.assert_array_equal(wt(p, "c1", 2), w["b1"][rows])
        np.testing.assert_array_equal(wt(p, "ca"), w["wa"][:, ka])
        np.testing.assert_array_equal(wt(p, "cb"), w["wb"][:, kb])


def test_split_attribute_entry_only_where_it_changes():
    w = {"w1": W(8, 3, 1, 1), "wa": W(4, 5, 1, 1), "wb": W(4, 3, 1, 1)}
    m = make("""[c1] a = Conv (x, w1)
  r = Relu(a)
  [sp] s1, s2 = Split <axis=1, split=[5,3]> (r)
  [ca] y1 = Conv (s1, wa)
  [cb] y2 = Conv (s2, wb)""", w, out="float[1,4,8,8] y1, float[1,4,8,8] y2", opset=11)
    _, n, p = rewrite(m, {"cb": [2]})
    assert attr(p, "sp", "split") == [5, 1]
    np.testing.assert_array_equal(wt(p, "c1"), w["w1"][[0, 1, 2, 3, 4, 7]])


def test_slice_with_negative_starts_and_ends():
    # channels 2..5 of 8 read by the Slice [-6, -2): before (0, 1), the slice (2..5), after (6, 7)
    w = {"w1": W(8, 3, 1, 1), "b1": W(8), "st": I64(-6), "en": I64(-2), "ax": I64(1), "w2": W(4, 4, 1, 1)}
    m = make("""[c1] a = Conv (x, w1, b1)
  r = Relu(a)
  [sl] s = Slice(r, st, en, ax)
  [c2] y = Conv (s, w2)""", w)
    a = analyze(m)
    before, mid, after = sorted(live(a), key=lambda g: g.id)
    assert [g.width for g in (before, mid, after)] == [2, 4, 2] and any(t.node.name == "c2" for t in mid.tensors)
    keep = {before.id: np.array([0]), mid.id: np.array([0, 2, 3]), after.id: np.array([1])}
    snap = snapshot(io.full_proto(a.model))
    j = Journal()
    n = apply_plan(a.ctx, keep, j)
    p = io.full_proto(a.model)
    rows = [0, 2, 4, 5, 7]
    assert wt(p, "sl", 1).tolist() == [-4] and wt(p, "sl", 2).tolist() == [-1] and wt(p, "sl", 3).tolist() == [1]
    np.testing.assert_array_equal(wt(p, "c1"), w["w1"][rows])
    np.testing.assert_array_equal(wt(p, "c1", 2), w["b1"][rows])
    np.testing.assert_array_equal(wt(p, "c2"), w["w2"][:, [0, 2, 3]])
    assert n == 5
    j.undo()
    assert snapshot(io.full_proto(a.model)) == snap


# -- shared and graph-input constants --------------------------------------------------------------
def test_shared_weight_is_unshared_under_fresh_names():
    w = {"w": W(4, 3, 1, 1), "wA": W(2, 4, 1, 1), "wB": W(2, 4, 1, 1), "w__pruned0": W(2)}
    m = make("""[c1] a = Conv (x, w)
  ra = Relu(a)
  [cA] y1 = Conv (ra, wA, w__pruned0)
  [c2] b = Conv (x, w)
  rb = Relu(b)
  [cB] y2 = Conv (rb, wB)""", w, out="float[1,2,8,8] y1, float[1,2,8,8] y2")
    k1, k2 = [0, 3], [1, 2, 3]
    _, n, p = rewrite(m, {"c1": k1, "c2": k2})
    names = {x.name: x.input[1] for x in p.graph.node if len(x.input) > 1}
    assert names["c1"] == "w__pruned0_" and names["c2"] == "w__pruned1"  # the existing name is not reused
    assert "w" not in inits(p)  # no use left: dropped
    np.testing.assert_array_equal(inits(p)["w__pruned0_"], w["w"][k1])
    np.testing.assert_array_equal(inits(p)["w__pruned1"], w["w"][k2])
    np.testing.assert_array_equal(inits(p)["w__pruned0"], w["w__pruned0"])
    np.testing.assert_array_equal(wt(p, "cA"), w["wA"][:, k1])
    np.testing.assert_array_equal(wt(p, "cB"), w["wB"][:, k2])
    assert n == 4
    vi = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in p.graph.value_info}
    assert vi.get("w__pruned1", [3, 3, 1, 1]) == [3, 3, 1, 1]


def test_shared_weight_most_used_slice_first():
    # three convs share w: two keep the same channels (one group), the third another: the pair's copy comes first
    w = {"w": W(4, 3, 1, 1), "wA": W(2, 4, 1, 1), "wB": W(2, 4, 1, 1), "wC": W(2, 4, 1, 1)}
    m = make("""[c1] a = Conv (x, w)
  [c3] c = Conv (x, w)
  s = Add(a, c)
  ra = Relu(s)
  [cA] y1 = Conv (ra, wA)
  [c2] b = Conv (x, w)
  rb = Relu(b)
  [cB] y2 = Conv (rb, wB)""", w, out="float[1,2,8,8] y1, float[1,2,8,8] y2")
    _, n, p = rewrite(m, {"c2": [0, 1], "c1": [2]})
    names = {x.name: x.input[1] for x in p.graph.node if len(x.input) > 1}
    assert names["c1"] == names["c3"] == "w__pruned0" and names["c2"] == "w__pruned1"
    np.testing.assert_array_equal(inits(p)["w__pruned0"], w["w"][[2]])
    np.testing.assert_array_equal(inits(p)["w__pruned1"], w["w"][[0, 1]])


def test_an_initializer_listed_among_the_inputs_is_read_as_a_constant_and_sliced_once():
    """A weight that is also a graph input (IR 3; torch's keep_initializers_as_inputs)
    is a constant from load on: sliced in place, no full-size copy left as an input."""
    w = {"w1": W(4, 3, 1, 1), "w2": W(4, 4, 1, 1)}
    m = make("""[c1] a = Conv (x, w1)
  r = Relu(a)
  [c2] y = Conv (r, w2)""", w, inp="float[1,3,8,8] x, float[4,3,1,1] w1")
    _, n, p = rewrite(m, {"c1": [1, 3]})
    assert [i.name for i in p.graph.input] == ["x"]
    assert next(x for x in p.graph.node if x.name == "c1").input[1] == "w1"
    assert sorted(inits(p)) == ["w1", "w2"]
    np.testing.assert_array_equal(inits(p)["w1"], w["w1"][[1, 3]])
    np.testing.assert_array_equal(wt(p, "c2"), w["w2"][:, [1, 3]])


# -- zero_removed: the oracle's edit ---------------------------------------------------------------
def _div_model():
    w = {"w1": W(8, 3, 1, 1), "b1": W(8), "sc": np.abs(W(1, 8, 1, 1)) + 0.5, "w2": W(4, 8, 1, 1)}
    return make("""[c1] a = Conv (x, w1, b1)
  [dv] d = Div(a, sc)
  [c2] y = Conv (d, w2)""", w), w


@pytest.mark.parametrize("consumer_only", [False, True])
def test_zero_removed_by_hand(consumer_only):
    m, w = _div_model()
    a = analyze(m)
    (g,) = live(a)
    snap = snapshot(io.full_proto(a.model))
    keep = np.array([0, 2, 3, 6])
    gone = [1, 4, 5, 7]
    j = Journal()
    zero_removed(a.ctx, a.groups, {g.id: keep}, j, frozenset({g.id}) if consumer_only else frozenset())
    p = io.full_proto(a.model)
    w2 = w["w2"].copy()
    w2[:, gone] = 0
    np.testing.assert_array_equal(wt(p, "c2"), w2)
    if consumer_only:
        for k, node, slot in (("w1", "c1", 1), ("b1", "c1", 2), ("sc", "dv", 1)):
            np.testing.assert_array_equal(wt(p, node, slot), w[k])
    else:
        w1, b1, sc = w["w1"].copy(), w["b1"].copy(), w["sc"].copy()
        w1[gone], b1[gone], sc[:, gone] = 0, 0, 1  # a divisor becomes 1, not 0
        np.testing.assert_array_equal(wt(p, "c1"), w1)
        np.testing.assert_array_equal(wt(p, "c1", 2), b1)
        np.testing.assert_array_equal(wt(p, "dv"), sc)
    j.undo()
    assert snapshot(io.full_proto(a.model)) == snap
    # groups without a keep entry, or with every channel kept, are left alone
    zero_removed(a.ctx, a.groups, {})
    zero_removed(a.ctx, a.groups, {g.id: np.arange(8)})
    assert snapshot(io.full_proto(a.model)) == snap


def test_zero_removed_with_a_memo_makes_the_same_tensors_once_and_undoes_to_the_original():
    """The damage search zeroes one plan again and again: with a ZeroMemo a
    second zeroing at the same channels gives back the very tensor objects
    made the first time (the same values as without it), another keep gets its
    own values, and undo restores the original tensors every time."""
    from onnxprune.rewrite import ZeroMemo

    m, w = _div_model()
    a = analyze(m)
    (g,) = live(a)
    snap = snapshot(io.full_proto(a.model))
    memo = ZeroMemo()
    inits = a.model.graph.initializers

    def zeroed(keep):
        j = Journal()
        zero_removed(a.ctx, a.groups, {g.id: keep}, j, memo=memo)
        got = {k: inits[k].const_value for k in ("w1", "b1", "sc", "w2")}
        vals = {k: t.numpy().copy() for k, t in got.items()}
        j.undo()
        assert snapshot(io.full_proto(a.model)) == snap
        return got, vals

    first, v1 = zeroed(np.array([0, 2, 3, 6]))
    hits = memo.hits
    again, v2 = zeroed(np.array([0, 2, 3, 6]))
    assert memo.hits == hits + 4 and all(again[k] is first[k] for k in first)
    other, v3 = zeroed(np.array([1, 2, 3]))
    assert all(other[k] is not first[k] for k in first)
    memo = ZeroMemo(budget=w["w2"].nbytes)  # past its budget the oldest tensors go: values made anew
    _, v4 = zeroed(np.array([0, 2, 3, 6]))
    zeroed(np.array([1, 2, 3]))
    _, v5 = zeroed(np.array([0, 2, 3, 6]))
    assert memo.bytes <= w["w2"].nbytes + w["sc"].nbytes and len(memo._made) < 8
    for keep, vals in ((np.array([0, 2, 3, 6]), v2), (np.array([1, 2, 3]), v3), (np.array([0, 2, 3, 6]), v4),
                       (np.array([0, 2, 3, 6]), v5)):
        gone = np.setdiff1d(np.arange(8), keep)
        w1, b1, sc, w2 = w["w1"].copy(), w["b1"].copy(), w["sc"].copy(), w["w2"].copy()
        w1[gone], b1[gone], sc[:, gone], w2[:, gone] = 0, 0, 1, 0
        for k, ref in (("w1", w1), ("b1", b1), ("sc", sc), ("w2", w2)):
            np.testing.assert_array_equal(vals[k], ref, err_msg=k)


def test_zero_removed_pow_exponent_and_mul_scale():
    w = {"w1": W(4, 3, 1, 1), "e": np.full((1, 4, 1, 1), 2.0, np.float32), "s": W(1, 4, 1, 1), "w2": W(4, 4, 1, 1)}
    m = make("""[c1] a = Conv (x, w1)
  [pw] d = Pow(a, e)
  [ml] f = Mul(d, s)
  [c2] y = Conv (f, w2)""", w)
    a = analyze(m)
    (g,) = live(a)
    zero_removed(a.ctx, [g], {g.id: np.array([0, 3])})
    p = io.full_proto(a.model)
    e, s, w1, w2 = w["e"].copy(), w["s"].copy(), w["w1"].copy(), w["w2"].copy()
    e[:, [1, 2]], s[:, [1, 2]], w1[[1, 2]], w2[:, [1, 2]] = 1, 0, 0, 0
    np.testing.assert_array_equal(wt(p, "pw"), e)
    np.testing.assert_array_equal(wt(p, "ml"), s)
    np.testing.assert_array_equal(wt(p, "c1"), w1)
    np.testing.assert_array_equal(wt(p, "c2"), w2)


def test_zero_removed_quantized_weight_takes_its_zero_point():
    q1 = _rng.integers(-100, 100, (4, 3, 1, 1)).astype(np.int8)
    z1 = np.array([3, -2, 5, 7], np.int8)
    m = make("""w1 = DequantizeLinear <axis=0> (q1, s1, z1)
  [c1] h = Conv (x, w1)
  r = Relu (h)
  [c2] y = Conv (r, w2)""", {"q1": q1, "s1": np.array([0.1, 0.2, 0.3, 0.4], np.float32), "z1": z1, "w2": W(4, 4, 1, 1)})
    a = analyze(m)
    (g,) = live(a)
    zero_removed(a.ctx, [g], {g.id: np.array([0, 2])})
    p = io.full_proto(a.model)
    want = q1.copy()
    want[1], want[3] = -2, 7
    got = inits(p)["q1"]
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, want)


def test_zero_removed_skips_groups_not_in_keep_in_any_order():
    m, w = _div_model()
    a = analyze(m)
    (g,) = live(a)
    frozen = [x for x in a.groups if x.frozen]
    zero_removed(a.ctx, frozen + [g], {g.id: np.arange(1, 8)})
    p = io.full_proto(a.model)
    w1 = w["w1"].copy()
    w1[0] = 0
    np.testing.assert_array_equal(wt(p, "c1"), w1)


def test_zero_removed_consumer_only_without_consumer_members_zeroes_everywhere():
    # the slice's "before" channels (0, 1) are computed by c1 and read by no one: no consumer member
    w = {"w1": W(8, 3, 1, 1), "b1": W(8), "st": I64(-6), "en": I64(-2), "ax": I64(1), "w2": W(4, 4, 1, 1)}
    m = make("""[c1] a = Conv (x, w1, b1)
  r = Relu(a)
  [sl] s = Slice(r, st, en, ax)
  [c2] y = Conv (s, w2)""", w)
    a = analyze(m)
    before = min(live(a), key=lambda g: g.id)
    assert before.width == 2 and not any(t.role == "in" for t in before.tensors)
    zero_removed(a.ctx, [before], {before.id: np.array([0])}, consumer_only=frozenset({before.id}))
    p = io.full_proto(a.model)
    w1, b1 = w["w1"].copy(), w["b1"].copy()
    w1[1], b1[1] = 0, 0
    np.testing.assert_array_equal(wt(p, "c1"), w1)
    np.testing.assert_array_equal(wt(p, "c1", 2), b1)


# -- the recovery stage's edits: new weights for one node, a bias Add after one ------------------------
def _model(body, inits_, out="float[2,4] y", inp="float[2,3] x"):
    return ir.serde.deserialize_model(make(body, inits_, out=out, inp=inp))


def _run(proto, x):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_set_input_writes_in_place_when_only_this_node_reads_the_weight():
    from onnxprune.rewrite import set_input

    w = W(3, 4)
    m = _model("[mm] y = MatMul (x, w)", {"w": w})
    node = next(iter(m.graph))
    before = snapshot(io.full_proto(m))
    j = Journal()
    new = W(3, 4)
    set_input(node, 1, new, "recovered_w", j)
    p = io.full_proto(m)
    assert list(inits(p)) == ["w"] and np.array_equal(inits(p)["w"], new)
    j.undo()
    assert snapshot(io.full_proto(m)) == before


def test_set_input_unshares_a_weight_another_node_reads_and_fills_an_empty_bias_slot():
    from onnxprune.rewrite import set_input

    w, b = W(4, 3), W(4)
    m = _model("""[g1] h = Gemm <transB=1> (x, w)
  [g2] y = Gemm <transB=1> (x, w)
  """, {"w": w}, out="float[2,4] y, float[2,4] h")
    g1 = next(n for n in m.graph if n.name == "g1")
    before = snapshot(io.full_proto(m))
    j = Journal()
    new = W(4, 3)
    set_input(g1, 1, new, "recovered_w", j)
    set_input(g1, 2, b, "recovered_b", j)
    p = io.full_proto(m)
    n1 = next(n for n in p.graph.node if n.name == "g1")
    n2 = next(n for n in p.graph.node if n.name == "g2")
    assert n2.input[1] == "w" and np.array_equal(inits(p)["w"], w)  # the other reader keeps the old weights
    assert n1.input[1] != "w" and np.array_equal(inits(p)[n1.input[1]], new)
    assert len(n1.input) == 3 and np.array_equal(inits(p)[n1.input[2]], b)
    x = W(2, 3)
    assert np.allclose(_run(p, x), x @ w.T, atol=1e-5)
    j.undo()
    assert snapshot(io.full_proto(m)) == before


def test_set_input_never_edits_an_initializer_that_is_also_a_graph_input():
    from onnxprune.rewrite import set_input

    w = W(3, 4)
    m = _model("[mm] y = MatMul (x, w)", {"w": w})
    node = next(iter(m.graph))
    m.graph.inputs.append(node.inputs[1])  # a caller may feed other weights there
    new = W(3, 4)
    set_input(node, 1, new, "recovered_w")
    p = io.full_proto(m)
    assert np.array_equal(inits(p)["w"], w)
    assert np.array_equal(inits(p)[p.graph.node[0].input[1]], new)


def test_add_bias_after_keeps_names_readers_and_graph_outputs_and_undoes():
    from onnxprune.rewrite import add_bias_after

    w = W(3, 4)
    m = _model("""[mm] h = MatMul (x, w)
  [r] y = Relu (h)""", {"w": w}, out="float[2,4] y, float[2,4] h")
    mm = next(n for n in m.graph if n.name == "mm")
    before = snapshot(io.full_proto(m))
    j = Journal()
    bias = W(4)
    add_bias_after(mm, bias, j)
    p = io.full_proto(m)
    ops = [n.op_type for n in p.graph.node]
    assert ops == ["MatMul", "Add", "Relu"]
    add = p.graph.node[1]
    assert add.output[0] == "h" and p.graph.node[2].input[0] == "h"  # readers see the biased value under its name
    assert [o.name for o in p.graph.output] == ["y", "h"]
    onnx.checker.check_model(p, full_check=True)
    import onnxruntime as ort

    x = W(2, 3)
    y, h = ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.allclose(h, x @ w + bias, atol=1e-5) and np.allclose(y, np.maximum(x @ w + bias, 0), atol=1e-5)
    j.undo()
    assert snapshot(io.full_proto(m)) == before

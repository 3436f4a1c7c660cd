"""The zero-contribution oracle's parts, each against a hand-worked case: the
relative error, which values it compares, the bypass of activation
quantization, its rows (groups and channels removed, PASS at the tolerance,
FAIL on a planted difference) and its refusals."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune.errors import UserError
from onnxprune.pipeline import Job
from onnxprune.plan import Plan, Ratios
from onnxprune.validate import oracle as O

APPROX = "approximate (not tested)"


def _make(body, inits, inp="float[1,3,8,8] x", out="float[1,4,8,8] y"):
    m = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : 17]>\ng ({inp}) => ({out}) {{\n{body}\n}}')
    rng = np.random.default_rng(7)
    for k, v in inits.items():
        arr = v if isinstance(v, np.ndarray) else rng.standard_normal(v).astype(np.float32) * 0.5
        m.graph.initializer.append(numpy_helper.from_array(arr, k))
    return m


def test_rel_err_by_hand():
    a, b = np.array([[1.0, -4.0]]), np.array([[1.5, -4.0]])
    assert O.rel_err([a], [b]) == 0.5 / 4  # max |a - b| over max |a|
    # several outputs: the largest of their own relative errors
    assert O.rel_err([a, np.array([2.0])], [b, np.array([1.0])]) == 0.5
    assert O.rel_err([np.array([2.0]), a], [np.array([1.0]), b]) == 0.5
    assert O.rel_err([a, a], [b, a]) == 0.125
    # a reference of zeros: divided by 1e-12, not by 0
    assert O.rel_err([np.zeros(2)], [np.array([0.0, 1e-13])]) == pytest.approx(0.1)
    assert O.rel_err([np.zeros((0, 3))], [np.zeros((0, 3))]) == 0.0 and O.rel_err([], []) == 0.0
    assert O.rel_err([np.array([1, 2], np.int32)], [np.array([1, 3], np.int32)]) == 0.5
    # anything not finite is never a pass
    for x, y in [([1.0, np.nan], [1.0, 2.0]), ([1.0, 2.0], [1.0, np.inf]), ([np.inf, 1.0], [np.inf, 1.0]),
                 ([1.0, 2.0], [np.nan, 2.0])]:
        assert math.isnan(O.rel_err([np.array(x)], [np.array(y)])), (x, y)
    assert math.isnan(O.rel_err([a, np.array([np.nan])], [b, np.array([1.0])]))
    assert O._finite([np.ones(2), np.array([3])]) and not O._finite([np.ones(2), np.array([np.inf])])
    assert not O._finite([np.array([np.nan])]) and O._finite([])


def test_compared_values_walk_back_through_layout_and_squashing():
    m = _make("""[c1] h = Conv (x, w1)
  t = Transpose <perm=[0,2,3,1]> (h)
  s = Sigmoid(t)
  y = Reshape(s, shp)""", {"w1": (4, 3, 1, 1), "shp": np.array([1, 8, 8, 4], np.int64)}, out="float[1,8,8,4] y")
    assert O.compared_values(m) == ["h"]
    assert O.compared_values(m, {"y": "t"}) == ["h"]  # an alias is followed first
    assert O.compared_values(m, {"y": "x"}) == ["x"]
    # a Concat of one input is no split; two outputs reaching one value list it once
    c = _make("""[c1] h = Conv (x, w1)
  k = Concat <axis=1> (h)
  y = Relu(k)
  z = Identity(h)""", {"w1": (4, 3, 1, 1)}, out="float[1,4,8,8] y, float[1,4,8,8] z, float[1,4,8,8] k")
    assert O.compared_values(c) == ["y", "h", "k"]


def test_compared_values_stop_after_64_steps():
    # v70 = Identity^70(x): the walk goes back 64 steps, to v6
    nodes = [helper.make_node("Identity", [f"v{i - 1}" if i > 1 else "x"], [f"v{i}"]) for i in range(1, 71)]
    vi = lambda n: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2])  # noqa: E731
    m = helper.make_model(helper.make_graph(nodes, "g", [vi("x")], [vi("v70")]))
    assert O.compared_values(m) == ["v6"]
    m = helper.make_model(helper.make_graph(nodes[:64], "g", [vi("x")], [vi("v64")]))
    assert O.compared_values(m) == ["x"]


def test_activation_quantization_is_bypassed_not_weights():
    m = _make("""q1 = QuantizeLinear(x, sc, zp)
  d1 = DequantizeLinear(q1, sc, zp)
  q2 = QuantizeLinear(d1, sc, zp)
  d2 = DequantizeLinear(q2, sc, zp)
  wd = DequantizeLinear(wq, sc, zp)
  c = Cast <to=2> (x)
  d3 = DequantizeLinear(c, sc, zp)
  [c1] h = Conv (d2, wd)
  y = Add(h, d3)""", {"sc": np.array(0.1, np.float32), "zp": np.array(0, np.uint8), "wq": np.ones((4, 3, 1, 1), np.uint8)},
              out="float[1,3,8,8] y")
    alias = O._unquantize_activations(m)
    assert alias == {"d1": "x", "d2": "d1"}
    ins = {n.output[0]: list(n.input) for n in m.graph.node}
    assert ins["h"] == ["x", "wd"]  # followed through both pairs
    assert ins["q2"] == ["x", "sc", "zp"]
    assert ins["wd"] == ["wq", "sc", "zp"] and ins["d3"] == ["c", "sc", "zp"]


def test_run_exposes_intermediate_values():
    m = _make("""h = Relu(x)
  y = Neg(h)""", {}, inp="float[3] x", out="float[3] y")
    x = np.array([-1.0, 2.0, -3.0], np.float32)
    h, y = O._run(m, ["h", "y"], {"x": x})
    assert h.tolist() == [0.0, 2.0, 0.0] and y.tolist() == [0.0, -2.0, 0.0]


# two Conv chains side by side: a (8 channels, exact), b (6 channels, exact); n: 4 channels under a
# LayerNormalization over the channels (approximate)
TWO = """[a1] ha = Conv (x, wa1, ba1)
  ra = Relu(ha)
  [a2] ya = Conv (ra, wa2)
  [b1] hb = Conv <pads=[1,1,1,1]> (x, wb1)
  rb = Relu(hb)
  [b2] yb = Conv (rb, wb2)
  y = Add(ya, yb)"""


def _two():
    return _make(TWO, {"wa1": (8, 3, 1, 1), "ba1": (8,), "wa2": (4, 8, 1, 1), "wb1": (6, 3, 3, 3), "wb2": (4, 6, 1, 1)},
                 out="float[1,4,8,8] y")


def _by_scope(rows):
    return {r.scope: r for r in rows}


def test_rows_count_groups_and_removed_channels():
    job = Job.open(_two())
    plan = job.plan(Ratios.from_dict({"default": 0.5}))
    rows = O.oracle(job, plan=plan)
    sets = {g.set_name: g for g in job.groups if g.id in plan.keep}
    assert len(sets) == 2 and len(rows) == 3
    assert [r.scope for r in rows][-1] == "all exact groups"
    for name, g in sets.items():
        r = _by_scope(rows)[name]
        assert (r.kind, r.groups, r.removed, r.status) == ("channels", 1, g.width // 2, "PASS")
        assert 0 <= r.max_rel_err < 1e-5
    last = rows[-1]
    assert (last.kind, last.groups, last.removed, last.status) == ("*", 2, 4 + 3, "PASS")
    assert last.as_dict() == {"scope": "all exact groups", "kind": "*", "groups": 2, "removed": 7,
                              "max_rel_err": last.max_rel_err, "status": "PASS"}
    # per_set False: only the combined check
    only = O.oracle(_two(), Ratios.from_dict({"default": 0.5}), per_set=False)
    assert [(r.scope, r.groups, r.removed, r.status) for r in only] == [("all exact groups", 2, 7, "PASS")]
    # the plan from ratios is the one a prune run makes: nothing removed, no rows
    assert O.oracle(_two(), Ratios.from_dict({"default": 0.0})) == []
    assert O.oracle(_two()) == []


def test_tolerance_is_inclusive_and_a_planted_error_fails(monkeypatch):
    m = _two()
    monkeypatch.setattr(O, "rel_err", lambda a, b: O.TOLERANCE)
    assert {r.status for r in O.oracle(m, Ratios.from_dict({"default": 0.5}))} == {"PASS"}
    monkeypatch.setattr(O, "rel_err", lambda a, b: 1.0001 * O.TOLERANCE)
    assert {r.status for r in O.oracle(m, Ratios.from_dict({"default": 0.5}))} == {"FAIL"}
    monkeypatch.undo()
    # the pruned model's run is off by 1%: every check fails, by about that much
    real_run, calls = O._run, []

    def off(proto, names, feeds):
        outs = real_run(proto, names, feeds)
        calls.append(names)
        return [o * 1.01 for o in outs] if len(calls) % 2 == 0 else outs

    monkeypatch.setattr(O, "_run", off)
    rows = O.oracle(m, Ratios.from_dict({"default": 0.5}))
    assert [r.status for r in rows] == ["FAIL"] * 3
    assert all(r.max_rel_err == pytest.approx(0.01, rel=1e-3) for r in rows)


def test_approximate_sets_are_listed_not_tested():
    m = _make("""[c1] h = Conv (x, w1, b1)
  t = Transpose <perm=[0,2,3,1]> (h)
  n = LayerNormalization <axis=-1> (t, g, bt)
  u = Transpose <perm=[0,3,1,2]> (n)
  [c2] y = Conv (u, w2)""", {"w1": (8, 3, 1, 1), "b1": (8,), "g": (8,), "bt": (8,), "w2": (4, 8, 1, 1)})
    job = Job.open(m)
    plan = job.plan(Ratios.from_dict({"default": 0.5}))
    rows = O.oracle(job, plan=plan)
    assert [(r.kind, r.groups, r.removed, r.max_rel_err, r.status) for r in rows] == [("channels", 1, 4, None, APPROX)]
    with pytest.raises(UserError, match="^nothing to check: every pruned group is approximate"):
        O.require_checks(rows, plan)
    with pytest.raises(UserError, match="^nothing to check: the plan removes no channel"):
        O.require_checks([], Plan({}, {}, {}, {}))
    O.require_checks(_by_scope(O.oracle(_two(), Ratios.from_dict({"default": 0.5}))).values(), plan)


def test_a_rewritten_job_is_refused():
    job = Job.open(_two())
    job.rewritten = True
    with pytest.raises(RuntimeError, match="needs the analysed original"):
        O.oracle(job, Ratios.from_dict({"default": 0.5}))


def test_an_original_with_nan_outputs_is_the_users_error():
    # y = sqrt of a conv output: NaN wherever that output is negative, before any pruning
    m = _make("""[c1] h = Conv (x, w1, b1)
  r = Relu(h)
  [c2] z = Conv (r, w2)
  y = Sqrt(z)""", {"w1": (8, 3, 1, 1), "b1": (8,), "w2": (4, 8, 1, 1)})
    with pytest.raises(UserError) as e:
        O.oracle(m, Ratios.from_dict({"default": 0.5}))
    assert str(e.value) == ("the original model's outputs are not finite on the oracle's random input (x [1, 3, 8, 8], "
                            "standard normal): y has NaN or inf; the oracle needs finite outputs to compare")
    # a finite original passes the check silently
    O.require_finite_original(Job.open(_two()), 2)

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
                 inp="float[N,3,8,8] x", out="float[N,4,8,8] y")


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
    only = O.oracle(Job.open(_two()), Ratios.from_dict({"default": 0.5}), per_set=False)
    assert [(r.scope, r.groups, r.removed, r.status) for r in only] == [("all exact groups", 2, 7, "PASS")]
    # the plan from ratios is the one a prune run makes: nothing removed, no rows
    assert O.oracle(Job.open(_two()), Ratios.from_dict({"default": 0.0})) == []
    assert O.oracle(Job.open(_two())) == []


def test_tolerance_is_inclusive_and_a_planted_error_fails(monkeypatch):
    m = _two()
    monkeypatch.setattr(O, "rel_err", lambda a, b: O.TOLERANCE)
    assert {r.status for r in O.oracle(Job.open(m), Ratios.from_dict({"default": 0.5}))} == {"PASS"}
    monkeypatch.setattr(O, "rel_err", lambda a, b: 1.0001 * O.TOLERANCE)
    assert {r.status for r in O.oracle(Job.open(m), Ratios.from_dict({"default": 0.5}))} == {"FAIL"}
    monkeypatch.undo()
    # the pruned model's run is off by 1%: every check fails, by about that much
    real_run, calls = O._run, []

    def off(proto, names, feeds):
        outs = real_run(proto, names, feeds)
        calls.append(names)
        return [o * 1.01 for o in outs] if len(calls) % 2 == 0 else outs

    monkeypatch.setattr(O, "_run", off)
    rows = O.oracle(Job.open(m), Ratios.from_dict({"default": 0.5}))
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
    with pytest.raises(UserError) as e:
        O.require_checks(rows, plan)
    assert str(e.value) == ("nothing to check: every pruned group is approximate (under a normalisation over the pruned "
                            "axis); the oracle tests exact groups only")
    (g,) = [g for g in job.groups if g.id in plan.keep]
    assert rows[0].scope == g.set_name
    with pytest.raises(UserError, match="^nothing to check: the plan removes no channel"):
        O.require_checks([], Plan({}, {}, {}, {}))
    O.require_checks(_by_scope(O.oracle(Job.open(_two()), Ratios.from_dict({"default": 0.5}))).values(), plan)


def test_a_rewritten_job_is_refused():
    job = Job.open(_two())
    job.rewritten = True
    with pytest.raises(RuntimeError, match="^the oracle needs the analysed original, not a rewritten job$"):
        O.oracle(job, Ratios.from_dict({"default": 0.5}))


def test_an_original_with_nan_outputs_is_the_users_error():
    # y = sqrt of a conv output, w = sqrt of a second input: NaN wherever those are negative, before any pruning
    m = _make("""[c1] h = Conv (x, w1, b1)
  r = Relu(h)
  [c2] z = Conv (r, w2)
  y = Sqrt(z)
  w = Sqrt(v)""", {"w1": (8, 3, 1, 1), "b1": (8,), "w2": (4, 8, 1, 1)}, inp="float[N,3,8,8] x, float[N,5] v",
              out="float[N,4,8,8] y, float[N,5] w")
    with pytest.raises(UserError) as e:
        O.oracle(Job.open(m), Ratios.from_dict({"default": 0.5}))
    # the default batch of 2 for the symbolic dim
    assert str(e.value) == ("the original model's outputs are not finite on the oracle's random input (x [2, 3, 8, 8], "
                            "v [2, 5], standard normal): y, w has NaN or inf; the oracle needs finite outputs to compare")
    with pytest.raises(UserError, match=r"\(x \[3, 3, 8, 8\], v \[3, 5\], standard normal\)"):
        O.oracle(Job.open(m), Ratios.from_dict({"default": 0.5}), batch=3)
    # a finite original passes the check silently
    O.require_finite_original(Job.open(_two()), 2)


def test_outputs_that_do_not_depend_on_the_input_are_the_users_error():
    """A zero-initialised head makes every check pass vacuously (0 vs 0): refused, named."""
    def head(w2, b2):
        return _make("""[c1] h = Conv (x, w1, b1)
  r = Relu(h)
  [c2] y = Conv (r, w2, b2)""", {"w1": (8, 3, 1, 1), "b1": (8,), "w2": w2, "b2": b2},
                     inp="float[N,3,8,8] x", out="float[N,4,8,8] y")

    for b2 in (np.zeros(4, np.float32), np.arange(4, dtype=np.float32)):  # zero, and constant per channel
        with pytest.raises(UserError) as e:
            O.oracle(Job.open(head(np.zeros((4, 8, 1, 1), np.float32), b2)), Ratios.from_dict({"default": 0.5}))
        assert str(e.value).startswith("the original model's outputs are constant on the oracle's random input "
                                       "(x [2, 3, 8, 8], standard normal): y does not depend on the input"), str(e.value)
    rows = O.oracle(Job.open(head((4, 8, 1, 1), (4,))), Ratios.from_dict({"default": 0.5}))  # a trained-like head
    assert rows and {r.status for r in rows} == {"PASS"}
    O.require_signal(Job.open(_two()), 2)  # outputs that vary pass silently


def test_rel_err_computes_in_float64():
    # int8 100 - (-100) would wrap around in int8
    assert O.rel_err([np.array([100], np.int8)], [np.array([-100], np.int8)]) == 2.0
    assert O.rel_err([np.array([np.float16(60000)])], [np.array([np.float16(-60000)])]) == 2.0


def test_compared_values_through_a_concat_count_its_depth():
    # v70 = Identity^70(x); y = Concat(v70, x): the branch into v70 is one step deep, so the walk stops at v7
    nodes = [helper.make_node("Identity", [f"v{i - 1}" if i > 1 else "x"], [f"v{i}"]) for i in range(1, 71)]
    nodes.append(helper.make_node("Concat", ["v70", "x"], ["y"], axis=0))
    vi = lambda n, d: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [d])  # noqa: E731
    m = helper.make_model(helper.make_graph(nodes, "g", [vi("x", 2)], [vi("y", 4)]))
    assert O.compared_values(m) == ["v7", "x"]


def test_the_checks_compare_zeroed_with_zeroed_and_pruned(monkeypatch):
    """What each run sees: the first, the original with the removed channels zeroed
    (wa1's rows); the second, the model rewritten without them (wa1 has 4 rows)."""
    job = Job.open(_two())
    plan = job.plan(Ratios.from_dict({"default": 0.5}))
    gs = {t.node.name: g for g in job.groups if g.id in plan.keep for t in g.tensors if t.role == "out"}
    real_run, seen = O._run, []

    def spy(proto, names, feeds):
        w = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        seen.append((names, w["wa1"], w["wb1"], {k: v.shape for k, v in feeds.items()}))
        return real_run(proto, names, feeds)

    monkeypatch.setattr(O, "_run", spy)
    err = O.check_subset(job, {gs["a1"].id}, plan.keep, 3)
    assert err < 1e-5 and len(seen) == 2
    (n0, a0, b0, f0), (n1, a1, b1, f1) = seen
    assert n0 == n1 == ["y"] and f0 == f1 == {"x": (3, 3, 8, 8)}
    kept = plan.keep[gs["a1"].id]
    removed = sorted(set(range(8)) - set(kept.tolist()))
    assert a0.shape == (8, 3, 1, 1) and not a0[removed].any() and a0[kept].all()
    assert a1.shape == (4, 3, 1, 1) and a1.all()
    # the set not checked is left whole in both runs
    assert b0.shape == b1.shape == (6, 3, 3, 3) and b0.all()
    seen.clear()
    rows = O.oracle(job, plan=plan, batch=1)
    # two runs per row, and two of the original when the checks came out exactly 0 (require_signal)
    signal = rows[-1].max_rel_err == 0.0
    assert all(f == {"x": (1, 3, 8, 8)} for *_, f in seen) and len(seen) == 2 * len(rows) + 2 * signal
    assert [r.status for r in rows] == ["PASS"] * 3


def test_a_final_qdq_pair_is_compared_as_its_float_input(monkeypatch):
    m = _make("""[c1] h = Conv (x, w1, b1)
  r = Relu(h)
  [c2] z = Conv (r, w2)
  q = QuantizeLinear(z, sc, zp)
  y = DequantizeLinear(q, sc, zp)""", {"w1": (8, 3, 1, 1), "b1": (8,), "w2": (4, 8, 1, 1), "sc": np.array(0.05, np.float32),
                                       "zp": np.array(0, np.int8)})
    real_run, seen = O._run, []
    monkeypatch.setattr(O, "_run", lambda p, names, feeds: seen.append(names) or real_run(p, names, feeds))
    rows = O.oracle(Job.open(m), Ratios.from_dict({"default": 0.5}))
    assert seen and all(names == ["z"] for names in seen)
    assert {r.status for r in rows} == {"PASS"}


def test_per_set_off_still_zeroes_a_normalised_set_where_it_is_read():
    """h / sum_spatial(h) per channel: zeroing a whole channel gives 0/0, so the
    combined check alone must also find the sets to zero on the consumer side."""
    m = _make("""[c1] h = Conv <pads=[1,1,1,1]> (x, w1, b1)
  e = Abs(h)
  s = ReduceSum <keepdims=1> (e, axes)
  d = Div(e, s)
  [c2] y = Conv (d, w2, b2)""", {"w1": (8, 3, 3, 3), "b1": (8,), "axes": np.array([2, 3], np.int64), "w2": (4, 8, 1, 1),
                                 "b2": (4,)})
    rows = O.oracle(Job.open(m), Ratios.from_dict({"default": 0.5}), per_set=False)
    assert [(r.scope, r.removed, r.status) for r in rows] == [("all exact groups", 4, "PASS")]
    assert rows[0].max_rel_err < 1e-5


def test_an_approximate_set_before_exact_ones():
    # c1's 8 channels under a LayerNormalization over them (approximate), then two exact sets
    m = _make("""[c1] h = Conv (x, w1, b1)
  t = Transpose <perm=[0,2,3,1]> (h)
  n = LayerNormalization <axis=-1> (t, g, bt)
  u = Transpose <perm=[0,3,1,2]> (n)
  [c2] h2 = Conv (u, w2)
  r2 = Relu(h2)
  [c3] h3 = Conv <pads=[1,1,1,1]> (r2, w3)
  r3 = Relu(h3)
  [c4] y = Conv (r3, w4)""", {"w1": (8, 3, 1, 1), "b1": (8,), "g": (8,), "bt": (8,), "w2": (4, 8, 1, 1), "w3": (6, 4, 3, 3),
                              "w4": (4, 6, 1, 1)})
    rows = O.oracle(Job.open(m), Ratios.from_dict({"default": 0.5}))
    assert [(r.groups, r.removed, r.status) for r in rows] == [(1, 4, APPROX), (1, 2, "PASS"), (1, 3, "PASS"), (2, 5, "PASS")]


def test_the_plan_is_made_with_the_calibration_given():
    from onnxprune.plan.importance.calib import Calibration

    xs = [np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)]
    rows = O.oracle(Job.open(_two()), Ratios.from_dict({"default": 0.5, "importance": "activation"}), calib=Calibration(xs, None, "t"))
    assert [r.status for r in rows] == ["PASS"] * 3

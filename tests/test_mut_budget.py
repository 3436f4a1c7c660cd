"""Budgets on models small enough to enumerate by hand: every plan the search
can reach, its params and MACs, and which one a target picks; the plan-level
estimate on a concat and on onnxruntime's packed attention; parse_target's
forms and refusals."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP, helper, numpy_helper

from onnxprune import api
from onnxprune.errors import UserError
from onnxprune.plan.budget import Estimator, parse_target

# x [1, 3, 4, 4] -> a: 1x1 Conv 3 -> 8 (bias) -> Relu -> b: 1x1 Conv 8 -> 2 (bias, the output: frozen).
# One prunable group: a's 8 channels. Keeping k of them:
#   MACs   a: 16 pixels x k x 3  +  b: 16 x 2 x k                    = 80 k
#   params wa 3k + ba k (not counted when k = 1: one element) + wb 2k + bb 2 = 6k + 2 (7 when k = 1)
CHAIN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,4,4] x) => (float[1,2,4,4] y) {
  [a] h = Conv (x, wa, ba)
  r = Relu(h)
  [b] y = Conv (r, wb, bb)
}"""


def _with(text, weights):
    m = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for k, shape in weights.items():
        m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), k))
    return m


def _chain():
    return _with(CHAIN, {"wa": (8, 3, 1, 1), "ba": (8,), "wb": (2, 8, 1, 1), "bb": (2,)})


def _macs(k):
    return 80 * k


def _params(k):
    return 6 * k + 2 if k > 1 else 7


def _only_group(a):
    (g,) = [g for g in a.groups if not g.frozen]
    return g


def test_estimate_of_every_plan_of_the_chain():
    m = _chain()
    a = api.analyze(m)
    g = _only_group(a)
    assert g.width == 8
    est = Estimator(a.ctx)
    assert est.before == {"params": _params(8), "macs": _macs(8)} == {"params": 50, "macs": 640}
    for k in range(1, 9):
        keep = {g.id: np.arange(k)} if k < 8 else {}
        assert est.estimate(keep) == {"params": _params(k), "macs": _macs(k)}, k
    # an empty keep for another id changes nothing
    assert est.estimate({g.id + 1000: np.arange(2)}) == est.before


def test_estimator_refuses_a_proto_of_another_graph():
    a = api.analyze(_chain())
    other = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3] x) => (float[1,3] y) { y = Relu(x) }""")
    with pytest.raises(RuntimeError, match="^estimator: node lists differ$"):
        Estimator(a.ctx, other)
    # the proto given is the one counted (here: the analysed model's own, as a proto)
    from onnxprune import io

    assert Estimator(a.ctx, io.to_proto(a.ctx.model)).before == {"params": 50, "macs": 640}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings_():
    h = _Records()
    lg = logging.getLogger("onnxprune.plan.budget")
    lg.addHandler(h)
    old = lg.level
    lg.setLevel(logging.WARNING)
    yield h.lines
    lg.removeHandler(h)
    lg.setLevel(old)


@pytest.mark.parametrize("target,k", [
    (0.5, 4),  # 320: exactly 4 channels
    (400, 5),  # an absolute target met exactly
    (370, 5),  # between 320 (50 under) and 400 (30 over): the closer one
    (360, 4),  # 320 and 400 both 40 away: the one not above the target
    (330, 4),  # 10 over 320, 70 under 400
    ("87.5%", 7),
])
def test_target_macs_picks_the_plan_by_hand(target, k, warnings_):
    res = api.prune(_chain(), {"target_macs": target})
    t = res.plan.target
    want = {0.5: 320, "87.5%": 560}.get(target, target)
    assert res.after == {"params": _params(k), "macs": _macs(k)}
    assert t["metric"] == "macs" and t["requested"] == target and t["target"] == want
    assert t["achieved"] == _macs(k) and t["before"] == 640
    assert t["error"] == (_macs(k) - want) / want
    # every ratio the search used is the base ratio (1: none given) times the scale, capped
    assert t["ratios_used"] == {"default": min(0.99, 1.0 * t["scale"])}
    assert 8 - int(np.floor(8 * t["ratios_used"]["default"] + 1e-9)) == k
    # bisection of [0, 0.99] down to 1e-5 of the upper end: about 17 halvings, plus both ends
    assert 3 <= t["evaluations"] <= 25
    off = {370: "8.1", 360: "-11.1", 330: "-3.0"}.get(target)  # +30 / 370, -40 / 360, -10 / 330: over 1% off
    assert warnings_ == ([f"target_macs: closest reachable is {_macs(k)} ({off}% off): channel granularity"] if off else [])


def test_target_params_picks_the_plan_by_hand():
    # 25 of 50: k = 3 gives 20 (5 under), k = 4 gives 26 (1 over)
    res = api.prune(_chain(), {"target_params": 0.5})
    t = res.plan.target
    assert t["metric"] == "params" and t["target"] == 25 and t["achieved"] == 26 == res.after["params"]
    assert res.after["macs"] == _macs(4)


def test_a_target_the_model_meets_needs_one_evaluation(warnings_):
    res = api.prune(_chain(), {"target_macs": 1.0})
    t = res.plan.target
    assert res.after == {"params": 50, "macs": 640} and not res.plan.keep
    assert t["scale"] == 0 and t["evaluations"] == 1 and t["error"] == 0
    assert t["ratios_used"] == {"default": 0.0}
    assert warnings_ == []


def test_an_unreachable_target_takes_the_most_pruned_and_warns(warnings_):
    # the most pruned plan keeps one channel: 80 MACs; asked 50: 60% over
    res = api.prune(_chain(), {"target_macs": 50})
    t = res.plan.target
    assert t["achieved"] == 80 and t["error"] == pytest.approx(0.6)
    assert t["scale"] == pytest.approx(0.99) and t["ratios_used"] == {"default": pytest.approx(0.99)}
    assert warnings_ == ["target_macs: closest reachable is 80 (60.0% off): channel granularity"]


@pytest.mark.parametrize("target,k,scale", [
    (0.5, 4, 0.5),  # 4 of 8 kept from ratio 4/8 on
    (80, 1, 0.875),  # the most pruned plan met exactly: from ratio 7/8 on, not at the cap
])
def test_the_scale_found_is_the_lowest_that_gives_the_plan(target, k, scale):
    res = api.prune(_chain(), {"target_macs": target})
    t = res.plan.target
    assert t["achieved"] == _macs(k) and t["error"] == 0
    assert t["scale"] == pytest.approx(scale, rel=1e-4) and t["scale"] >= scale


def test_an_unreachable_target_scales_given_ratios_to_the_cap():
    # layers 'a' at 0.5: the cap 0.99 is reached at scale 1.98 (one channel left, 80 MACs)
    res = api.prune(_chain(), {"target_macs": 50, "layers": {"a": 0.5}})
    t = res.plan.target
    assert t["achieved"] == 80 and t["ratios_used"]["layers"]["a"] == pytest.approx(0.99)
    assert t["scale"] == pytest.approx(1.98)


def test_given_ratios_are_scaled_together():
    # layers 'a' at 0.5 is the base: the search scales it (no default ratio)
    res = api.prune(_chain(), {"target_macs": 0.75, "layers": {"a": 0.5}})
    t = res.plan.target
    assert t["achieved"] == 480 and res.after["macs"] == 480  # k = 6
    assert t["ratios_used"]["layers"]["a"] == min(0.99, 0.5 * t["scale"])
    assert t["ratios_used"]["default"] == 0.0


# x [1, 3, 2, 2] -> 1x1 Conv 3 -> 4 (bias) -> Relu -> Flatten (16 = 4 channels x 4 pixels) -> Gemm 16 -> 3 (bias).
# Keeping k channels: MACs conv 4 pixels x k x 3 + Gemm 3 x 4k = 24k; params 3k + k + 12k + 3 = 16k + 3
FLAT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,2,2] x) => (float[1,3] y) {
  [c] h = Conv (x, w1, b1)
  r = Relu(h)
  f = Flatten (r)
  [fc] y = Gemm (f, w2, b2)
}"""


def test_estimate_through_a_flatten():
    m = _with(FLAT, {"w1": (4, 3, 1, 1), "b1": (4,), "w2": (16, 3), "b2": (3,)})
    a = api.analyze(m)
    g = _only_group(a)
    assert g.width == 4
    est = Estimator(a.ctx)
    assert est.before == {"params": 67, "macs": 96}
    assert est.estimate({g.id: np.array([1, 3])}) == {"params": 35, "macs": 48}
    assert est.estimate({g.id: np.array([0, 1, 3])}) == {"params": 51, "macs": 72}


# x [1, 3, 4, 4] -> c1: 1x1 Conv 3 -> 4 and c2: 1x1 Conv 3 -> 6, concatenated (10 channels) -> c3: 1x1 Conv 10 -> 2
CONCAT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,4,4] x) => (float[1,2,4,4] y) {
  [c1] h1 = Conv (x, w1, b1)
  [c2] h2 = Conv (x, w2, b2)
  h = Concat <axis=1> (h1, h2)
  r = Relu(h)
  [c3] y = Conv (r, w3, b3)
}"""


def _concat_counts(k1, k2):
    """Keeping k1 of c1's 4 and k2 of c2's 6 channels (k > 1)."""
    macs = 16 * k1 * 3 + 16 * k2 * 3 + 16 * 2 * (k1 + k2)
    params = 3 * k1 + k1 + 3 * k2 + k2 + 2 * (k1 + k2) + 2
    return {"params": params, "macs": macs}


def test_estimate_through_a_concat():
    m = _with(CONCAT, {"w1": (4, 3, 1, 1), "b1": (4,), "w2": (6, 3, 1, 1), "b2": (6,), "w3": (2, 10, 1, 1), "b3": (2,)})
    a = api.analyze(m)
    gs = {}
    for g in a.groups:
        if not g.frozen:
            (node,) = {t.node.name for t in g.tensors if t.role == "out"}
            gs[node] = g
    assert {k: g.width for k, g in gs.items()} == {"c1": 4, "c2": 6}
    est = Estimator(a.ctx)
    assert est.before == _concat_counts(4, 6) == {"params": 62, "macs": 800}
    assert est.estimate({gs["c1"].id: np.array([0, 3])}) == _concat_counts(2, 6)
    assert est.estimate({gs["c2"].id: np.array([1, 2, 5])}) == _concat_counts(4, 3)
    assert est.estimate({gs["c1"].id: np.array([0, 1, 2]), gs["c2"].id: np.array([1, 2])}) == _concat_counts(3, 2)
    res = api.prune(m, {"default": 0.5})
    assert res.after == _concat_counts(2, 3) == est.estimate(res.plan.keep)


# onnxruntime's packed Attention: x [1, 3, 8] -> MatMul 8 -> 16 -> Attention (2 heads of 4; W [16, 24]) -> MatMul 8 -> 4
H, D, S = 2, 4, 3


def _ms_attention():
    att = helper.make_node("Attention", ["s", "wqkv", "bqkv"], ["o"], domain="com.microsoft", num_heads=H)
    nodes = [helper.make_node("MatMul", ["x", "win"], ["s"], name="proj_in"), att,
             helper.make_node("MatMul", ["o", "wo"], ["y"], name="proj_out")]
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("win", (8, 16)), ("wqkv", (16, 3 * H * D)), ("bqkv", (3 * H * D,)), ("wo", (H * D, 4)))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, [1, S, 8])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, [1, S, 4])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def _attention_counts(h):
    """h heads of D kept (the 16 channels stay): the projections, QK^T and AV as the unfused MatMuls."""
    macs = S * 8 * 16 + S * 16 * 3 * h * D + 2 * S * S * h * D + S * h * D * 4
    params = 8 * 16 + 16 * 3 * h * D + 3 * h * D + h * D * 4
    return {"params": params, "macs": macs}


def test_estimate_of_packed_attention_heads():
    m = _ms_attention()
    a = api.analyze(m)
    est = Estimator(a.ctx)
    assert est.before == _attention_counts(2)
    res = api.prune(m, {"kinds": {"heads": 0.5}})
    assert res.after == _attention_counts(1) == est.estimate(res.plan.keep)


# -- parse_target ----------------------------------------------------------------------------


@pytest.mark.parametrize("x,want", [
    (1, 1000.0), (1.0, 1000.0), (0.25, 250.0), (0.0005, 0.5), (1.5, 1.5), (700, 700.0),
    ("250", 250.0), ("0.5", 0.5), ("10%", 100.0), ("150%", 1500.0), ("1.5G", 1.5e9), ("2g", 2e9), (" 3k ", 3000.0),
    ("4m", 4e6), ("0.25M", 2.5e5),
])
def test_parse_target_forms(x, want):
    t = parse_target(x, 1000, "params")
    assert t.metric == "params" and t.value == pytest.approx(want, rel=1e-12) and isinstance(t.value, float)
    assert t.requested is x


@pytest.mark.parametrize("x,msg", [
    ("abc", "target_macs 'abc': expected a number, 'N%' or 'N[K|M|G]'"),
    ("5X", "target_macs '5X': expected a number"),
    ("", "target_macs '': expected a number"),
    ([1], "target_macs must be a number or a string like '50%' or '4.2G', got [1]"),
    (None, "target_macs must be a number or a string"),
    (True, "target_macs must be a number or a string"),
    (-1, "target_macs must be positive, got -1"),
    (0, "target_macs must be positive, got 0"),
    ("0%", "target_macs must be positive, got '0%'"),
    ("-2K", "target_macs must be positive"),
])
def test_parse_target_refusals(x, msg):
    with pytest.raises(UserError) as e:
        parse_target(x, 1000, "macs")
    assert str(e.value).startswith(msg)


# The chain, then b's output reshaped to a computed shape and a MatMul c
# (16 -> 4, no bias: 2 x 16 x 4 = 128 MACs, 64 params more). The batch comes
# from a Shape read first and a Range over it (as in dynamo's as_strided), so
# c's output shape is known only once the shape arithmetic is folded, which
# removes nodes.
FOLDED = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,4,4] x) => (float[N,2,4] y) {
  sx = Shape (x)
  zero = Constant <value_int = 0> ()
  n = Gather <axis = 0> (sx, zero)
  one = Constant <value_int = 1> ()
  ar = Range (zero, n, one)
  sa = Shape (ar)
  rest = Constant <value_ints = [2, 16]> ()
  shp = Concat <axis = 0> (sa, rest)
  [a] h = Conv (x, wa, ba)
  r = Relu(h)
  [b] yb = Conv (r, wb, bb)
  y2 = Reshape (yb, shp)
  [c] y = MatMul (y2, wc)
}"""


def test_estimate_when_layer_shapes_need_folding():
    """The terms stay on the model's own nodes when the counter folds shape
    arithmetic to learn layer shapes (folding removes nodes: the estimate
    once read the terms of one node against the members of another)."""
    from onnxprune.core import metrics

    m = _with(FOLDED, {"wa": (8, 3, 1, 1), "ba": (8,), "wb": (2, 8, 1, 1), "bb": (2,), "wc": (16, 4)})
    assert metrics._unknown_layer_shapes(onnx.shape_inference.infer_shapes(m))  # the case this is about
    a = api.analyze(m)
    g = _only_group(a)
    est = Estimator(a.ctx)
    assert est.before == {"params": _params(8) + 64, "macs": _macs(8) + 128}
    assert est.estimate({g.id: np.arange(4)}) == {"params": _params(4) + 64, "macs": _macs(4) + 128}
    assert metrics.count(api.prune(m, {"default": 0.5}).proto) == {"params": _params(4) + 64, "macs": _macs(4) + 128}


def test_the_result_reports_the_written_models_own_count_and_warns_when_the_estimate_missed(monkeypatch):
    """PruneResult.after is counted on the rewritten graph; an estimate that
    missed a layer's change (a budget spent against the wrong count) is said
    in one warning and a note, not reported as the result."""
    from onnxprune.core.metrics import count

    m = _chain()
    res = api.prune(m, {"default": 0.5})
    assert res.after == count(res.proto) and res.after["macs"] == 80 * 4  # 4 of a's 8 channels kept
    assert not any("count differs" in n for n in res.notes)
    real = Estimator.estimate

    def off(self, keep):  # an estimate that misses half of every pruned channel's saving
        got, full = real(self, keep), real(self, {})
        return {k: (got[k] + full[k]) // 2 for k in got}

    monkeypatch.setattr(Estimator, "estimate", off)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda rec: seen.append(rec.getMessage())
    logging.getLogger("onnxprune.api").addHandler(handler)
    try:
        res = api.prune(m, {"default": 0.5})
    finally:
        logging.getLogger("onnxprune.api").removeHandler(handler)
    assert res.after == count(res.proto) and res.after["macs"] == 320
    assert any("macs 480 estimated, 320 counted" in n for n in res.notes), res.notes
    assert any("count differs" in s for s in seen), seen

"""Scopes tell pools apart: on a model with two isomorphic groups of very
different weight norms and a third group of another set, ``local``,
``isomorphic``, ``global`` and ``cost`` each keep different channels, and
each outcome is worked out by hand below."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.api import analyze, prune
from onnxprune.plan import Ratios, make_plan
from onnxprune.plan.importance.criteria import Scores

# a1 (3x3, 8 ch) -> a2 (1x1, 4 ch) -> b1 (3x3, 8 ch) -> b2 (1x1, 4 ch, the output: frozen)
# groups: A = a1's 8 channels and B = b1's 8 channels (both set conv3x3>conv1x1),
#         M = a2's 4 channels (set conv1x1>conv3x3); all of kind "channels"
TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
  [a1] h1 = Conv <pads=[1,1,1,1]> (x, wa1)
  r1 = Relu(h1)
  [a2] h2 = Conv (r1, wa2, ba2)
  r2 = Relu(h2)
  [b1] h3 = Conv <pads=[1,1,1,1]> (r2, wb1)
  r3 = Relu(h3)
  [b2] y = Conv (r3, wb2)
}"""

U = np.arange(1, 9, dtype=np.float64)  # |entry| of a1's output channel c: c + 1
T = 0.1 * np.arange(1, 9)  # |entry| of b1's output channel c: 0.1 (c + 1)
BIAS = np.arange(4, dtype=np.float64)  # a2's bias


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    sign = lambda *s: np.where(rng.random(s) < 0.5, -1.0, 1.0)  # noqa: E731
    w = {"wa1": sign(8, 3, 3, 3) * U[:, None, None, None], "wa2": sign(4, 8, 1, 1), "ba2": BIAS,
         "wb1": sign(8, 4, 3, 3) * T[:, None, None, None], "wb2": sign(4, 8, 1, 1)}
    m = onnx.parser.parse_model(TEXT)
    for k, v in w.items():
        m.graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), k))
    return m


# l2 scores by hand (every member slice of a channel, squared, summed):
#   A[c]^2 = 27 U[c]^2 (a1 row) + 4 (a2 column of +-1)                 = 31, 112, 247, ...
#   B[c]^2 = 36 T[c]^2 (b1 row) + 4 (b2 column)                         = 4.36, 5.44, ..., 27.04
#   M[o]^2 = 8 (a2 row) + BIAS[o]^2 + 9 * sum(T^2) (b1 column) = 26.36 + BIAS[o]^2 = 26.36, 27.36, 30.36, 35.36
# so every B channel < every M channel < every A channel, apart from B[7] (27.04) > M[0] (26.36).
L2 = {"A": np.sqrt(27 * U ** 2 + 4), "B": np.sqrt(36 * T ** 2 + 4), "M": np.sqrt(8 + BIAS ** 2 + 9 * (T ** 2).sum())}


def _groups(a):
    by_node = {}
    for g in a.groups:
        if not g.frozen:
            (node,) = {t.node.name for t in g.tensors if t.role == "out"}
            by_node[node] = g
    return {"A": by_node["a1"], "M": by_node["a2"], "B": by_node["b1"]}


def _kept(plan, groups) -> dict:
    """Kept channels per group; None: the group stays whole."""
    return {k: (plan.keep[g.id].tolist() if g.id in plan.keep else None) for k, g in groups.items()}


def test_fixture_groups_sets_and_scores():
    a = analyze(_model())
    gs = _groups(a)
    assert {k: (g.kind, g.width, g.set_name) for k, g in gs.items()} == {
        "A": ("channels", 8, "channels:conv3x3>conv1x1"), "B": ("channels", 8, "channels:conv3x3>conv1x1"),
        "M": ("channels", 4, "channels:conv1x1>conv3x3")}
    sc = a.scores(Ratios.from_dict({"importance": "l2"}))
    for k, g in gs.items():
        np.testing.assert_allclose(sc.values[g.id], L2[k], rtol=1e-6)


EXPECTED = {
    # each group alone removes floor(0.5 width) of its own weakest
    "local": {"A": [4, 5, 6, 7], "B": [4, 5, 6, 7], "M": [2, 3]},
    # A and B ranked together (16 channels, remove 8): B's 7 removable ones (a group keeps one), then A[0];
    # M alone removes 2 of 4
    "isomorphic": {"A": [1, 2, 3, 4, 5, 6, 7], "B": [7], "M": [2, 3]},
    # all 20 "channels" ranked together (remove 10): B[0..6], then M[0], M[1], M[2] (M keeps one); A untouched
    "global": {"A": None, "B": [7], "M": [3]},
}


@pytest.mark.parametrize("scope", list(EXPECTED))
def test_scope_keeps_what_the_hand_ranking_says(scope):
    m = _model()
    res = prune(m, {"default": 0.5, "scope": scope})
    assert _kept(res.plan, _groups(res.job)) == EXPECTED[scope]
    a = analyze(m)
    assert _kept(make_plan(a.ctx, a.groups, Ratios.from_dict({"default": 0.5, "scope": scope})), _groups(a)) == EXPECTED[scope]


def test_cost_scope_ranks_score_per_unit_over_every_group():
    """``cost`` pools every group whose scores are ``recon``'s and ranks score / unit
    (the MACs a channel saves). With the l2 scores above and A's channels 1000x
    as costly, A's score per unit is below everything: A loses its 7 removable
    channels first, then B's three weakest (2.09, 2.33, 2.69 < M's 5.13)."""
    a = analyze(_model())
    gs = _groups(a)
    scores = Scores(values={g.id: L2[k] for k, g in gs.items()}, used={g.id: "recon" for g in gs.values()},
                    unit={gs["A"].id: 1000.0, gs["B"].id: 1.0, gs["M"].id: 1.0})
    plan = make_plan(a.ctx, a.groups, Ratios.from_dict({"default": 0.5, "scope": "cost"}), scores=scores)
    assert _kept(plan, gs) == {"A": [7], "B": [3, 4, 5, 6, 7], "M": None}
    # the same scores and ratios under the other scopes: four different outcomes
    outcomes = {str(_kept(plan, gs))}
    for scope in EXPECTED:
        p = make_plan(a.ctx, a.groups, Ratios.from_dict({"default": 0.5, "scope": scope}), scores=scores)
        assert _kept(p, gs) == EXPECTED[scope]
        outcomes.add(str(_kept(p, gs)))
    assert len(outcomes) == 4
    # groups scored otherwise stay in their isomorphic sets under cost
    scores.used = {g.id: "l2" for g in gs.values()}
    p = make_plan(a.ctx, a.groups, Ratios.from_dict({"default": 0.5, "scope": "cost"}), scores=scores)
    assert _kept(p, gs) == EXPECTED["isomorphic"]

"""ratios.json and the plan, case by case: every field's parsing and refusal
(one line each), the budget helpers (base, scaling, caps), which ratio a group
gets (layers, exact set, set glob, kind, default) and which groups are
ignored, rounding of kept widths, and the plan file's round trip and refusals.
Expected values are worked out from the documented rules, on a three-conv
model whose groups are known."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.api import analyze
from onnxprune.errors import UserError
from onnxprune.plan import PLAN_VERSION, Plan, Ratios, _n_keep, make_plan, member_key, read_json
from onnxprune.plan.importance.criteria import Scores
from onnxprune.recover import plan_defaults

# a1 (3x3, 8 ch) -> a2 (1x1, 4 ch) -> b1 (3x3, 6 ch) -> b2 (1x1, 2 ch, the output: frozen)
TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,8,8] x) => (float[1,2,8,8] y) {
  [a1] h1 = Conv <pads=[1,1,1,1]> (x, wa1)
  r1 = Relu(h1)
  [a2] h2 = Conv (r1, wa2)
  r2 = Relu(h2)
  [b1] h3 = Conv <pads=[1,1,1,1]> (r2, wb1)
  r3 = Relu(h3)
  [b2] y = Conv (r3, wb2)
}"""


def _model():
    m = onnx.parser.parse_model(TEXT)
    rng = np.random.default_rng(2)
    for k, s in {"wa1": (8, 3, 3, 3), "wa2": (4, 8, 1, 1), "wb1": (6, 4, 3, 3), "wb2": (2, 6, 1, 1)}.items():
        m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), k))
    return m


def _groups(a):
    out = {}
    for g in a.groups:
        if not g.frozen:
            (node,) = {t.node.name for t in g.tensors if t.role == "out"}
            out[node] = g
    return out


def _ranked_scores(gs):
    """Scores 0, 1, 2, ... per group: the highest indices are kept."""
    return Scores(values={g.id: np.arange(g.width, dtype=float) for g in gs.values()},
                  used={g.id: "l2" for g in gs.values()})


def _plan(a, ratios):
    gs = _groups(a)
    return make_plan(a.ctx, a.groups, Ratios.from_dict(ratios), scores=_ranked_scores(gs)), gs


def _kept(plan, gs):
    return {k: (plan.keep[g.id].tolist() if g.id in plan.keep else None) for k, g in gs.items()}


# -- read_json ---------------------------------------------------------------------------------
def test_read_json_inline_file_and_dict(tmp_path):
    d = {"default": 0.3}
    assert read_json(d, "ratios") is d
    assert read_json('  {"default": 0.3}', "ratios") == d
    p = tmp_path / "r.json"
    p.write_text(json.dumps(d))
    assert read_json(str(p), "ratios") == d
    with pytest.raises(UserError) as e:
        read_json(str(tmp_path / "none.json"), "ratios")
    assert str(e.value) == f"cannot read ratios file {tmp_path / 'none.json'}: No such file or directory"
    with pytest.raises(UserError) as e:
        read_json("{'default': 1}", "ratios")
    assert str(e.value) == "ratios are not valid JSON (Expecting property name enclosed in double quotes at line 1)"
    p.write_text('{\n"a": }')
    with pytest.raises(UserError) as e:
        read_json(str(p), "plan")
    assert str(e.value) == "plan is not valid JSON (Expecting value at line 2)"


# -- Ratios.from_dict --------------------------------------------------------------------------
def test_from_dict_reads_every_field():
    r = Ratios.from_dict({"default": 0.25, "kinds": {"heads": 0.5}, "sets": {"s*": 0.1}, "layers": {"a1": 0}, "ignore": ["b*"],
                          "round_to": 8, "scope": "global", "importance": {"heads": "l1"}, "seed": 3,
                          "target_params": "2M", "input_shapes": {"x": [1, 3, 8, 8]}})
    assert (r.default, r.kinds, r.sets, r.layers, r.ignore) == (0.25, {"heads": 0.5}, {"s*": 0.1}, {"a1": 0.0}, ["b*"])
    assert (r.round_to, r.scope, r.importance, r.seed, r.target_params, r.target_macs) == (8, "global", {"heads": "l1"}, 3, "2M", None)
    assert r.input_shapes == {"x": [1, 3, 8, 8]}
    assert r.given == frozenset({"default", "kinds", "sets", "layers", "ignore", "round_to", "scope", "importance", "seed",
                                 "target_params", "input_shapes"})
    assert type(r.default) is float and type(r.layers["a1"]) is float
    assert r.target == ("params", "2M") and r.importance_spec == {"heads": "l1"}
    d = r.to_dict()
    assert "given" not in d and d["default"] == 0.25 and d["seed"] == 3 and d["target_params"] == "2M"
    e = Ratios.from_dict({})
    assert (e.default, e.kinds, e.sets, e.layers, e.ignore, e.round_to, e.scope, e.importance, e.seed) == (
        0.0, {}, {}, {}, [], 1, "isomorphic", "l2", 0)
    assert e.target is None and e.given == frozenset() and e.importance_spec == {"default": "l2"} and e.input_shapes == {}
    assert Ratios.from_dict({"target_macs": 0.5}).target == ("macs", 0.5)
    assert Ratios.load(None) == Ratios() and Ratios.load('{"default": 0.5}').default == 0.5


@pytest.mark.parametrize("d,msg", [
    ([0.5], "ratios must be a JSON object"),
    ({"bogus": 1, "zz": 2}, "unknown field(s) in ratios: bogus, zz (allowed: default, ignore, importance, input_shapes, "
                            "kinds, layers, round_to, scope, seed, sets, target_"),
    ({"default": True}, "ratio for 'default' must be a number, got True"),
    ({"default": "0.5"}, "ratio for 'default' must be a number, got '0.5'"),
    ({"default": 1}, "ratio for 'default' must be in [0, 1), got 1"),
    ({"default": -0.5}, "ratio for 'default' must be in [0, 1), got -0.5"),
    ({"kinds": [0.5]}, "'kinds' must be an object of name: ratio"),
    ({"sets": 0.5}, "'sets' must be an object of name: ratio"),
    ({"layers": "a"}, "'layers' must be an object of name: ratio"),
    ({"layers": {"a1": 2}}, "ratio for layers 'a1' must be in [0, 1), got 2"),
    ({"kinds": {"blocks": 0.5, "bits": 0.1}}, "unknown kind(s) bits, blocks (kinds: "),
    ({"ignore": "a1"}, "'ignore' must be a list of name globs"),
    ({"ignore": ["a1", 3]}, "'ignore' must be a list of name globs"),
    ({"round_to": 0}, "'round_to' must be a positive integer, got 0"),
    ({"round_to": True}, "'round_to' must be a positive integer, got True"),
    ({"round_to": 2.0}, "'round_to' must be a positive integer, got 2.0"),
    ({"scope": "all"}, "unknown scope 'all' (scopes: isomorphic, global, local, cost, damage)"),
    ({"importance": 3}, "'importance' must be a criterion or an object {kind: criterion}"),
    ({"importance": {"blocks": "l2"}}, "importance: unknown kind 'blocks' (kinds: "),
    ({"importance": "fisher"}, "unknown importance 'fisher' (criteria: l2, l1, random, bn_scale, activation, taylor, hessian, "
                               "recon, gohsp)"),
    ({"seed": "1"}, "'seed' must be an integer"),
    ({"seed": False}, "'seed' must be an integer"),
    ({"target_macs": [1]}, "'target_macs' must be a number (fraction or absolute) or a string like '50%', '4.2G'"),
    ({"target_params": True}, "'target_params' must be a number (fraction or absolute)"),
    ({"target_macs": 0.5, "target_params": 0.5}, "give target_macs or target_params, not both"),
    ({"input_shapes": [1, 3]}, "'input_shapes' must be an object {input name: [dims]}"),
])
def test_from_dict_refusals(d, msg):
    with pytest.raises(UserError) as e:
        Ratios.from_dict(d)
    assert str(e.value).startswith(msg), str(e.value)


def test_recovery_plan_defaults_only_what_was_not_written():
    r, said = plan_defaults(Ratios.from_dict({"default": 0.3}))
    assert (r.importance, r.scope, r.default) == ("recon", "isomorphic", 0.3)
    assert said == "--recover: importance recon (set them in the ratios to override)"
    mixed = {"default": "l2", "mlp": "recon", "heads": "recon", "head_dim": "recon"}  # a transformer's kinds by recon
    line = "--recover: importance l2 (mlp, heads, head_dim: recon), scope damage (set them in the ratios to override)"
    r, said = plan_defaults(Ratios.from_dict({"target_macs": 0.5}))
    assert (r.importance, r.scope, said) == (mixed, "damage", line)
    r, said = plan_defaults(Ratios.from_dict({"target_latency": 0.5}))  # damage per predicted millisecond
    assert (r.importance, r.scope, said) == (mixed, "damage", line)
    r, said = plan_defaults(Ratios.from_dict({"target_params": 0.5, "scope": "damage"}))
    assert (r.importance, r.scope, said) == (mixed, "damage",
                                             "--recover: importance l2 (mlp, heads, head_dim: recon) (set them in the ratios to override)")
    assert r.importance_spec == mixed
    r, said = plan_defaults(Ratios.from_dict({"target_params": 0.5, "scope": "cost"}))
    assert (r.importance, r.scope) == ("recon", "cost")
    r, said = plan_defaults(Ratios.from_dict({"target_macs": 0.5, "importance": "l1", "scope": "local"}))
    assert (r.importance, r.scope, said) == ("l1", "local", "")
    base = Ratios.from_dict({"importance": "l1"})
    r, _ = plan_defaults(base)
    assert r is not base and base.importance == "l1"


def test_budget_helpers():
    r = Ratios.from_dict({"default": 0.2, "kinds": {"heads": 0.4}, "sets": {"s": 0.1}, "layers": {"a1": 0.6}, "target_macs": 0.5})
    assert r.ratio_dict() == {"default": 0.2, "kinds": {"heads": 0.4}, "sets": {"s": 0.1}, "layers": {"a1": 0.6}}
    assert Ratios.from_dict({"default": 0.2}).ratio_dict() == {"default": 0.2}
    assert r.max_ratio() == 0.6 and Ratios().max_ratio() == 0.0
    assert Ratios.from_dict({"sets": {"s": 0.7}}).max_ratio() == 0.7
    assert Ratios.from_dict({"kinds": {"mlp": 0.3}}).max_ratio() == 0.3
    s = r.scaled(2.0, 0.99)
    assert (s.default, s.kinds, s.sets, s.layers) == (0.4, {"heads": 0.8}, {"s": 0.2}, {"a1": 0.99})
    assert s.target_macs is None and s.target_params is None and r.target_macs == 0.5 and r.layers == {"a1": 0.6}
    assert r.base_for_target() is r
    z = Ratios.from_dict({"kinds": {"heads": 0.0}, "target_params": 100})
    b = z.base_for_target()
    assert b is not z and b.default == 1.0 and z.default == 0.0 and b.kinds == {"heads": 0.0}
    b.kinds["heads"] = 0.5
    assert z.kinds == {"heads": 0.0}


@pytest.mark.parametrize("width,n_remove,round_to,want", [
    (8, 3, 1, 5), (8, 0, 1, 8), (8, 8, 1, 1), (8, 9, 1, 1),
    (8, 3, 4, 4),  # 5 -> nearest multiple of 4
    (10, 3, 4, 8),  # 7 -> 8
    (8, 7, 4, 4),  # 1 -> 0 -> at least one multiple
    (3, 1, 4, 3),  # 2 -> 0 -> at least min(4, width)
    (12, 1, 4, 12),  # 11 -> 12
    (16, 0, 32, 16),  # never above the width
    (8, 2, 2, 6),
])
def test_n_keep_rounding(width, n_remove, round_to, want):
    assert _n_keep(width, n_remove, round_to) == want
    assert type(_n_keep(width, n_remove, round_to)) is int


# -- which ratio, which group -------------------------------------------------------------------
def test_fixture_groups():
    a = analyze(_model())
    gs = _groups(a)
    assert {k: (g.kind, g.width, g.set_name) for k, g in gs.items()} == {
        "a1": ("channels", 8, "channels:conv3x3>conv1x1"), "b1": ("channels", 6, "channels:conv3x3>conv1x1"),
        "a2": ("channels", 4, "channels:conv1x1>conv3x3")}


def test_ratio_sources_in_order_of_precedence():
    a = analyze(_model())
    plan, gs = _plan(a, {"default": 0.5, "layers": {"b2": 0.5}, "sets": {"channels:conv1x1*": 0.25}})
    assert plan.ratios[gs["b1"].id] == (0.5, "layers")
    assert plan.ratios[gs["a2"].id] == (0.25, "sets[channels:conv1x1*]")
    assert plan.ratios[gs["a1"].id] == (0.5, "default")
    # a group's names: its members' nodes and tensors (a1's group: a1, wa1, a2, wa2; a2's: a2, wa2, b1, wb1;
    # b1's: b1, wb1, b2, wb2). Layers match any of them; an exact set name beats a glob; a kind beats the default
    plan, gs = _plan(a, {"default": 0.1, "kinds": {"channels": 0.5}, "layers": {"wb2": 0.25},
                         "sets": {"channels:conv3x3>conv1x1": 0.75, "channels:*": 0.25}})
    assert plan.ratios[gs["b1"].id] == (0.25, "layers")
    assert plan.ratios[gs["a1"].id] == (0.75, "sets[channels:conv3x3>conv1x1]")
    assert plan.ratios[gs["a2"].id] == (0.25, "sets[channels:*]")
    plan, gs = _plan(a, {"default": 0.1, "kinds": {"channels": 0.5}})
    assert {plan.ratios[g.id] for g in gs.values()} == {(0.5, "kinds[channels]")}
    plan, gs = _plan(a, {"default": 0.1, "kinds": {"mlp": 0.5}})
    assert {plan.ratios[g.id] for g in gs.values()} == {(0.1, "default")}


def test_ignore_by_name_or_set_and_zero_ratios():
    a = analyze(_model())
    # a1 is ignored before its layer ratio is looked up ('a2' names a1's group too: a2 reads its channels)
    plan, gs = _plan(a, {"default": 0.5, "ignore": ["zz", "wa1"], "layers": {"a2": 0.0}})
    assert plan.skipped == {gs["a1"].id: "ignored by 'wa1'"}
    assert gs["a1"].id not in plan.ratios and gs["a1"].id not in plan.scores
    # a2 at ratio 0: has its ratio and scores, keeps everything
    assert plan.ratios[gs["a2"].id] == (0.0, "layers") and gs["a2"].id in plan.scores
    assert _kept(plan, gs) == {"a1": None, "a2": None, "b1": [3, 4, 5]}
    plan, gs = _plan(a, {"default": 0.5, "ignore": ["channels:conv1x1>*"]})
    assert plan.skipped == {gs["a2"].id: "ignored by 'channels:conv1x1>*'"}
    assert Ratios.from_dict({"ignore": ["a*"]}).ignored(gs["a1"]) == "a*"
    assert Ratios.from_dict({"ignore": ["q*"]}).ignored(gs["a1"]) is None
    assert Ratios.from_dict({"layers": {"q*": 0.5}}).layer_ratio(gs["a1"]) is None


@pytest.mark.parametrize("ratios,want", [
    # each set pools its groups: a1 + b1 (14 channels, remove 7; scores 0..7 and 0..5: the lowest first,
    # ties by group order, a group keeps one), a2 alone (remove 2)
    ({"default": 0.5}, {"a1": [4, 5, 6, 7], "b1": [3, 4, 5], "a2": [2, 3]}),
    ({"default": 0.5, "scope": "local"}, {"a1": [4, 5, 6, 7], "b1": [3, 4, 5], "a2": [2, 3]}),
    # all 18 channels of kind 'channels' in one pool: remove 9 (0,0,0, 1,1,1, 2,2,2)
    ({"default": 0.5, "scope": "global"}, {"a1": [3, 4, 5, 6, 7], "b1": [3, 4, 5], "a2": [3]}),
    # a layer ratio is its own pool even in a global scope
    ({"default": 0.5, "scope": "global", "layers": {"a2": 0.5}}, {"a1": [4, 5, 6, 7], "b1": [3, 4, 5], "a2": [2, 3]}),
    # round_to 4: a1 keeps 4, b1 keeps 3 -> 4, a2 keeps 2 -> 0 -> 4: whole
    ({"default": 0.5, "round_to": 4}, {"a1": [4, 5, 6, 7], "b1": [2, 3, 4, 5], "a2": None}),
    # 14 x 0.2: remove 2 (a1's 0 and b1's 0); a2: 4 x 0.2 removes none
    ({"default": 0.2}, {"a1": [1, 2, 3, 4, 5, 6, 7], "b1": [1, 2, 3, 4, 5], "a2": None}),
    ({"default": 0.9}, {"a1": [7], "b1": [5], "a2": [3]}),
])
def test_pools_by_hand(ratios, want):
    a = analyze(_model())
    plan, gs = _plan(a, ratios)
    assert _kept(plan, gs) == want
    for g in gs.values():
        if g.id in plan.keep:
            assert plan.keep[g.id].dtype.kind == "i"


def test_pool_ties_break_by_group_then_channel():
    # one set of two groups, equal scores everywhere: the first group (by id) loses its channels first
    a = analyze(_model())
    gs = _groups(a)
    sc = Scores(values={g.id: np.ones(g.width) for g in gs.values()}, used={})
    first, second = sorted([gs["a1"], gs["b1"]], key=lambda g: g.id)
    plan = make_plan(a.ctx, a.groups, Ratios.from_dict({"default": 0.25}), scores=sc)
    # 14 channels, remove 3: all from the first group, its lowest indices
    assert len(plan.keep[first.id]) == first.width - 3 and second.id not in plan.keep


def test_cost_scope_pools_recon_channels_by_score_per_unit():
    a = analyze(_model())
    gs = _groups(a)
    sc = _ranked_scores(gs)
    sc.used = {g.id: "recon" for g in gs.values()}
    sc.unit = {gs["a1"].id: 10.0, gs["b1"].id: 1.0, gs["a2"].id: 0.0}
    # per unit: a1 0, .1, .2, ...; b1 0, 1, 2, ...; a2 0, 1e12, 2e12, 3e12 (a unit of 0 counts as 1e-12).
    # 18 channels, remove 9: (0, a1 0) (0, b1 0) (0, a2 0) then a1's .1 ... .6 (a1 keeps 7 of 8 lowest)
    plan = make_plan(a.ctx, a.groups, Ratios.from_dict({"default": 0.5, "scope": "cost"}), scores=sc)
    assert _kept(plan, gs) == {"a1": [7], "b1": [1, 2, 3, 4, 5], "a2": [1, 2, 3]}


# -- the plan file ---------------------------------------------------------------------------------
def test_plan_file_round_trip_and_refusals():
    a = analyze(_model())
    plan, gs = _plan(a, {"default": 0.5, "ignore": ["wb2"]})  # b1 left whole; a1 alone in its set
    data = plan.to_json(a.groups, "m.onnx")
    assert data["onnxprune_plan"] == PLAN_VERSION == 1 and data["model"] == "m.onnx" and data["groups_total"] == len(a.groups)
    assert data["ratios"] is None and data["target"] is None
    at = {g.id: i for i, g in enumerate(a.groups)}
    rows = {k: data["groups"][at[g.id]] for k, g in gs.items()}
    assert rows["a1"]["keep"] == [4, 5, 6, 7] and rows["a1"]["ratio"] == 0.5 and rows["a1"]["from"] == "default"
    assert rows["b1"]["keep"] is None and rows["b1"]["skipped"] == "ignored by 'wb2'" and "ratio" not in rows["b1"]
    assert rows["a2"]["keep"] == [2, 3] and "skipped" not in rows["a2"]
    assert sorted(rows["a1"]["members"]) == sorted(member_key(t) for t in gs["a1"].tensors)
    assert "a1[1] wa1 axis 0" in rows["a1"]["members"] and "a2[1] wa2 axis 1" in rows["a1"]["members"]
    assert rows["a1"]["kind"] == "channels" and rows["a1"]["width"] == 8 and rows["a1"]["set"] == gs["a1"].set_name
    frozen = [r for r in data["groups"] if "frozen" in r]
    assert frozen and all(r["keep"] is None for r in frozen)
    back = Plan.from_json(json.loads(json.dumps(data)), a.groups)
    assert {k: v.tolist() for k, v in back.keep.items()} == {k: v.tolist() for k, v in plan.keep.items()}
    assert back.ratios[gs["a1"].id] == (0.5, "default") and gs["b1"].id not in back.ratios
    # a row keeping every index is kept whole
    whole = json.loads(json.dumps(data))
    for r in whole["groups"]:
        if r.get("keep") is not None:
            r["keep"] = list(range(r["width"]))
            del r["ratio"]
    assert Plan.from_json(whole, a.groups).keep == {}

    def refused(edit, msg, where="plan"):
        d = json.loads(json.dumps(data))
        edit(d)
        with pytest.raises(UserError) as e:
            Plan.from_json(d, a.groups, where)
        assert str(e.value).startswith(msg), str(e.value)

    a1 = at[gs["a1"].id]
    fz = next(i for i, r in enumerate(data["groups"]) if "frozen" in r)
    refused(lambda d: d.update(onnxprune_plan=2), "p.json is not an onnxprune plan file (version 1)", "p.json")
    refused(lambda d: d.update(groups={}), "plan is not an onnxprune plan file")
    refused(lambda d: d["groups"].__setitem__(0, []), "plan: group #0 has no member list")
    refused(lambda d: d["groups"][a1].__setitem__("members", ["x"]), f"plan does not fit this model: group #{a1} (channels, "
            f"{gs['a1'].set_name}) has no counterpart (was the plan made on another model?)")
    refused(lambda d: d["groups"][a1].__setitem__("width", 9), f"plan does not fit this model: group #{a1} has width 9, the model 8")
    refused(lambda d: d["groups"][fz].__setitem__("keep", [0]), f"plan: group #{fz} (")
    for bad in ([], [0, 0], [-1, 2], [8], [True, 1], "0,1", [0.5]):
        refused(lambda d: d["groups"][a1].__setitem__("keep", bad),
                f"plan: group #{a1} 'keep' must be a non-empty list of distinct indices in [0, 8)")
    refused(lambda d: d.update(groups_total=99), f"plan does not fit this model: it lists 99 groups, the model has {len(a.groups)}")
    d = json.loads(json.dumps(data))
    d["groups_total"] = None
    del d["groups"][a1]["from"]
    p = Plan.from_json(d, a.groups)
    assert p.ratios[gs["a1"].id] == (0.5, "plan file") and p.target is None and p.ratios_given == data["ratios"]


# -- what the plan reads besides the ratios ------------------------------------------------------------
def test_n_keep_rounds_a_single_channel_up_to_one_multiple():
    assert _n_keep(8, 7, 2) == 2  # 1 kept -> 0 multiples of 2 -> at least one: 2
    assert _n_keep(4, 0, 3) == 3  # 4 / 3 rounds to 1 multiple: 3


def test_compute_scores_passes_the_seed_data_and_callback():
    from onnxprune.plan import compute_scores
    from onnxprune.plan.importance.calib import Calibration

    m = _model()
    a = analyze(m)
    live = [g for g in a.groups if not g.frozen]
    seen = []
    sc = compute_scores(a.ctx, a.groups, Ratios.from_dict({"importance": "random", "seed": 5}), after_group=seen.append)
    draws = np.random.default_rng(5).random(sum(g.width for g in live))
    np.testing.assert_array_equal(np.concatenate([sc.values[g.id] for g in live]), draws)
    assert seen == live
    calib = Calibration([np.ones((1, 3, 8, 8), np.float32)], None, "test")
    sc = compute_scores(a.ctx, a.groups, Ratios.from_dict({"importance": "activation"}), m, calib)
    assert {sc.used[g.id] for g in live} == {"activation"}
    with pytest.raises(UserError, match="needs calibration data"):
        compute_scores(a.ctx, a.groups, Ratios.from_dict({"importance": "activation"}), m, None)


def test_plan_holds_its_scores_and_skips_frozen_groups_in_any_order():
    a = analyze(_model())
    gs = _groups(a)
    sc = _ranked_scores(gs)
    frozen = [g for g in a.groups if g.frozen]
    plan = make_plan(a.ctx, frozen + [g for g in a.groups if not g.frozen], Ratios.from_dict({"default": 0.5}), scores=sc)
    assert plan.importance is sc
    assert _kept(plan, gs) == {"a1": [4, 5, 6, 7], "b1": [3, 4, 5], "a2": [2, 3]}


def test_ratio_zero_keeps_every_channel_whatever_the_rounding():
    a = analyze(_model())
    plan, gs = _plan(a, {"default": 0.0, "round_to": 3})
    assert plan.keep == {} and {plan.ratios[g.id] for g in gs.values()} == {(0.0, "default")}


def test_cost_scope_unit_defaults_and_small_units():
    a = analyze(_model())
    gs = _groups(a)
    sc = _ranked_scores(gs)
    sc.used = {g.id: "recon" for g in gs.values()}
    sc.unit = {gs["a1"].id: 0.5, gs["a2"].id: 4.0}  # b1 has none: counts as 1e-12
    # per unit: a1 0, 2, 4, ... 14; b1 0, 1e12, ...; a2 0, .25, .5, .75. 18 channels, remove 9: the three 0s,
    # a2's .25 and .5, then a1's 2, 4, 6, 8
    plan = make_plan(a.ctx, a.groups, Ratios.from_dict({"default": 0.5, "scope": "cost"}), scores=sc)
    assert _kept(plan, gs) == {"a1": [5, 6, 7], "b1": [1, 2, 3, 4, 5], "a2": [3]}


def test_keep_order_is_stable_among_tied_scores():
    # 40 channels scored 1, 0, 1, 0, ...: keep the 20 ones and the first 10 zeros by index
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,4,4] x) => (float[1,2,4,4] y) {
  [c1] h = Conv (x, w1)
  r = Relu(h)
  [c2] y = Conv (r, w2)
}""")
    for k, s in {"w1": (40, 3, 1, 1), "w2": (2, 40, 1, 1)}.items():
        m.graph.initializer.append(numpy_helper.from_array(np.ones(s, np.float32), k))
    a = analyze(m)
    (g,) = [g for g in a.groups if not g.frozen]
    sc = Scores(values={g.id: np.array([1.0, 0.0] * 20)}, used={g.id: "l2"})
    plan = make_plan(a.ctx, a.groups, Ratios.from_dict({"default": 0.25}), scores=sc)
    assert plan.keep[g.id].tolist() == sorted(list(range(0, 40, 2)) + list(range(1, 20, 2)))


ATT_MLP = """<ir_version: 8, opset_import: ["" : 17]>
g (float[B,3,6] x) => (float[B,3,6] y) {
  q0 = MatMul(x, wq)
  k0 = MatMul(x, wk)
  v0 = MatMul(x, wv)
  q1 = Reshape(q0, s4)
  k1 = Reshape(k0, s4)
  v1 = Reshape(v0, s4)
  q2 = Transpose <perm=[0,2,1,3]> (q1)
  k2 = Transpose <perm=[0,2,3,1]> (k1)
  v2 = Transpose <perm=[0,2,1,3]> (v1)
  s0 = MatMul(q2, k2)
  p = Softmax <axis=-1> (s0)
  o0 = MatMul(p, v2)
  o1 = Transpose <perm=[0,2,1,3]> (o0)
  o2 = Reshape(o1, s3)
  y0 = MatMul(o2, wo)
  r0 = Relu(y0)
  y = MatMul(r0, w5)
}"""


def _att_mlp():
    """Three heads of two dims, then a 6-wide ReLU layer: groups heads (3), head_dim (2, twice), mlp (6)."""
    m = onnx.parser.parse_model(ATT_MLP)
    rng = np.random.default_rng(4)
    for k in ("wq", "wk", "wv", "wo", "w5"):
        m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((6, 6)).astype(np.float32), k))
    for k, v in (("s4", [0, 3, 3, 2]), ("s3", [0, 3, 6])):
        m.graph.initializer.append(numpy_helper.from_array(np.array(v, np.int64), k))
    a = analyze(m)
    live = [g for g in a.groups if not g.frozen]
    assert sorted((g.kind, g.width) for g in live) == [("head_dim", 2), ("head_dim", 2), ("heads", 3), ("mlp", 6)]
    return a, live


def test_cost_scope_ranks_attention_dims_within_their_sets():
    a, live = _att_mlp()
    sc = Scores(values={g.id: np.arange(g.width, dtype=float) for g in live}, used={g.id: "recon" for g in live},
                unit={g.id: (10.0 if g.kind == "heads" else 1.0) for g in live})
    plan = make_plan(a.ctx, a.groups, Ratios.from_dict({"default": 0.34, "scope": "cost"}), scores=sc)
    got = {g.kind: (plan.keep[g.id].tolist() if g.id in plan.keep else None) for g in live}
    # heads alone: remove floor(1.02) = 1; each head_dim alone: floor(0.68) = 0; the mlp group alone in the cost pool: 2
    assert got == {"heads": [1, 2], "head_dim": None, "mlp": [2, 3, 4, 5]}


def test_heads_are_not_rounded():
    a, live = _att_mlp()
    sc = Scores(values={g.id: np.arange(g.width, dtype=float) for g in live}, used={g.id: "l2" for g in live})
    plan = make_plan(a.ctx, a.groups, Ratios.from_dict({"kinds": {"heads": 0.67}, "round_to": 4}), scores=sc)
    (heads,) = [g for g in live if g.kind == "heads"]
    assert plan.keep[heads.id].tolist() == [2] and len(plan.keep) == 1


def test_plan_file_carries_target_criteria_ratios_and_frozen_reasons():
    a = analyze(_model())
    plan, gs = _plan(a, {"default": 0.5})
    plan.target = {"kind": "macs", "value": 0.5}
    plan.criteria = {"channels": "l2"}
    plan.ratios_given = {"default": 0.5}
    data = json.loads(json.dumps(plan.to_json(a.groups)))
    assert (data["target"], data["criteria"], data["ratios"]) == (plan.target, plan.criteria, plan.ratios_given)
    (frozen,) = [g for g in a.groups if g.frozen]
    row = next(r for r in data["groups"] if "frozen" in r)
    assert row["frozen"] == frozen.frozen[0] and "graph output" in row["frozen"]
    back = Plan.from_json(data, a.groups)
    assert (back.target, back.criteria, back.ratios_given) == (plan.target, plan.criteria, plan.ratios_given)
    assert back.scores == {} and back.skipped == {}
    with pytest.raises(UserError) as e:
        Plan.from_json({}, a.groups)
    assert str(e.value) == "plan is not an onnxprune plan file (version 1)"


def test_ratio_messages_name_every_kind_and_the_latency_target(tmp_path):
    from onnxprune.plan import KINDS

    with pytest.raises(UserError) as e:
        Ratios.from_dict({"kinds": {"bits": 0.1}})
    assert str(e.value) == f"unknown kind(s) bits (kinds: {', '.join(KINDS)})"
    with pytest.raises(UserError) as e:
        Ratios.from_dict({"importance": {"bits": "l2"}})
    assert str(e.value) == f"importance: unknown kind 'bits' (kinds: {', '.join(KINDS)}, or 'default')"
    r = Ratios.from_dict({"target_latency": "60%"})
    assert r.target_latency == "60%" and r.target is None
    assert Ratios.from_dict({}).target_latency is None
    with pytest.raises(UserError) as e:
        Ratios.from_dict({"target_latency": "60%", "target_params": 0.5})
    assert str(e.value) == "give target_latency or target_macs / target_params, not both"
    with pytest.raises(UserError):
        Ratios.from_dict({"target_latency": "fast"})
    with pytest.raises(UserError) as e:
        Ratios.load(str(tmp_path / "none.json"))
    assert str(e.value).startswith("cannot read ratios file ")


def test_plan_file_replays_heads_and_head_dims_sharing_one_axis():
    """A fused qkv weight's output axis holds two groups (heads x head dims) with
    the same members: the plan file must tell them apart by kind and width."""
    import pathlib

    from onnxprune.api import prune

    path = pathlib.Path(__file__).resolve().parent.parent / "models" / "ref_vit.onnx"
    res = prune(str(path), {"kinds": {"heads": 0.34, "head_dim": 0.25}, "scope": "local"})
    rows = [r for r in res.plan_json["groups"] if r["kind"] in ("heads", "head_dim")]
    shared = {frozenset(r["members"]) for r in rows if r["kind"] == "heads"} & \
        {frozenset(r["members"]) for r in rows if r["kind"] == "head_dim"}
    assert shared  # the case this is about
    again = prune(str(path), plan=json.loads(json.dumps(res.plan_json)))
    assert again.proto.SerializeToString() == res.proto.SerializeToString()
    assert res.after["macs"] < 0.9 * res.before["macs"]

"""The per-node latency model: nodes timed alone, each node's share of work
left under a plan, the predicted time of a plan, and the damage search that
spends a latency budget by it (fake clocks stand in for ONNX Runtime's timings,
so nothing here depends on this machine's speed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.pipeline import Job
from onnxprune.plan import Ratios
from onnxprune.plan import latency as L
from onnxprune.runtime import nodetime

DEFAULT = str(Path(__file__).resolve().parents[1] / "onnxprune" / "data" / "default_resnet.onnx")


def chain() -> onnx.ModelProto:
    """x[1,3,8,8] -> conv a (16) -> relu -> conv b (8) -> conv c (4): one prunable group between a and b (width 16),
    one between b and c (width 8)."""
    rng = np.random.default_rng(0)
    w = {"wa": (16, 3, 3, 3), "wb": (8, 16, 1, 1), "wc": (4, 8, 1, 1)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), k) for k, s in w.items()]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "wb"], ["b"]),
             helper.make_node("Conv", ["b", "wc"], ["y"])]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_each_nodes_share_of_work_left_by_hand():
    job = Job.open(chain())
    g16 = next(g for g in job.groups if g.width == 16)
    g8 = next(g for g in job.groups if g.width == 8)
    est = job.estimator
    assert est.node_work({}) == pytest.approx([1, 1, 1, 1])
    # a keeps 4 of 16 outputs: conv a and relu at 1/4; conv b reads 4 of 16 inputs: 1/4; conv c untouched
    assert est.node_work({g16.id: np.arange(4)}) == pytest.approx([0.25, 0.25, 0.25, 1.0])
    # and b keeps 2 of 8: conv b at 1/4 * 1/4, conv c reads 2 of 8
    assert est.node_work({g16.id: np.arange(4), g8.id: np.arange(2)}) == pytest.approx([0.25, 0.25, 1 / 16, 0.25])


class FakeEstimator:
    def __init__(self, work):
        self.work = np.asarray(work, dtype=float)

    def node_work(self, keep):
        return self.work if keep else np.ones_like(self.work)

    def estimate(self, keep):
        return {"macs": 10, "params": 5}


def test_predicted_time_by_hand():
    # node 0: 2 ms full, 1 ms at half its work -> 2 ms per unit of work; node 1: no faster when narrower (fixed);
    # node 2: timed slower when narrower (noise) -> fixed; node 3: could not be timed -> costs nothing
    est = FakeEstimator([0.25, 0.5, 0.5, 0.5])
    m = L.NodeModel(est, full=[2.0, 1.0, 1.0, None], ref=[1.0, 1.0, 1.5, 0.3], ref_work=np.array([0.5, 0.5, 0.5, 0.5]))
    assert m.before_ms == pytest.approx(4.0)
    assert m.ms({}) == pytest.approx(4.0)
    assert m.node_ms({1: np.arange(1)}) == pytest.approx([2.0 - 2.0 * 0.75, 1.0, 1.0, 0.0])
    assert m.estimate({1: np.arange(1)}) == {"macs": 10, "params": 5, "ms": pytest.approx(2.5)}
    # a node whose work went below what the slope allows never costs less than nothing
    deep = L.NodeModel(FakeEstimator([0.0]), full=[1.0], ref=[0.2], ref_work=np.array([0.5]))
    assert deep.ms({1: np.arange(1)}) == 0.0


def test_reference_plan_halves_every_prunable_group_in_runtime_widths():
    class G:
        def __init__(self, id, width, kind="channels", frozen=False):
            self.id, self.width, self.kind, self.frozen = id, width, kind, frozen

    keep = L.reference_keep([G(0, 64), G(1, 12), G(2, 6, "heads"), G(3, 64, frozen=True), G(4, 1)], round_to=8)
    assert {k: len(v) for k, v in keep.items()} == {0: 32, 1: 6, 2: 3}


def test_nodes_are_timed_alone_and_a_control_flow_node_is_not():
    m = chain()
    then = helper.make_graph([helper.make_node("Identity", ["y"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["y"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    feed = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    t = nodetime.node_times(m, feed, runs=3, warmup=1)
    assert len(t) == 5 and t[4] is None
    assert all(isinstance(x, float) and x > 0 for x in t[:4])


def elements_clock(proto, feed, provider="cpu", threads=1, progress=None, **kw):
    """A node's 'time': a millisecond per million values it writes, plus 0.01 ms (from a real run, not a clock)."""
    from onnxprune.runtime.capture import exposed

    names = [o for n in proto.graph.node for o in n.output if o]
    got = dict(zip(names, exposed(proto, names).run(names, feed)))
    return [0.01 + sum(got[o].size for o in n.output if o) / 1e6 for n in proto.graph.node]


def macs_bench(models, **kw):
    """Whole-model 'latency' proportional to the MACs (a fixed clock, not this machine's)."""
    from onnxprune.core import metrics
    from onnxprune.runtime import bench as B

    rows = []
    for name, proto in models:
        ms = 1.0 + metrics.count(proto)["macs"] / 1e7
        rows.append(B.BenchRow(name, 8, ms, ms, ms, ms, 8e3 / ms, 1, 1, None, 1.0, times_ms=[ms] * 3))
    return rows


def test_a_latency_target_under_scope_damage_spends_predicted_milliseconds(tmp_path, monkeypatch):
    from onnxprune.plan import damage
    from onnxprune.plan.importance.calib import load as load_calib
    from onnxprune.runtime import bench as B

    monkeypatch.setattr(nodetime, "node_times", elements_clock)
    monkeypatch.setattr(B, "bench", macs_bench)
    runs = []
    real = damage.allocate
    monkeypatch.setattr(damage, "allocate", lambda *a, **k: runs.append(a[5]) or real(*a, **k))
    job = Job.open(DEFAULT)
    calib = load_calib("synthetic", job.skeleton())
    table = str(tmp_path / "t.json")
    plan = job.plan(Ratios.from_dict({"target_latency": 0.6, "scope": "damage", "importance": "l2"}), calib,
                    latency_table=table)
    t = plan.target
    assert t["search"] == "predicted ms" and t["met"] and t["achieved_ratio"] <= 0.6
    assert t["candidates"] >= 2 and len(runs) < t["candidates"]  # candidates after the first come from one greedy run
    counted = job.counts(plan)["macs"] / job.counts()["macs"]
    assert t["macs_fraction"] == pytest.approx(counted)
    # the plan is what the fake clock says it is
    original = job.data_proto()
    with job.edited(plan.keep, prune=True) as p:
        rows = macs_bench([("original", original), ("pruned", p)])
    assert rows[1].median_ms / rows[0].median_ms == pytest.approx(t["achieved_ratio"])
    data = json.load(open(table))
    node_keys = [k for k in data if "nodes" in json.loads(k)]
    assert len(node_keys) == 1 and len(data[node_keys[0]]) == len(list(job.ctx.graph))

    def no_clock(*a, **k):
        raise AssertionError("the per-node times should come from the table")

    monkeypatch.setattr(nodetime, "node_times", no_clock)
    again = Job.open(DEFAULT).plan(Ratios.from_dict({"target_latency": 0.6, "scope": "damage", "importance": "l2"}),
                                   calib, latency_table=table)
    assert again.target["met"]


def test_the_damage_search_in_milliseconds_prefers_the_cheap_damage_per_ms(tmp_path, monkeypatch):
    """Two groups, the same damage per MAC; one sits under a slow node: the millisecond budget goes there."""
    job = Job.open(chain())
    g16 = next(g for g in job.groups if g.width == 16)
    g8 = next(g for g in job.groups if g.width == 8)
    est = job.estimator
    # conv c (node 3) is slow: 10 ms, linear in its work; the rest 0.1 ms each, fixed
    model = L.NodeModel(est, full=[0.1, 0.1, 0.1, 10.0], ref=[0.1, 0.1, 0.1, 5.0], ref_work=np.array([0.5, 0.5, 0.25, 0.5]))
    from onnxprune.plan import damage

    order = {g.id: np.arange(g.width) for g in (g16, g8)}

    def measure(keep):  # damage: the channels removed, whatever the group
        return float(sum(g.width - len(keep.get(g.id, np.arange(g.width))) for g in (g16, g8)))

    keep, info = damage.allocate([g16, g8], order, measure, model.estimate, "ms", 0.8 * model.before_ms)
    assert g8.id in keep and g16.id not in keep and info["met"]


def test_bench_table_with_a_model_shows_each_sets_predicted_curve(tmp_path, monkeypatch, capsys):
    from onnxprune.cli import main

    monkeypatch.setattr(nodetime, "node_times", elements_clock)
    table = str(tmp_path / "t.json")
    rc = main(["bench", "--table", table, DEFAULT, "--batch", "2", "--plot", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "c.png").stat().st_size > 0
    job = Job.open(DEFAULT)
    live = [n for n, gs in job.sets.items() if any(not g.frozen and g.width > 1 for g in gs)]
    rows = [ln for ln in out.splitlines() if ln.split() and ln.split()[0] in live]
    assert len(rows) == len(live) > 3
    # each row's predicted times shrink with the width, and the rows come cheapest-at-25% first
    at = [[float(x.rstrip("%")) for x in ln.split()[4:7]] for ln in rows]
    assert all(a[0] >= a[1] >= a[2] for a in at) and [a[2] for a in at] == sorted(a[2] for a in at)
    assert f"{len(live)} sets, per-node times in {table}" in out

    def no_clock(*a, **k):
        raise AssertionError("the per-node times should come from the table")

    monkeypatch.setattr(nodetime, "node_times", no_clock)
    assert main(["bench", "--table", table, DEFAULT, "--batch", "2", "-q"]) == 0
    assert main(["bench", "--table", table]) == 0
    n = len(list(job.ctx.graph))
    assert f"per-node times ({n} of {n} nodes timed alone)" in capsys.readouterr().out


def test_head_dims_fused_attention_will_not_take_are_named():
    class G:
        def __init__(self, id, kind):
            self.id, self.kind = id, kind

    groups = [G(0, "head_dim"), G(1, "head_dim"), G(2, "channels"), G(3, "head_dim"), G(4, "head_dim")]
    keep = {0: np.arange(24), 1: np.arange(30), 2: np.arange(30), 3: np.arange(264)}
    assert L.slow_head_dims(groups, keep) == [30, 264]  # 24 is fine, channels are not head dims, group 4 is whole


@pytest.mark.parametrize("kinds,noted", [({"head_dim": 0.5}, True), ({"mlp": 0.5}, False)])
def test_a_plan_with_odd_head_dims_says_so(kinds, noted):
    from test_mut_plan import _att_mlp

    from onnxprune import api

    a, _ = _att_mlp()
    res = api.prune(a, {"kinds": kinds, "default": 0.0})
    said = [n for n in res.notes if "head dims" in n]
    assert bool(said) == noted and (not said or "head dims 1 are not multiples of 8" in said[0])

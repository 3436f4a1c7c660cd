"""Budgets and benchmarks: the plan-level params/MACs estimate equals a count
of the rewritten model, target_macs/target_params land on the budget, and
`onnxprune bench` interleaves runs and reports per-image speed-ups."""
from __future__ import annotations

import json

import onnx
import pytest

from onnxprune import api
from onnxprune.runtime import bench as bench_mod
from onnxprune.core import metrics
from onnxprune.plan.budget import Estimator, parse_target
from onnxprune.cli import main
from onnxprune.cli.common import default_model
from onnxprune.errors import UserError
from onnxprune.plan import Ratios, make_plan

RATIOS = [
    {"default": 0.5},
    {"default": 0.3, "kinds": {"embed": 0.25}, "round_to": 8},
    {"default": 0.6, "scope": "global", "importance": "random"},
]


@pytest.mark.parametrize("ratios", RATIOS, ids=["half", "round8", "global-random"])
def test_estimate_equals_count_of_rewritten_model(ratios):
    a = api.analyze(default_model())
    est = Estimator(a.ctx)
    assert est.before == metrics.count(onnx.load(default_model()))
    plan = make_plan(a.ctx, a.groups, Ratios.from_dict(ratios))
    predicted = est.estimate(plan.keep)
    res = api.prune(default_model(), ratios)
    assert predicted == res.after
    assert predicted["macs"] < est.before["macs"]


@pytest.mark.parametrize("target", [0.5, "40%", 0.7])
def test_target_macs_fraction(target):
    res = api.prune(default_model(), {"target_macs": target})
    frac = target if isinstance(target, float) else 0.4
    assert abs(res.after["macs"] / (frac * res.before["macs"]) - 1) < 0.01
    assert res.plan.target["achieved"] == res.after["macs"]


def test_target_params_absolute_keeps_given_proportions():
    before = metrics.count(onnx.load(default_model()))["params"]
    want = int(0.45 * before)
    res = api.prune(default_model(), {"target_params": want, "kinds": {"channels": 0.6, "embed": 0.3}})
    assert abs(res.after["params"] / want - 1) < 0.01
    used = res.plan.target["ratios_used"]["kinds"]
    assert used["channels"] == pytest.approx(2 * used["embed"])


def test_unreachable_target_takes_the_closest():
    res = api.prune(default_model(), {"target_macs": 0.001, "kinds": {"channels": 0.5}})
    t = res.plan.target
    assert t["error"] > 0.01  # cannot get there by pruning only 'channels'
    # the closest reachable: every scaled ratio at its cap
    assert t["ratios_used"]["kinds"]["channels"] == pytest.approx(0.99)


@pytest.mark.parametrize("x,want", [(0.5, 500.0), ("50%", 500.0), ("2K", 2000.0), ("0.3M", 3e5), (700, 700.0)])
def test_parse_target(x, want):
    assert parse_target(x, 1000, "macs").value == pytest.approx(want)


@pytest.mark.parametrize("x", ["abc", -1, 0, True, "0%"])
def test_parse_target_rejects(x):
    with pytest.raises(UserError):
        parse_target(x, 1000, "macs")


def test_both_targets_rejected():
    with pytest.raises(UserError, match="not both"):
        Ratios.from_dict({"target_macs": 0.5, "target_params": 0.5})


class _FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class _FakeSession:
    """Each run advances a fake clock by a fixed cost and logs who ran."""

    def __init__(self, name, cost, clock, log):
        self.name, self.cost, self.clock, self.log = name, cost, clock, log

    def run(self, *_):
        self.clock.t += self.cost
        self.log.append(self.name)

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_bench_interleaves_and_reports_per_image_speedup(monkeypatch, tmp_path):
    clock, log = _FakeClock(), []
    costs = {"a.onnx": 0.04, "b.onnx": 0.01, "c.onnx": 0.02}
    monkeypatch.setattr(bench_mod.time, "perf_counter", clock)
    monkeypatch.setattr(bench_mod, "session", lambda path, *a: _FakeSession(path.split("/")[-1], costs[path.split("/")[-1]], clock, log))
    paths = []
    for name in costs:
        p = tmp_path / name
        onnx.save(onnx.load(default_model()), str(p))
        paths.append(str(p))
    rows = bench_mod.bench(paths, batch=4, warmup=2, runs=6, progress=False)
    timed = log[3 * 2:]
    # every round runs each model once, in an order rotated each round
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == sorted(costs) for r in rounds)
    assert len({tuple(r) for r in rounds}) == 3
    assert [r.median_ms for r in rows] == pytest.approx([40.0, 10.0, 20.0])
    assert [r.speedup for r in rows] == pytest.approx([1.0, 4.0, 2.0])
    assert rows[1].throughput == pytest.approx(4 / 0.01)
    assert all(r.batch == 4 and r.runs == 6 and len(r.times_ms) == 6 for r in rows)


def test_bench_cli_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    src = default_model()
    small = tmp_path / "small.onnx"
    onnx.save(api.prune(src, {"default": 0.5}).proto, str(small))
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", src, str(small), "--batch", "2", "--warmup", "1", "--runs", "3", "--json", str(js), "--plot", str(png), "-q"])
    assert rc == 0
    rows = json.loads(js.read_text())
    assert [r["name"] for r in rows] == ["default_resnet.onnx", "small.onnx"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["macs"] < rows[0]["macs"]
    assert all(len(r["times_ms"]) == 3 and r["batch"] == 2 and r["p90_ms"] >= r["median_ms"] > 0 for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_with_bench_adds_latency_to_report(tmp_path):
    rep = tmp_path / "r.json"
    rc = main([default_model(), "--ratios", '{"target_macs": "50%"}', "-o", str(tmp_path / "p.onnx"), "--report", str(rep),
               "--bench", "--runs", "3", "--warmup", "1", "--batch", "2", "-q"])
    assert rc == 0
    r = json.loads(rep.read_text())
    assert [x["name"] for x in r["latency"]] == ["default_resnet.onnx", "pruned"]
    assert r["latency"][1]["macs"] == r["after"]["macs"]
    assert abs(r["target"]["achieved"] / (0.5 * r["before"]["macs"]) - 1) < 0.01


def test_bench_errors(tmp_path):
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 1
    with pytest.raises(UserError, match="not available"):
        bench_mod.bench([default_model()], provider="tensorrt", runs=1, warmup=0)

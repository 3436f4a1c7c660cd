"""target_latency: parsing, the search over measured candidates (with a fake
clock standing in for ONNX Runtime, so nothing here depends on this machine's
speed), the latency table reused by a later run, and the CLI's report of the
measured speed-up and efficiency."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from onnxprune.cli import main
from onnxprune.errors import UserError
from onnxprune.plan import Ratios
from onnxprune.plan import latency as L
from onnxprune.report import target_text

DEFAULT = str(Path(__file__).resolve().parents[1] / "onnxprune" / "data" / "default_resnet.onnx")


@pytest.mark.parametrize("given,want", [("60%", ("ratio", 0.6)), (0.6, ("ratio", 0.6)), (1, ("ratio", 1.0)),
                                        ("12ms", ("ms", 12.0)), ("12.5 ms", ("ms", 12.5)), (" 75 % ", ("ratio", 0.75))])
def test_latency_targets_parse(given, want):
    assert L.parse_latency(given) == pytest.approx(want) if isinstance(want[1], float) else L.parse_latency(given) == want


@pytest.mark.parametrize("bad", ["0%", "150%", "0ms", "fast", 0, 1.5, -0.2, True, None, [0.5]])
def test_bad_latency_targets_are_one_user_error(bad):
    with pytest.raises(UserError, match="target_latency"):
        L.parse_latency(bad)


def test_ratios_take_one_budget_only():
    assert Ratios.from_dict({"target_latency": "60%"}).target_latency == "60%"
    with pytest.raises(UserError, match="not both"):
        Ratios.from_dict({"target_latency": "60%", "target_macs": 0.5})
    with pytest.raises(UserError, match="target_latency"):
        Ratios.from_dict({"target_latency": "soon"})


def test_interpolation_between_measured_points():
    # measured: 40% MACs -> 50% time, 80% MACs -> 90% time; (1, 1) is the anchor
    pts = [(0.4, 0.5), (0.8, 0.9)]
    assert L.next_fraction(pts, 0.7, 0.02) == pytest.approx(0.6)  # halfway between the two points
    assert L.next_fraction(pts, 0.95, 0.02) == pytest.approx(0.9)  # between (0.8, 0.9) and (1, 1)
    assert L.next_fraction(pts, 0.45, 0.02) == pytest.approx(0.35)  # below every point: the line through the lowest two
    assert L.next_fraction(pts, 0.25, 0.02) == pytest.approx(0.2)  # ... but at most halfway down from the lowest
    # near the latency floor two readings are almost level: the line would point at 2%, the step goes halfway
    assert L.next_fraction([(0.33, 0.594), (0.51, 0.623)], 0.485, 0.02) == pytest.approx(0.165)
    assert L.next_fraction([(0.5, 0.6)], 0.4, 0.02) == pytest.approx(0.5 - 0.2 / 0.8)  # one point and the (1, 1) anchor
    # a noisy non-monotone point (60% MACs slower than 80%) is flattened, not trusted
    assert L.next_fraction([(0.4, 0.5), (0.6, 0.95), (0.8, 0.9)], 0.7, 0.02) == pytest.approx(0.4 + 0.2 * 0.2 / 0.45)


class FakeRuntime:
    """Latency ratio as a function of the MACs fraction; the original takes 10 ms."""

    def __init__(self, curve):
        self.curve, self.calls = curve, []

    def plan_at(self, f):
        achieved = round(f, 3)  # the planner reaches a nearby fraction
        return {"f": achieved}, achieved

    def measure(self, plan):
        self.calls.append(plan["f"])
        r = self.curve(plan["f"])
        return 10.0, 10.0 * r, r


def test_search_meets_the_target_within_tolerance():
    fake = FakeRuntime(lambda f: 0.3 + 0.7 * f)  # a fixed cost of 30% of the time
    plan, info = L.solve(fake.plan_at, fake.measure, "60%", L.Runtime())
    assert info["met"] and 0.6 - L.TOLERANCE <= info["achieved_ratio"] <= 0.6
    assert plan["f"] == pytest.approx(0.3 / 0.7, abs=0.05)  # not 0.6: MACs overstate the speed-up
    assert len(info["evaluations"]) <= 4


def test_an_absolute_target_in_ms():
    fake = FakeRuntime(lambda f: 0.2 + 0.8 * f)
    plan, info = L.solve(fake.plan_at, fake.measure, "7ms", L.Runtime())
    assert info["target_ratio"] == pytest.approx(0.7)
    assert info["met"] and info["pruned_ms"] <= 7.0 and info["pruned_ms"] >= 7.0 - 10 * L.TOLERANCE


def test_the_candidate_kept_is_measured_to_meet_the_target_even_when_latency_is_not_monotone():
    # widths that kernels handle badly: 45-55% of MACs is slower than the original
    fake = FakeRuntime(lambda f: 1.1 if 0.45 <= f <= 0.55 else 0.1 + 0.9 * f)
    plan, info = L.solve(fake.plan_at, fake.measure, "60%", L.Runtime())
    assert info["met"] and info["achieved_ratio"] <= 0.6
    assert fake.curve(plan["f"]) <= 0.6  # the plan returned is one that was measured under the target


def test_a_measurement_near_the_target_is_confirmed_before_it_ends_the_search():
    """Noise of +-4% alternating: a first reading just under the target is
    checked by a second; the plan kept meets the target on the true curve."""
    curve = lambda f: 0.3 + 0.7 * f  # noqa: E731
    noise = iter([-0.04, 0.04] * 20)
    fake = FakeRuntime(curve)
    fake.measure = lambda plan: (fake.calls.append(plan["f"]), (10.0, 10.0 * (curve(plan["f"]) + next(noise)),
                                                                 curve(plan["f"]) + next(noise)))[1]
    plan, info = L.solve(fake.plan_at, fake.measure, "60%", L.Runtime())
    repeats = [e for e in info["evaluations"] if e.get("repeat")]
    assert repeats and info["candidates"] == len(info["evaluations"]) - len(repeats)
    assert curve(plan["f"]) <= 0.6 + 1e-9


def test_an_unreachable_target_keeps_the_fastest_candidate_and_says_so():
    fake = FakeRuntime(lambda f: max(0.8, f))  # never below 80% of the time
    plan, info = L.solve(fake.plan_at, fake.measure, "50%", L.Runtime())
    assert not info["met"]
    assert info["achieved_ratio"] == pytest.approx(min(e["latency_ratio"] for e in info["evaluations"]))
    assert "NOT met" in target_text(info)


def test_an_original_already_faster_than_the_target_is_one_user_error():
    fake = FakeRuntime(lambda f: f)
    with pytest.raises(UserError, match="already takes 10.00 ms"):
        L.solve(fake.plan_at, fake.measure, "20ms", L.Runtime())


def test_a_later_run_starts_from_the_table(tmp_path):
    table = str(tmp_path / "lat.json")
    curve = lambda f: 0.25 + 0.75 * f  # noqa: E731
    first = FakeRuntime(curve)
    L.solve(first.plan_at, first.measure, "60%", L.Runtime(), table, "m1", {"default": 0})
    again = FakeRuntime(curve)
    _, info = L.solve(again.plan_at, again.measure, "60%", L.Runtime(), table, "m1", {"default": 0})
    assert info["met"] and len(again.calls) < len(first.calls) and len(again.calls) <= 2  # one candidate, confirmed
    other = FakeRuntime(curve)  # another model: its own entry
    L.solve(other.plan_at, other.measure, "60%", L.Runtime(), table, "m2", {"default": 0})
    assert len(other.calls) == len(first.calls)
    assert len(json.load(open(table))) == 2


def test_a_table_that_is_not_ours_is_one_user_error(tmp_path):
    bad = tmp_path / "lat.json"
    bad.write_text("[1, 2, 3]")
    fake = FakeRuntime(lambda f: f)
    with pytest.raises(UserError, match="not a latency table"):
        L.solve(fake.plan_at, fake.measure, "60%", L.Runtime(), str(bad), "m", {})


def test_cli_reports_the_search_and_the_measured_speedup(tmp_path, capsys):
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    rc = main([DEFAULT, "--ratios", '{"target_latency": "70%"}', "-o", str(out), "--report", str(rep),
               "--runs", "5", "--warmup", "1", "--latency-table", str(tmp_path / "t.json")])
    text = capsys.readouterr()
    assert rc == 0, text.err
    r = json.loads(rep.read_text())
    t = r["target"]
    assert t["metric"] == "latency" and t["target_ratio"] == pytest.approx(0.7) and t["evaluations"]
    assert t["macs_fraction"] == pytest.approx(r["after"]["macs"] / r["before"]["macs"], rel=1e-6)
    assert [row["name"] for row in r["latency"]] == ["default_resnet.onnx", "pruned"]  # benchmarked at the end
    speed = r["latency"][0]["median_ms"] / r["latency"][1]["median_ms"]  # same batch: per-image ratio of medians
    assert r["speedup"] == pytest.approx(speed, rel=1e-3)
    assert r["efficiency"] == pytest.approx(speed * r["after"]["macs"] / r["before"]["macs"], rel=1e-3)
    verdict = text.out.strip().splitlines()[-1]
    m = re.search(r"speed-up ([0-9.]+)x \(efficiency ([0-9.]+)\)", verdict)
    assert m and float(m.group(1)) == pytest.approx(r["speedup"], abs=0.006)
    assert float(m.group(2)) == pytest.approx(r["efficiency"], abs=0.006)
    assert "target_latency 70%" in text.out and json.load(open(tmp_path / "t.json"))


def test_bench_shows_a_latency_table(tmp_path, capsys):
    table = str(tmp_path / "lat.json")
    fake = FakeRuntime(lambda f: 0.3 + 0.7 * f)
    _, info = L.solve(fake.plan_at, fake.measure, "60%", L.Runtime(provider="cpu", batch=4, threads=1), table, "abc",
                      {"round_to": 8})
    rc = main(["bench", "--table", table])
    out = capsys.readouterr().out
    assert rc == 0
    assert "model abc, cpu batch 4, 1 threads" in out and '"round_to": 8' in out
    for e in info["evaluations"]:  # every measured candidate is a row: MACs %, latency %, their ratio
        a, r = e["macs_fraction"], e["latency_ratio"]
        assert re.search(rf"{100 * a:.1f}%\s+{100 * r:.1f}%\s+{a / r:.2f}\n", out + "\n"), (a, r, out)
    assert out.strip().splitlines()[-1].startswith("PASSED | Runtime") and f"{info['candidates']} measured points" in out


@pytest.mark.parametrize("argv,words", [(["bench"], "bench needs at least one model (or --table FILE)"),
                                        (["bench", DEFAULT, DEFAULT, "--table", "t.json"], "give one model"),
                                        (["bench", "nothere.onnx", "--table", "t.json"], "no such model file"),
                                        (["bench", "--table", "missing.json"], "no such latency table")])
def test_bench_table_misuse_is_one_line(tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.json").write_text("{}")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


@pytest.mark.parametrize("round_to,speedup,warned", [(1, 1.0, True), (8, 1.0, False), (1, 1.9, False)])
def test_a_slow_speedup_with_odd_widths_suggests_round_to(tmp_path, capsys, monkeypatch, round_to, speedup, warned):
    from onnxprune.runtime import bench as B

    def fake_bench(models, **kw):  # the original, then the pruned file: a fixed clock, not this machine's
        return [B.BenchRow("original", 8, 10.0, 10.0, 10.0, 10.0, 800.0, 1, 1, None, 1.0),
                B.BenchRow("pruned", 8, 10.0 / speedup, 0, 0, 0, 800.0 * speedup, 1, 1, None, speedup)]

    monkeypatch.setattr(B, "bench", fake_bench)
    rc = main([DEFAULT, "--ratios", json.dumps({"target_macs": 0.5, "round_to": round_to}), "-o", str(tmp_path / "p.onnx"),
               "--bench"])
    assert rc == 0
    text = capsys.readouterr().err
    assert ("try \"round_to\": 8" in text) == warned, text


@pytest.mark.parametrize("final_speedup,warned", [(1 / 0.85, True), (1 / 0.74, False)])
def test_a_written_model_slower_than_its_target_is_reported(tmp_path, capsys, monkeypatch, final_speedup, warned):
    """The search met 70%; the bench of the written file decides what is said."""
    from onnxprune.runtime import bench as B

    def fake_bench(models, **kw):
        s = final_speedup if len(models) == 2 and isinstance(models[1], tuple) and models[1][0] == "pruned" else 1 / 0.69
        return [B.BenchRow("original", 8, 10.0, 10.0, 10.0, 10.0, 800.0, 1, 1, None, 1.0, times_ms=[10.0] * 3),
                B.BenchRow("x", 8, 10.0 / s, 0, 0, 0, 800.0 * s, 1, 1, None, s, times_ms=[10.0 / s] * 3)]

    monkeypatch.setattr(B, "bench", fake_bench)
    rc = main([DEFAULT, "--ratios", '{"target_latency": "70%"}', "-o", str(tmp_path / "p.onnx")])
    assert rc == 0
    err = capsys.readouterr().err
    assert ("more than 10% over the target 70.0%" in err) == warned, err

"""Budgets and benchmarks: the plan-level params/MACs estimate equals a count
of the rewritten model made here by hand (not by the package's own counter),
target_macs/target_params land on the budget in that count, and
`onnxprune bench` interleaves runs and reports per-image speed-ups."""
from __future__ import annotations

import json

import numpy as np
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


def _hand_count(proto: onnx.ModelProto) -> dict[str, int]:
    """Params and MACs of a model at batch 1, counted here without the package's
    metrics: params are the elements of every floating-point initializer (more
    than one element) per node input that reads it; MACs are, per Conv, output
    elements x (C_in / groups) x kernel, per ConvTranspose, input elements x
    (C_out / groups) x kernel, and per Gemm / MatMul, output elements x the
    contracted width, with shapes from onnx.shape_inference."""
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    for vi in p.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    p = onnx.shape_inference.infer_shapes(p, strict_mode=True)
    shape = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
             for vi in list(p.graph.input) + list(p.graph.value_info) + list(p.graph.output)}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    inits = {t.name: list(t.dims) for t in p.graph.initializer if t.data_type in floats}
    shape.update(inits)
    params = macs = 0
    for n in p.graph.node:
        params += sum(int(np.prod(inits[i])) for i in n.input if i in inits and np.prod(inits[i]) > 1)
        out = shape[n.output[0]] if n.output else None
        if n.op_type == "Conv":
            w = shape[n.input[1]]
            macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":  # every input element x (C_out / groups) x kernel
            w = shape[n.input[1]]
            macs += int(np.prod(shape[n.input[0]])) * int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            a = shape[n.input[0]]
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            macs += int(np.prod(out)) * a[0 if trans_a else 1]
        elif n.op_type == "MatMul":
            macs += int(np.prod(out)) * shape[n.input[0]][-1]
    return {"params": params, "macs": macs}


def test_hand_count_of_the_original():
    # the demo ResNet at batch 1, from its file: the counter itself is right
    assert _hand_count(onnx.load(default_model())) == {"params": 933412, "macs": 83675136}


@pytest.mark.parametrize("ratios", RATIOS, ids=["half", "round8", "global-random"])
def test_estimate_equals_count_of_rewritten_model(ratios):
    a = api.analyze(default_model())
    est = Estimator(a.ctx)
    assert est.before == _hand_count(onnx.load(default_model()))
    plan = make_plan(a.ctx, a.groups, Ratios.from_dict(ratios))
    predicted = est.estimate(plan.keep)
    res = api.prune(default_model(), ratios)
    assert {g: k.tolist() for g, k in res.plan.keep.items()} == {g: k.tolist() for g, k in plan.keep.items()}
    counted = _hand_count(res.proto)  # the rewritten model, counted independently
    assert predicted == counted
    assert res.after == counted == metrics.count(res.proto) and res.before == est.before
    assert counted["macs"] < est.before["macs"]


def _attention() -> onnx.ModelProto:
    """Separate q/k/v projections, 3 heads x 4 head dims: widths that are products."""
    rng = np.random.default_rng(3)
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1,5,8] x) => (float[1,5,8] y) {
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
  s1 = Mul(s0, scale)
  p = Softmax <axis=-1> (s1)
  o0 = MatMul(p, v2)
  o1 = Transpose <perm=[0,2,1,3]> (o0)
  o2 = Reshape(o1, s3)
  h = MatMul(o2, wo)
  r = Relu(h)
  y = MatMul(r, w2)
}""")
    inits = {"wq": rng.standard_normal((8, 12)), "wk": rng.standard_normal((8, 12)), "wv": rng.standard_normal((8, 12)),
             "wo": rng.standard_normal((12, 10)), "w2": rng.standard_normal((10, 8))}
    for k, v in inits.items():
        m.graph.initializer.append(onnx.numpy_helper.from_array(v.astype(np.float32), k))
    for k, v in {"s4": [1, 5, 3, 4], "s3": [1, 5, 12]}.items():
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(v, np.int64), k))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "scale"))
    return m


@pytest.mark.parametrize("ratios", [{"kinds": {"heads": 0.34}}, {"kinds": {"heads": 0.34, "head_dim": 0.5, "mlp": 0.5}},
                                    {"kinds": {"head_dim": 0.25}, "default": 0.3}], ids=["heads", "all", "head_dim"])
def test_estimate_equals_count_of_rewritten_attention(ratios):
    m = _attention()
    # by hand: q/k/v 3 x 5x8x12, QK^T and AV 2 x 3x5x5x4, projection 5x12x10, last 5x10x8
    assert _hand_count(m) == {"params": 3 * 96 + 120 + 80, "macs": 3 * 480 + 2 * 300 + 600 + 400}
    a = api.analyze(m)
    est = Estimator(a.ctx)
    assert est.before == _hand_count(m)
    res = api.prune(m, ratios)
    counted = _hand_count(res.proto)
    assert est.estimate(res.plan.keep) == counted == res.after == metrics.count(res.proto)
    assert counted["macs"] < est.before["macs"]


def _gemm_deconv() -> onnx.ModelProto:
    """A transposed Gemm input (transA=1, transB=0), a ConvTranspose and a scalar and a
    two-element constant (a scalar is a constant, not a weight)."""
    rng = np.random.default_rng(4)
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[6, 2] x) => (float[1, 3, 4, 8] y) {
  [fc] h = Gemm <transA=1> (x, w1, b1)
  r = Relu(h)
  s = Mul(r, scale)
  t = Reshape(s, shape)
  [up] u = ConvTranspose <strides=[2,2], pads=[1,1,1,1], output_padding=[1,1]> (t, wt, bt)
  v = Relu(u)
  [c] y = Conv <pads=[1,1,1,1]> (v, wc, bc)
}""")
    inits = {"w1": rng.standard_normal((6, 40)), "b1": rng.standard_normal(40), "scale": np.array(0.5),
             "wt": rng.standard_normal((10, 8, 3, 3)), "bt": rng.standard_normal(8),
             "wc": rng.standard_normal((3, 8, 3, 3)), "bc": rng.standard_normal(3)}
    for k, v in inits.items():
        m.graph.initializer.append(onnx.numpy_helper.from_array(v.astype(np.float32), k))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, 10, 2, 4], np.int64), "shape"))
    return m


def test_counts_of_transposed_gemm_and_conv_transpose():
    m = _gemm_deconv()
    # by hand: Gemm 2x40 outputs x 6; ConvTranspose 10x2x4 inputs x 8x3x3; Conv 3x4x8 outputs x 8x3x3
    want = {"params": 240 + 40 + 720 + 8 + 216 + 3, "macs": 80 * 6 + 80 * 72 + 96 * 72}
    assert _hand_count(m) == want and metrics.count(m) == want
    a = api.analyze(m)
    assert Estimator(a.ctx).before == want
    res = api.prune(m, {"default": 0.5})
    counted = _hand_count(res.proto)
    assert res.plan.keep and counted["macs"] < want["macs"]
    assert res.after == counted == metrics.count(res.proto)


@pytest.mark.parametrize("target", [0.5, "40%", 0.7])
def test_target_macs_fraction(target):
    res = api.prune(default_model(), {"target_macs": target})
    frac = target if isinstance(target, float) else 0.4
    counted = _hand_count(res.proto)
    want = frac * _hand_count(onnx.load(default_model()))["macs"]
    assert abs(counted["macs"] / want - 1) < 0.01
    assert res.after == counted and res.plan.target["achieved"] == counted["macs"]


def test_target_params_absolute_keeps_given_proportions():
    before = _hand_count(onnx.load(default_model()))["params"]
    want = int(0.45 * before)
    res = api.prune(default_model(), {"target_params": want, "kinds": {"channels": 0.6, "embed": 0.3}})
    counted = _hand_count(res.proto)
    assert abs(counted["params"] / want - 1) < 0.01 and res.after == counted
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


def test_bench_errors(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxprune: error: ") and "missing.onnx" in err and "this is a bug" not in err, err
    with pytest.raises(UserError, match="not available"):
        bench_mod.bench([default_model()], provider="tensorrt", runs=1, warmup=0)

"""The zero-contribution oracle on every group kind of real CNN exports.

Random (not planted) weights; ``verify.oracle`` zeroes the channels the plan
removes, prunes, and compares in ORT. Every exact set (embed included for
ResNet and MobileNet-v2) must agree to 1e-4; ConvNeXt's stream sits under
LayerNorm and must be reported approximate, not tested.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # full-size timm exports: run by the full suite (.ci/run)

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from onnxprune import io  # noqa: E402
from onnxprune.torchbridge.export import export_timm  # noqa: E402
from onnxprune.plan import Ratios  # noqa: E402
from onnxprune.api import verify  # noqa: E402
from timm_models import randomize  # noqa: E402

MODELS = ["resnet26", "mobilenetv2_100", "convnext_tiny"]
EXPORTS = [("legacy", 17, True), ("dynamo", 20, False), ("dynamo", 20, True), ("legacy", 20, False)]
CASES = [(m, *e) for m in MODELS for e in EXPORTS]


@pytest.mark.parametrize("name,exporter,opset,dynamic", CASES, ids=[f"{c[0]}-{c[1]}-op{c[2]}-{'dyn' if c[3] else 'static'}" for c in CASES])
def test_oracle_every_set(tmp_path, name, exporter, opset, dynamic):
    model = randomize(timm.create_model(name, pretrained=False), seed=3)
    path = str(tmp_path / "m.onnx")
    export_timm(name, path, exporter=exporter, opset=opset, dynamic_batch=dynamic, model=model)
    rows = verify(io.read_proto(path), Ratios.from_dict({"default": 0.4, "kinds": {"embed": 0.3}, "round_to": 2}), batch=3)
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r.kind, []).append(r)
        assert r.status != "FAIL", r
    tested = [r for r in rows if r.status == "PASS"]
    assert tested and all(r.max_rel_err <= 1e-4 for r in tested)
    assert any(r.kind in ("channels", "mlp") and r.status == "PASS" for r in rows)
    if name == "convnext_tiny":
        assert by_kind["embed"] and all(r.status.startswith("approximate") for r in by_kind["embed"])
    else:
        assert by_kind["embed"] and all(r.status == "PASS" for r in by_kind["embed"])


OTHER = ["mobilenetv3_small_050", "efficientnet_b0", "regnetx_002", "resnext26ts"]  # SE blocks, SiLU/HardSwish, grouped convs
OTHER_CASES = [(m, *e) for m in OTHER for e in [("legacy", 17, True), ("dynamo", 20, False)]]


@pytest.mark.parametrize("name,exporter,opset,dynamic", OTHER_CASES, ids=[f"{c[0]}-{c[1]}" for c in OTHER_CASES])
def test_oracle_other_families(tmp_path, name, exporter, opset, dynamic):
    model = randomize(timm.create_model(name, pretrained=False), seed=5)
    path = str(tmp_path / "m.onnx")
    export_timm(name, path, exporter=exporter, opset=opset, dynamic_batch=dynamic, model=model)
    rows = verify(io.read_proto(path), Ratios.from_dict({"default": 0.5, "kinds": {"embed": 0.3}}), per_set=False, batch=2)
    assert rows and rows[-1].scope == "all exact groups"
    assert rows[-1].removed > 0 and rows[-1].status == "PASS", rows[-1]
    if name.startswith(("regnet", "resnext")):
        from onnxprune.api import analyze

        a = analyze(path)
        grouped = [m for g in a.groups for m in g.tensors if m.node.op_type == "Conv" and m.node.attributes["group"].value > 1 and m.role == "out"]
        assert grouped and not any(g.frozen for g in a.groups if any(m in grouped for m in g.tensors))

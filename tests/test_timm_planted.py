"""Acceptance: dead channels planted in timm CNNs are exactly what onnxprune removes.

For resnet50, mobilenetv2_100 and convnext_tiny with distinct random weights,
half of the channels of every non-embed group are zeroed in torch before
export; pruning with ``{"default": 0.5, "kinds": {"embed": 0}}`` must remove
exactly them (ORT outputs equal within 1e-4), and MACs must agree with onnx-tool.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.slow  # full-size timm exports: run by the full suite (.ci/run)

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from onnxprune import runtime  # noqa: E402
from onnxprune.cli import main  # noqa: E402
from onnxprune.torchbridge.export import export_timm  # noqa: E402
from timm_models import PLANT, independent_macs, randomize  # noqa: E402

# (exporter, opset, dynamic batch)
EXPORTS = [("legacy", 17, False), ("legacy", 20, True), ("dynamo", 20, False), ("dynamo", 18, True)]
CASES = [(m, *e) for m in PLANT for e in EXPORTS]


@pytest.fixture(scope="module")
def planted_models():
    cache = {}

    def get(name):
        if name not in cache:
            model = randomize(timm.create_model(name, pretrained=False), seed=hash(name) % 1000)
            n = PLANT[name](model, np.random.default_rng(0))
            cache[name] = (model, n)
        return cache[name]

    return get


@pytest.mark.parametrize("name,exporter,opset,dynamic", CASES, ids=[f"{c[0]}-{c[1]}-op{c[2]}-{'dyn' if c[3] else 'static'}" for c in CASES])
def test_planted_channels_are_removed_exactly(tmp_path, planted_models, name, exporter, opset, dynamic):
    model, planted = planted_models(name)
    src = str(tmp_path / "in.onnx")
    export_timm(name, src, exporter=exporter, opset=opset, dynamic_batch=dynamic, model=model)
    out, rep = str(tmp_path / "out.onnx"), str(tmp_path / "rep.json")
    rc = main([src, "--ratios", '{"default": 0.5, "kinds": {"embed": 0}}', "-o", out, "--report", rep, "-q"])
    assert rc == 0
    report = json.load(open(rep))

    # every planted channel, and nothing else, is removed
    removed = sum(g["width"] - g["width_after"] for g in report["groups"])
    assert removed == planted
    for g in report["groups"]:
        if g["kind"] != "embed" and not g["frozen"]:
            assert g["width_after"] == g["width"] // 2, g

    # same function: the removed channels were the dead ones
    batch = 3 if dynamic else 1
    a, b = onnx.load(src), onnx.load(out)
    feeds = runtime.random_inputs(a, batch=batch, seed=7)
    ya = runtime.session(a).run(None, feeds)[0]
    yb = runtime.session(b).run(None, feeds)[0]
    assert ya.shape == yb.shape == (batch, 1000)
    err = np.abs(ya - yb).max() / np.abs(ya).max()
    assert err < 1e-4, err

    # names, opset and dynamic axes are kept
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    assert {o.domain: o.version for o in a.opset_import} == {o.domain: o.version for o in b.opset_import}
    dims = lambda m: [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input]
    assert dims(a) == dims(b)

    # MACs agree with an independent implementation, before and after
    assert report["before"]["macs"] == independent_macs(src)
    assert report["after"]["macs"] == independent_macs(out)
    assert report["after"]["macs"] < report["before"]["macs"]

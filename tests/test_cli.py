"""CLI behaviour: the no-argument demo, reports, and one-line errors with exit 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.cli.common import default_model


def run(args, cwd):
    p = subprocess.run([sys.executable, "-m", "onnxprune", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_no_arguments_prunes_the_builtin_model(tmp_path):
    rc, out, err = run([], tmp_path)
    assert rc == 0, err
    assert out.strip().splitlines()[-1].startswith("PASSED | Runtime:")
    pruned = tmp_path / "default_resnet.pruned.onnx"
    assert pruned.exists()
    a, b = onnx.load(default_model()), onnx.load(str(pruned))
    size = lambda m: sum(int(onnx.numpy_helper.to_array(i).size) for i in m.graph.initializer)
    assert size(b) < 0.6 * size(a)


def test_report_and_verify(tmp_path):
    rep = tmp_path / "r.json"
    rc = main([default_model(), "--ratios", '{"default": 0.5}', "-o", str(tmp_path / "p.onnx"), "--report", str(rep), "--verify", "-q"])
    assert rc == 0
    r = json.loads(rep.read_text())
    assert r["after"]["macs"] < r["before"]["macs"]
    assert r["checks"]["checker"] == "ok" and r["checks"]["ort_batches"] == [1, 2]
    pruned = [g for g in r["groups"] if g["kept"] is not None]
    assert pruned and all(len(g["kept"]) == g["width_after"] < g["width"] for g in pruned)
    assert r["oracle"] and all(row["status"] == "PASS" for row in r["oracle"])
    frozen = [g for g in r["groups"] if g["frozen"]]
    assert frozen and all("graph output" in g["frozen"][0] for g in frozen)


def test_analyze_json(tmp_path):
    js = tmp_path / "g.json"
    assert main(["analyze", default_model(), "--json", str(js), "-q"]) == 0
    groups = json.loads(js.read_text())
    sets = {g["set"] for g in groups if g["set"]}
    # the bottleneck's first and second convs each form one set across all blocks
    assert "channels:conv1x1>conv3x3" in sets and "channels:conv3x3>conv1x1" in sets
    assert sum(g["set"] == "channels:conv1x1>conv3x3" for g in groups) == 8


BAD = [
    (["missing.onnx", "--ratios", '{"default":0.5}'], "not found"),
    (["NOTONNX", "--ratios", '{"default":0.5}'], "not an ONNX model"),
    (["MODEL", "--ratios", '{"default":1.0}'], "[0, 1)"),
    (["MODEL", "--ratios", '{"default":-0.1}'], "[0, 1)"),
    (["MODEL", "--ratios", '{"kinds":{"nope":0.5}}'], "unknown kind"),
    (["MODEL", "--ratios", '{"defualt":0.5}'], "unknown field"),
    (["MODEL", "--ratios", '{"scope":"everywhere"}'], "unknown scope"),
    (["MODEL", "--ratios", "{not json"], "not valid JSON"),
    (["MODEL", "--ratios", "missing.json"], "cannot read ratios"),
    (["MODEL", "--ratios", '{"default":0.5}', "-o", "MODEL"], "overwrite"),
    (["gohsp", "MODEL", "--data", "nowhere"], "--ratios"),
    (["gohsp", "MODEL", "--data", "nowhere", "--sparsity", "1.5"], "[0, 1)"),
    (["gohsp", "MODEL", "--data", "nowhere", "--ratios", '{"target_latency": "50%"}'], "not a target"),
    (["gohsp", "MODEL", "--data", "nowhere", "--ratios", "{not json"], "ratios are not valid JSON"),
    (["gohsp", "MODEL", "--data", "nowhere", "--ratios", "missing.json"], "cannot read ratios file"),
    (["MODEL", "--ratios", '{"target_latency": "50%", "target_macs": 0.5}'], "not both"),
    (["MODEL", "--ratios", '{"target_latency": "soon"}'], "target_latency must be"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_exit_1(tmp_path, args, msg):
    model = tmp_path / "model.onnx"
    model.write_bytes(open(default_model(), "rb").read())
    (tmp_path / "bad.onnx").write_text("this is not protobuf")
    args = [str(model) if a == "MODEL" else str(tmp_path / "bad.onnx") if a == "NOTONNX" else a for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.onnx")]
    before = set(os.listdir(tmp_path))
    rc, out, err = run(args, tmp_path)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error:") and msg in lines[0], err
    assert "Traceback" not in err
    assert set(os.listdir(tmp_path)) == before  # no output file written
    assert model.read_bytes() == open(default_model(), "rb").read()


@pytest.mark.slow  # exports two timm models at full size
def test_export_img_size_and_num_classes_reach_the_model(tmp_path):
    pytest.importorskip("timm")
    import numpy as np
    import onnxruntime as ort

    for name, dims in (("timm:resnet18", 4), ("timm:deit_tiny_patch16_224", 4)):
        out = tmp_path / (name[5:] + ".onnx")
        rc, _, err = run(["export", name, "--img-size", "64", "--num-classes", str(dims), "--dynamic-batch", "-o", str(out)], tmp_path)
        assert rc == 0, err
        assert "Replaced initializer" not in err  # the exporter's INFO chatter stays hidden
        s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        y = s.run(None, {s.get_inputs()[0].name: np.zeros((3, 3, 64, 64), np.float32)})[0]
        assert y.shape == (3, dims)


def test_running_the_cli_in_process_leaves_root_logging_alone(capsys):
    import logging

    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    for _ in range(2):
        assert main(["analyze", default_model(), "-q"]) == 0
    assert (list(root.handlers), root.level) == before
    from onnxprune.cli import _Stderr

    ours = logging.getLogger("onnxprune")
    # one handler of ours however often main() runs (pytest's logging plugin adds its own to non-propagating loggers)
    assert sum(isinstance(h, _Stderr) for h in ours.handlers) == 1 and not ours.propagate
    logging.getLogger("onnxprune.pipeline").info("a message of ours")
    assert "a message of ours" not in capsys.readouterr().err  # -q: warnings only


def test_verdict_line_shows_the_argv_given_to_main(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["host-program", "--host-flag"])
    assert main(["analyze", default_model(), "-q"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("PASSED |") and last.endswith(f"| Command: onnxprune analyze {default_model()} -q"), last


def test_analyze_says_why_nothing_is_prunable(tmp_path, capsys):
    """A model whose one layer feeds the graph output: analyze names the reason
    (its weight is computed by ConstantOfShape, folded at load)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ConstantOfShape", ["shp"], ["w"], value=numpy_helper.from_array(np.array([0.1], np.float32))),
             helper.make_node("Conv", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array([4, 3, 3, 3], np.int64), "shp")])
    path = tmp_path / "cos.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert main(["analyze", str(path)]) == 0
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert "nothing is prunable: all 1 groups are frozen (reaches graph output 'y')" in verdict

"""Every CLI subcommand runs once in the fast suite, end to end, on tiny inputs:
data, export, prune (with and without the word), analyze, verify, bench,
finetune and gohsp. Each ends with the PASSED verdict line and writes what it
says it writes."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("onnx2torch")

from onnxprune.cli import COMMANDS, main  # noqa: E402

RATIOS = '{"default": 0.5}'


def run(capsys, *argv) -> str:
    """main() in-process; the exit status must be 0 and the verdict PASSED."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "this is a bug" not in err, err
    assert out.strip().splitlines()[-1].startswith("PASSED |"), out
    return out


def n_params(path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(path).graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("commands")


@pytest.fixture(scope="module")
def data(work):
    """``onnxprune data synthetic``: 3 classes of 12 + 4 glyph images, 32 px (gohsp calibrates on one batch of 32)."""
    root = str(work / "data")
    assert main(["data", "synthetic", root, "--classes", "3", "--train", "12", "--val", "4", "--size", "32", "-q"]) == 0
    return root


@pytest.fixture(scope="module")
def cnn(work):
    """``onnxprune export timm:resnet10t`` at 32 px, 3 classes (legacy exporter: the quicker one)."""
    path = str(work / "resnet10t.onnx")
    assert main(["export", "timm:resnet10t", "-o", path, "--exporter", "legacy", "--opset", "17", "--img-size", "32",
                 "--num-classes", "3", "--dynamic-batch", "-q"]) == 0
    return path


def test_every_subcommand_has_a_test_here():
    text = open(__file__).read()
    assert [s for s in COMMANDS if f'"{s}"' not in text] == []


def test_data_synthetic(data):
    for split, n in (("train", 12), ("val", 4)):
        classes = sorted(os.listdir(os.path.join(data, split)))
        assert len(classes) == 3 and all(len(os.listdir(os.path.join(data, split, c))) == n for c in classes)


def test_export(cnn):
    m = onnx.load(cnn)
    onnx.checker.check_model(m)
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 32, 32] and isinstance(dims[0], str)  # dynamic batch
    assert [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim][1:] == [3]


@pytest.mark.parametrize("word", [[], ["prune"]], ids=["implicit", "prune"])
def test_prune(capsys, cnn, work, word):
    out = str(work / f"pruned{len(word)}.onnx")
    plan, report = str(work / f"plan{len(word)}.json"), str(work / f"report{len(word)}.json")
    run(capsys, *word, cnn, "--ratios", RATIOS, "-o", out, "--save-plan", plan, "--report", report, "-q")
    assert n_params(out) < 0.6 * n_params(cnn)
    rep = json.load(open(report))
    assert rep["after"]["macs"] < rep["before"]["macs"]
    assert any(g["keep"] is not None for g in json.load(open(plan))["groups"])


def test_analyze(capsys, cnn, work):
    js = str(work / "groups.json")
    run(capsys, "analyze", cnn, "--json", js)
    groups = json.load(open(js))
    groups = groups["groups"] if isinstance(groups, dict) else groups
    assert any(not g["frozen"] for g in groups)


def test_verify(capsys, cnn, work):
    js = str(work / "rows.json")
    run(capsys, "verify", cnn, "--ratios", RATIOS, "--json", js, "-q")
    rows = json.load(open(js))
    assert rows and any(r["status"] == "PASS" for r in rows) and not any(r["status"] == "FAIL" for r in rows)


def test_bench(capsys, cnn, work):
    small = str(work / "small.onnx")
    run(capsys, cnn, "--ratios", RATIOS, "-o", small, "-q")
    js = str(work / "bench.json")
    run(capsys, "bench", cnn, small, "--batch", "2", "--warmup", "1", "--runs", "2", "--json", js, "-q")
    rows = json.load(open(js))
    assert [r["name"] for r in rows] == ["resnet10t.onnx", "small.onnx"] and rows[1]["macs"] < rows[0]["macs"]


def test_finetune(capsys, cnn, data, work):
    pruned = str(work / "ft_in.onnx")
    run(capsys, cnn, "--ratios", RATIOS, "-o", pruned, "-q")
    out = str(work / "tuned.onnx")
    run(capsys, "finetune", pruned, "--data", data, "-o", out, "--epochs", "1", "--max-steps", "2", "--batch-size", "8",
        "--workers", "0", "--device", "cpu", "-q")
    rep = json.load(open(str(work / "tuned.finetune.json")))
    assert rep["steps"] == 2
    a, b = onnx.load(pruned), onnx.load(out)
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]


def test_gohsp(capsys, data, work):
    """One short ADMM epoch and one fine-tuning epoch on a two-block ViT of 32 px."""
    from onnxprune.torchbridge.export import export_timm

    from timm_models import randomize

    vit = randomize(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                      mlp_ratio=2, num_classes=3), seed=1)
    path = str(work / "vit.onnx")
    export_timm("x", path, exporter="legacy", opset=17, dynamic_batch=True, model=vit, img_size=32)
    out = str(work / "vit_pruned.onnx")
    run(capsys, "gohsp", path, "--data", data, "--ratios", '{"kinds": {"heads": 0.5, "mlp": 0.5}}', "-o", out,
        "--admm-epochs", "1", "--finetune-epochs", "1", "--batch-size", "8", "--workers", "0", "--max-steps", "2", "-q")
    assert n_params(out) < n_params(path)
    rep = json.load(open(str(work / "vit_pruned.gohsp.json")))
    assert rep["admm_steps"] == 2 and rep["finetune_steps"] > 0
    assert sorted(rep["kept"].values()).count(1) == 2  # each block keeps one of its two heads
    assert rep["macs"]["after"] < rep["macs"]["before"]

"""Fine-tuning: onnx2torch import with our converters, exact weight write-back,
training that changes only initializer values, synthetic data, resume and DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("onnx2torch")

from onnxprune import io, runtime  # noqa: E402
from onnxprune.api import prune  # noqa: E402
from onnxprune.cli import main  # noqa: E402
from onnxprune.torchbridge.export import export_timm  # noqa: E402
from onnxprune.torchbridge.data import make_synthetic  # noqa: E402
from onnxprune.torchbridge.importer import import_onnx, tensor_at, write_back  # noqa: E402
from timm_models import randomize  # noqa: E402

SMALL = {
    "vit": lambda: timm.create_model("deit_tiny_patch16_224", img_size=64, depth=3, num_classes=10),
    "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=24,
                                      depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4), num_classes=10),
    "resnet": lambda: timm.create_model("resnet18", num_classes=10),
    "convnext": lambda: timm.create_model("convnext_atto", num_classes=10),
    "mobilenetv2": lambda: timm.create_model("mobilenetv2_050", num_classes=10),
}
EXPORTS = [("legacy", 17, False), ("legacy", 17, True), ("dynamo", 20, False), ("dynamo", 20, True)]
_SLOW = pytest.mark.slow
# one export per model in the fast suite (alternating exporters), all four in the full one
CASES = [pytest.param(m, *e, marks=() if k == i % len(EXPORTS) else _SLOW, id=f"{m}-{e[0]}-{'dyn' if e[2] else 'static'}")
         for i, m in enumerate(SMALL) for k, e in enumerate(EXPORTS)]
IDS = None


def _export(tmp_path, name, exporter, opset, dynamic, seed=3):
    path = str(tmp_path / f"{name}-{exporter}-{int(dynamic)}.onnx")
    model = randomize(SMALL[name](), seed=seed)
    export_timm(name, path, exporter=exporter, opset=opset, dynamic_batch=dynamic, model=model, img_size=64)
    return path


def _ort(proto, x):
    sess = runtime.session(proto)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name,exporter,opset,dynamic", CASES, ids=IDS)
def test_import_and_write_back_round_trip(tmp_path, name, exporter, opset, dynamic):
    path = _export(tmp_path, name, exporter, opset, dynamic)
    proto = onnx.load(path)
    batch = 3 if dynamic else 1
    x = np.random.default_rng(0).standard_normal((batch, 3, 64, 64)).astype(np.float32)
    ref = _ort(proto, x)
    imp = import_onnx(proto)
    mod = imp.module.eval()
    with torch.no_grad():
        y = mod(torch.from_numpy(x)).numpy()
    scale = np.abs(ref).max()
    assert np.abs(y - ref).max() <= 1e-4 * scale  # the converters compute what ORT computes
    # every floating-point tensor a node reads (more than a scalar) is trainable, a
    # BatchNorm running statistic, or frozen (masks only), each exactly once; expectations
    # from the graph itself, not from the importer's own classification
    readers: dict = {}
    for n in proto.graph.node:
        for k, i in enumerate(n.input):
            readers.setdefault(i, []).append((n.op_type, k))
    weights = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 1
               and i.name in readers}
    bn_stats = {n for n in weights if all(op == "BatchNormalization" and k in (3, 4) for op, k in readers[n])}
    assert set(imp.stats) == bn_stats
    assert set(imp.trainable) | set(imp.stats) | set(imp.frozen) == weights
    assert len(imp.trainable) + len(imp.stats) + len(imp.frozen) == len(weights)
    assert all("mask" in why for why in imp.frozen.values()), imp.frozen
    # and each trainable one is a parameter the module trains
    assert all(tensor_at(mod, imp.links[n][0].path).requires_grad for n in imp.trainable)
    assert imp.report()["trainable_params"] > 0.9 * sum(
        int(np.prod(i.dims)) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 1
        and i.name not in imp.frozen)
    # no training: write-back reproduces the ONNX outputs
    same = write_back(imp)
    assert np.abs(_ort(same, x) - ref).max() <= 1e-5 * scale
    # simulated training: perturb every trainable tensor; ORT on the written file equals torch
    with torch.no_grad():
        for p in mod.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p) * (p.abs().mean() + 1e-3))
        y2 = mod(torch.from_numpy(x)).numpy()
    written = write_back(imp)
    assert np.abs(y2 - ref).max() > 1e-3 * scale  # the perturbation is visible
    assert np.abs(_ort(written, x) - y2).max() <= 1e-4 * np.abs(y2).max()
    assert [n.SerializeToString() for n in written.graph.node] == [n.SerializeToString() for n in proto.graph.node]
    assert written.graph.input == proto.graph.input and written.graph.output == proto.graph.output


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("glyphs") / "data")
    make_synthetic(root, classes=4, train=24, val=8, size=64, seed=1, progress=False)
    return root


def test_synthetic_data_is_an_image_folder_and_deterministic(glyphs, tmp_path):
    from PIL import Image

    classes = sorted(os.listdir(os.path.join(glyphs, "train")))
    assert len(classes) == 4 and all(len(os.listdir(os.path.join(glyphs, "train", c))) == 24 for c in classes)
    assert all(len(os.listdir(os.path.join(glyphs, "val", c))) == 8 for c in classes)
    im = Image.open(os.path.join(glyphs, "train", classes[0], "00000.png"))
    assert im.size == (64, 64) and im.mode == "RGB"
    again = str(tmp_path / "again")
    make_synthetic(again, classes=4, train=24, val=8, size=64, seed=1, progress=False)
    f = os.path.join("train", classes[2], "00005.png")
    assert open(os.path.join(glyphs, f), "rb").read() == open(os.path.join(again, f), "rb").read()
    other = str(tmp_path / "other")
    make_synthetic(other, classes=4, train=2, val=1, size=64, seed=2, progress=False)
    assert open(os.path.join(glyphs, "train", classes[0], "00000.png"), "rb").read() != \
        open(os.path.join(other, "train", classes[0], "00000.png"), "rb").read()


def _ce_on_train(proto, root):
    from onnxprune.torchbridge.data import image_folder

    ds = image_folder(root, "train", 64, train=False)
    x = np.stack([ds[i][0].numpy() for i in range(len(ds))]).astype(np.float32)
    y = np.array([ds[i][1] for i in range(len(ds))])
    sess = runtime.session(proto)
    b = sess.get_inputs()[0].shape[0]
    b = b if isinstance(b, int) else len(x)
    outs = [sess.run(None, {sess.get_inputs()[0].name: x[i:i + b]})[0] for i in range(0, len(x), b)]
    z = np.concatenate(outs)
    z = z - z.max(1, keepdims=True)
    return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))).mean())


@pytest.mark.parametrize("name,exporter,dynamic", [("vit", "dynamo", True), ("resnet", "legacy", False)])
@pytest.mark.slow
def test_training_lowers_loss_and_changes_only_values(tmp_path, glyphs, name, exporter, dynamic):
    src = _export(tmp_path, name, exporter, 20 if exporter == "dynamo" else 17, dynamic)
    pruned = str(tmp_path / "pruned.onnx")
    io.save(prune(src, {"default": 0.3, "kinds": {"embed": 0}}).proto, pruned)
    out = str(tmp_path / "tuned.onnx")
    rc = main(["finetune", pruned, "--data", glyphs, "-o", out, "--teacher", src, "--max-steps", "12", "--epochs", "4",
               "--batch-size", "16", "--lr", "2e-3", "--workers", "0", "-q"])
    assert rc == 0
    a, b = onnx.load(pruned), onnx.load(out)
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert a.graph.input == b.graph.input and a.graph.output == b.graph.output  # names and dynamic axes
    ia, ib = {i.name: i for i in a.graph.initializer}, {i.name: i for i in b.graph.initializer}
    assert set(ia) == set(ib)
    assert all(ia[k].dims == ib[k].dims and ia[k].data_type == ib[k].data_type for k in ia)
    changed = [k for k in ia if ia[k].raw_data != ib[k].raw_data or list(ia[k].float_data) != list(ib[k].float_data)]
    assert len(changed) > 0.5 * sum(1 for k in ia if ia[k].data_type == onnx.TensorProto.FLOAT and np.prod(ia[k].dims) > 1)
    ints = [k for k in ia if ia[k].data_type == onnx.TensorProto.INT64]
    assert not set(changed) & set(ints)  # shape constants untouched
    assert _ce_on_train(b, glyphs) < _ce_on_train(a, glyphs)
    rep = json.loads(open(str(tmp_path / "tuned.finetune.json")).read())
    assert rep["steps"] == 12 and rep["kd"] and 0 <= rep["top1_after"] <= 100
    if not dynamic:
        assert rep["micro_batch"] == 1 and rep["accumulation"] == 16


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(tmp_path, glyphs):
    src = _export(tmp_path, "mobilenetv2", "dynamo", 20, True)
    out = str(tmp_path / "t.onnx")
    base = ["finetune", src, "--data", glyphs, "-o", out, "--batch-size", "16", "--workers", "0", "-q"]
    assert main(base + ["--epochs", "1"]) == 0
    first = json.loads(open(str(tmp_path / "t.finetune.json")).read())
    assert main(base + ["--epochs", "2", "--resume"]) == 0
    second = json.loads(open(str(tmp_path / "t.finetune.json")).read())
    assert [h["epoch"] for h in second["history"]] == [2]  # epoch 1 came from the checkpoint
    assert second["steps"] == 2 * first["steps"]


@pytest.mark.slow
def test_torchrun_single_process_cpu(tmp_path, glyphs):
    src = _export(tmp_path, "resnet", "dynamo", 20, True)
    out = str(tmp_path / "ddp.onnx")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29517", "-m", "onnxprune",
           "finetune", src, "--data", glyphs, "-o", out, "--max-steps", "2", "--batch-size", "8", "--workers", "0", "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(open(str(tmp_path / "ddp.finetune.json")).read())
    assert rep["world_size"] == 1 and rep["steps"] == 2
    assert onnx.load(out).graph.node == onnx.load(src).graph.node


@pytest.mark.parametrize("runtime", [False, True], ids=["const-bounds", "runtime-bounds"])
@pytest.mark.parametrize("starts,ends,axes,steps", [([1, 0], [3, 100], [0, 2], [1, 2]), ([-1], [-1000], [1], [-2]),
                                                    ([0, 2, -4], [2**63 - 1, -1, 5], [0, 1, 2], None)])
def test_slice_converter_matches_ort(starts, ends, axes, steps, runtime):
    """Our Slice: clamped bounds, negative steps, INT64_MAX ends, bounds known or computed at run time."""
    from onnx import TensorProto, helper, numpy_helper

    x = np.random.default_rng(0).random((4, 6, 5)).astype(np.float32)
    inits, names, nodes = [], [], []
    for n, v in (("s", starts), ("e", ends), ("a", axes), ("t", steps)):
        if v is not None:
            inits.append(numpy_helper.from_array(np.array(v, np.int64), n))
            names.append(n)
    if runtime:
        nodes = [helper.make_node("Identity", [n], [n + "_r"]) for n in names]
        names = [n + "_r" for n in names]
    nodes.append(helper.make_node("Slice", ["x", *names], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    ref = _ort(m, x)
    got = import_onnx(m).module(torch.from_numpy(x)).detach().numpy()
    assert got.shape == ref.shape and np.array_equal(got, ref)

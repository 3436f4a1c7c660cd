"""Vision transformers: heads, head_dim, mlp and embed groups found from the
graph alone (both exporters, static and dynamic batch), exact pruning of
planted dead structures, and the seed's DeiT configurations."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.slow  # full-size timm exports: run by the full suite (.ci/run)

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from onnxprune import io, runtime  # noqa: E402
from onnxprune.api import analyze, prune  # noqa: E402
from onnxprune.cli import main  # noqa: E402
from onnxprune.torchbridge.export import export_timm  # noqa: E402
from onnxprune.plan import Ratios  # noqa: E402
from onnxprune.api import verify  # noqa: E402
from timm_models import independent_macs, randomize  # noqa: E402

EXPORTS = [("legacy", 17, False), ("legacy", 17, True), ("dynamo", 20, False), ("dynamo", 20, True)]
IDS = [f"{e}-op{o}-{'dyn' if d else 'static'}" for e, o, d in EXPORTS]
MODELS = __import__("pathlib").Path(__file__).resolve().parent.parent / "models"


def _export(tmp_path, model, exporter, opset, dynamic, name="m.onnx"):
    path = str(tmp_path / name)
    export_timm("vit", path, exporter=exporter, opset=opset, dynamic_batch=dynamic, model=model)
    return path


@pytest.mark.parametrize("exporter,opset,dynamic", EXPORTS, ids=IDS)
def test_deit_tiny_groups_and_oracle(tmp_path, exporter, opset, dynamic):
    model = randomize(timm.create_model("deit_tiny_patch16_224"), seed=2)
    path = _export(tmp_path, model, exporter, opset, dynamic)
    a = analyze(path)
    live = [g for g in a.groups if not g.frozen]
    kinds = {}
    for g in live:
        kinds.setdefault(g.kind, []).append(g.width)
    # Isomorphic Pruning's groups: E (192), H (3 per block), QKV dim (64 per block), M (768 per block)
    assert kinds == {"heads": [3] * 12, "head_dim": [64] * 12, "mlp": [768] * 12, "embed": [192]}
    assert len(a.sets) == 4
    cfg = {"kinds": {"heads": 0.34, "head_dim": 0.25, "mlp": 0.5, "embed": 0.25}}
    rows = verify(io.read_proto(path), Ratios.from_dict(cfg), batch=3)
    status = {r.kind: r.status for r in rows if r.scope != "all exact groups"}
    assert status == {"heads": "PASS", "head_dim": "PASS", "mlp": "PASS", "embed": "approximate (not tested)"}
    assert rows[-1].status == "PASS" and rows[-1].max_rel_err <= 1e-4
    res = prune(path, cfg)
    assert res.checks["ort_batches"] == ([1, 2] if dynamic else [1])
    assert res.after["macs"] == independent_macs_from_proto(tmp_path, res.proto)


def independent_macs_from_proto(tmp_path, proto):
    p = str(tmp_path / "pruned_for_count.onnx")
    onnx.save(proto, p)
    return independent_macs(p)


def _blocks(model):
    if hasattr(model, "layers"):  # Swin
        return [b for layer in model.layers for b in layer.blocks]
    return list(model.blocks)


def _plant_dead(model, rng):
    """Dead heads (0, 1 or 2 per block), dead head dims and dead MLP units,
    zeroed in every tensor that touches them (q/k/v rows and biases, projection
    columns, the relative-position-bias column of a head)."""
    planted = {"heads": 0, "head_dim": 0, "mlp": 0}
    with torch.no_grad():
        for i, blk in enumerate(_blocks(model)):
            at = blk.attn
            h = at.num_heads
            d = at.qkv.out_features // (3 * h)
            qkv_w, qkv_b = at.qkv.weight.view(3, h, d, -1), at.qkv.bias.view(3, h, d)
            proj_w = at.proj.weight.view(-1, h, d)
            heads = rng.choice(h, [0, 1, 2][i % 3], replace=False)
            dims = rng.choice(d, d // 8 * (1 + i % 2), replace=False)
            for x in (qkv_w, qkv_b):
                x[:, heads] = 0
                x[:, :, dims] = 0
            proj_w[:, heads] = 0
            proj_w[:, :, dims] = 0
            if hasattr(at, "relative_position_bias_table"):
                at.relative_position_bias_table[:, heads] = 0
            hidden = blk.mlp.fc1.out_features
            units = rng.choice(hidden, hidden // 8 * (1 + i % 4), replace=False)
            blk.mlp.fc1.weight[units] = 0
            blk.mlp.fc1.bias[units] = 0
            blk.mlp.fc2.weight[:, units] = 0
            planted["heads"] += len(heads)
            planted["head_dim"] += len(dims)
            planted["mlp"] += len(units)
    return planted


PLANTED = [("deit_tiny_patch16_224", *e) for e in EXPORTS] + [
    ("deit_base_patch16_224", "legacy", 17, True), ("deit_base_patch16_224", "dynamo", 20, False),
    ("swin_tiny_patch4_window7_224", "legacy", 17, False), ("swin_tiny_patch4_window7_224", "dynamo", 20, True),
]


@pytest.mark.parametrize("name,exporter,opset,dynamic", PLANTED, ids=[f"{n.split('_')[0]}_{n.split('_')[1]}-{e}-{'dyn' if d else 'static'}" for n, e, _, d in PLANTED])
def test_planted_dead_heads_dims_units_are_removed_exactly(tmp_path, name, exporter, opset, dynamic):
    model = randomize(timm.create_model(name), seed=4)
    planted = _plant_dead(model, np.random.default_rng(0))
    path = _export(tmp_path, model, exporter, opset, dynamic)
    blocks = _blocks(model)
    total = {
        "heads": sum(b.attn.num_heads for b in blocks),
        "head_dim": sum(b.attn.qkv.out_features // (3 * b.attn.num_heads) for b in blocks),
        "mlp": sum(b.mlp.fc1.out_features for b in blocks),
    }
    # DeiT: one isomorphic set per kind, so isomorphic scope with the planted
    # fraction removes exactly them. Swin's sets differ per stage (and the planted
    # share differs per set), so there every group of a kind is ranked together.
    scope = "global" if name.startswith("swin") else "isomorphic"
    ratios = {"kinds": {k: planted[k] / total[k] + 1e-9 for k in total}, "scope": scope}
    out, rep = str(tmp_path / "p.onnx"), str(tmp_path / "r.json")
    assert main([path, "--ratios", json.dumps(ratios), "-o", out, "--report", rep, "-q"]) == 0
    groups = json.load(open(rep))["groups"]
    for kind in total:
        removed = sum(g["width"] - g["width_after"] for g in groups if g["kind"] == kind)
        assert removed == planted[kind], kind
    assert len({g["width"] - g["width_after"] for g in groups if g["kind"] == "heads"}) == 3  # 0, 1 and 2 heads removed
    batch = 3 if dynamic else 1
    a, b = onnx.load(path), onnx.load(out)
    feeds = runtime.random_inputs(a, batch=batch, seed=5)
    ya, yb = runtime.session(a).run(None, feeds)[0], runtime.session(b).run(None, feeds)[0]
    assert ya.shape == yb.shape == (batch, 1000)
    assert np.abs(ya - yb).max() / np.abs(ya).max() < 1e-4


@pytest.fixture(scope="module")
def deit_base(tmp_path_factory):
    model = randomize(timm.create_model("deit_base_patch16_224"), seed=6)
    return _export(tmp_path_factory.mktemp("deit"), model, "dynamo", 20, True, "deit_base.onnx")


def test_deit_4_2g_target(deit_base, tmp_path):
    res = prune(deit_base, str(MODELS / "deit_4.2g.json"))
    out = str(tmp_path / "deit42.onnx")
    onnx.save(res.proto, out)
    # Isomorphic Pruning: deit_base at 0.5/0.5/0.25 -> 20.28M params, 4.16G MACs
    assert abs(res.after["params"] / 20.28e6 - 1) < 0.005
    assert abs(independent_macs(out) / 4.16e9 - 1) < 0.01
    assert res.after["macs"] == independent_macs(out)
    for batch in (1, 8):
        y = runtime.session(res.proto).run(None, runtime.random_inputs(res.proto, batch=batch))[0]
        assert y.shape == (batch, 1000)


def test_half_deit_base_has_deit_small_shapes(deit_base, tmp_path):
    cfg = {"kinds": {"embed": 0.5, "heads": 0.5, "mlp": 0.5, "head_dim": 0}, "scope": "local"}
    res = prune(deit_base, cfg)
    small = randomize(timm.create_model("deit_small_patch16_224"), seed=7)
    ref = onnx.load(_export(tmp_path, small, "dynamo", 20, True, "small.onnx"))
    floats = lambda m: sorted(tuple(i.dims) for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) > 0 and np.prod(i.dims) > 1)
    assert floats(res.proto) == floats(ref)
    from onnxprune.core import metrics

    assert res.after == metrics.count(ref)  # params and MACs of the native architecture


@pytest.mark.parametrize("exporter,opset,dynamic", EXPORTS, ids=IDS)
def test_swin_tiny_groups_and_oracle(tmp_path, exporter, opset, dynamic):
    """Windows, shifted windows (mask add, cyclic shift), relative-position bias
    gathered by head and patch merging: every group found, oracle passes."""
    model = randomize(timm.create_model("swin_tiny_patch4_window7_224"), seed=8)
    path = _export(tmp_path, model, exporter, opset, dynamic)
    a = analyze(path)
    live = [g for g in a.groups if not g.frozen]
    assert len(live) == len(a.groups) - 1  # only the classifier (graph output)
    heads = sorted(g.width for g in live if g.kind == "heads")
    assert heads == [3] * 2 + [6] * 2 + [12] * 6 + [24] * 2
    assert sorted(g.width for g in live if g.kind == "embed") == [96, 192, 384, 768]
    assert sorted(g.width for g in live if g.kind == "head_dim") == [32] * 12
    cfg = {"kinds": {"heads": 0.34, "head_dim": 0.25, "mlp": 0.5, "embed": 0.25}}
    rows = verify(io.read_proto(path), Ratios.from_dict(cfg), per_set=False, batch=3)
    assert rows[-1].status == "PASS" and rows[-1].removed > 0
    res = prune(path, cfg)
    assert res.checks["checker"] == "ok" and res.after["macs"] < 0.5 * res.before["macs"]
    assert res.before["macs"] == independent_macs(path)
    assert res.after["macs"] == independent_macs_from_proto(tmp_path, res.proto)


def test_onnx_attention_op_opset23(tmp_path):
    """timm's fused attention exported at opset 23 becomes the ONNX Attention op."""
    model = randomize(timm.create_model("deit_tiny_patch16_224"), seed=9)
    path = _export(tmp_path, model, "dynamo", 23, False)
    assert any(n.op_type == "Attention" for n in onnx.load(path).graph.node)
    a = analyze(path)
    kinds = sorted((g.kind, g.width) for g in a.groups if not g.frozen)
    assert kinds == sorted([("heads", 3)] * 12 + [("head_dim", 64)] * 12 + [("mlp", 768)] * 12 + [("embed", 192)])
    cfg = {"kinds": {"heads": 0.34, "head_dim": 0.25, "mlp": 0.5}}
    rows = verify(io.read_proto(path), Ratios.from_dict(cfg))
    # head_dim exact only because the default 1/sqrt(D) scale is pinned at load
    assert {r.kind: r.status for r in rows if r.scope != "all exact groups"} == {"heads": "PASS", "head_dim": "PASS", "mlp": "PASS"}
    res = prune(path, cfg)
    scales = [at.f for n in res.proto.graph.node if n.op_type == "Attention" for at in n.attribute if at.name == "scale"]
    assert len(scales) == 12 and np.allclose(scales, 1 / 8)
    assert res.before["macs"] == independent_macs(path)
    assert res.after["macs"] == independent_macs_from_proto(tmp_path, res.proto)


def test_target_macs_half_of_deit_base(deit_base, tmp_path):
    """A budget of 50% MACs on deit_base lands within 1%, counted independently."""
    res = prune(deit_base, {"target_macs": "50%", "kinds": {"embed": 0.5, "heads": 0.5, "head_dim": 0.25, "mlp": 0.5}})
    out = str(tmp_path / "half.onnx")
    onnx.save(res.proto, out)
    macs = independent_macs(out)
    assert abs(macs / (0.5 * res.before["macs"]) - 1) < 0.01
    t = res.plan.target
    assert t["achieved"] == res.after["macs"] == macs
    used = t["ratios_used"]["kinds"]
    # one common scale: the given proportions are kept
    assert used["heads"] == pytest.approx(used["embed"]) == pytest.approx(2 * used["head_dim"])
    assert 0 < used["heads"] < 0.5


def test_round_to_applies_to_every_width_but_not_head_counts(deit_base):
    res = prune(deit_base, {"kinds": {"embed": 0.3, "heads": 0.3, "head_dim": 0.3, "mlp": 0.3}, "round_to": 8, "scope": "local"})
    kept = {}
    for g in res.analyzed.groups:
        if g.id in res.plan.keep:
            kept.setdefault(g.kind, set()).add(len(res.plan.keep[g.id]))
    assert set(kept) == {"embed", "heads", "head_dim", "mlp"}
    for kind in ("embed", "head_dim", "mlp"):
        assert all(k % 8 == 0 for k in kept[kind]), (kind, kept[kind])
    assert kept["heads"] == {9}  # 12 heads - floor(0.3 * 12): whole heads, never rounded to 8

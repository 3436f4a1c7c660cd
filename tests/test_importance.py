"""Importance criteria: GOHSP's head ranking recomputed independently from head
outputs captured in torch, data-driven criteria differ from magnitude on both
exporters' ViT and CNN graphs, calibration loaders, per-kind specs, reports."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("onnx2torch")

from onnxprune import io  # noqa: E402
from onnxprune.api import analyze, prune  # noqa: E402
from onnxprune.cli import main  # noqa: E402
from onnxprune.errors import UserError  # noqa: E402
from onnxprune.torchbridge.export import export_timm  # noqa: E402
from onnxprune.plan.importance.calib import Calibration, load  # noqa: E402
from onnxprune.plan.importance.criteria import gohsp_scores  # noqa: E402
from onnxprune.plan import Ratios  # noqa: E402
from timm_models import randomize  # noqa: E402

EXPORTS = [pytest.param("legacy", 17, False, id="legacy-static", marks=pytest.mark.slow),
           pytest.param("legacy", 17, True, id="legacy-dyn", marks=pytest.mark.slow),
           pytest.param("dynamo", 20, False, id="dynamo-static", marks=pytest.mark.slow),
           pytest.param("dynamo", 20, True, id="dynamo-dyn")]
IDS = None


def _vit(seed=4):
    return randomize(timm.create_model("deit_tiny_patch16_224", img_size=64, depth=3, num_classes=10), seed=seed)


def _export(tmp_path, model, exporter, opset, dynamic, name="m.onnx"):
    path = str(tmp_path / name)
    export_timm("x", path, exporter=exporter, opset=opset, dynamic_batch=dynamic, model=model, img_size=64)
    return path


def _stationary_by_eig(vectors: np.ndarray) -> np.ndarray:
    """Independent of the implementation: cosine matrix, clamp, column-normalise,
    then the limit of P^k applied to the uniform start, by repeated squaring
    (Alg. 2's fixed point; for a reducible chain, e.g. P = I when every cosine is
    negative, the eigenvector is not unique but this limit is)."""
    u = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    P = np.maximum(u @ u.T, 0)
    P = P / P.sum(0, keepdims=True)
    Q = P.copy()
    for _ in range(40):  # P^(2^40)
        Q = Q @ Q
        Q = Q / Q.sum(0, keepdims=True)
    s = Q @ np.full(len(P), 1.0 / len(P))
    return s / s.sum()


@pytest.mark.parametrize("exporter,opset,dynamic", EXPORTS, ids=IDS)
def test_gohsp_equals_stationary_distribution_of_captured_heads(tmp_path, exporter, opset, dynamic):
    model = _vit()
    path = _export(tmp_path, model, exporter, opset, dynamic)
    batch = 1 if not dynamic else 6
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((batch, 3, 64, 64)).astype(np.float32) for _ in range(2)]
    calib = Calibration(xs, None, "test")
    a = analyze(path)
    scores = a.scores(Ratios.from_dict({"importance": {"heads": "gohsp"}}), calib)
    heads = [g for g in a.groups if g.kind == "heads" and not g.frozen]
    assert len(heads) == 3 and all(g.id in scores.gohsp for g in heads)
    # independent capture: the input of each block's output projection is
    # [B, N, H * D], head h in columns h*D:(h+1)*D (timm's own module structure)
    caught = []
    hooks = [b.attn.proj.register_forward_hook(lambda m, i, o: caught.append(i[0].detach().double())) for b in model.blocks]
    with torch.no_grad():
        for x in xs:
            model(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    n_blocks = len(model.blocks)
    ours = sorted((scores.gohsp[g.id] for g in heads), key=lambda d: d["value"])
    ref_by_block = []
    for b in range(n_blocks):
        summed = sum(caught[k * n_blocks + b].sum(0) for k in range(len(xs)))  # sum over samples: [N, H*D]
        H = model.blocks[b].attn.num_heads
        D = summed.shape[-1] // H
        vecs = np.stack([summed[:, h * D:(h + 1) * D].numpy().ravel() for h in range(H)])
        ref_by_block.append(_stationary_by_eig(vecs))
    got = [np.array(d["stationary"]) for d in ours]
    # match blocks by value (the graph's value names do not tell block order across exporters)
    for r in ref_by_block:
        best = min(np.abs(g - r).max() for g in got)
        assert best <= 1e-6, (best, r, got)
    for d in ours:
        P = np.array(d["P"])
        assert np.allclose(P.sum(0), 1) and (P >= 0).all()
        assert abs(sum(d["stationary"]) - 1) < 1e-9


def test_gohsp_power_iteration_on_a_hand_matrix():
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((6, 40))
    vecs[3] = -vecs[0]  # a negative cosine, clamped
    s, P, it = gohsp_scores(vecs)
    assert np.allclose(P @ s, s, atol=1e-10) and it > 1
    assert np.abs(s - _stationary_by_eig(vecs)).max() < 1e-9


def _rankings_differ(a: dict, b: dict, groups) -> int:
    return sum(1 for g in groups if g in a and g in b and not np.array_equal(np.argsort(a[g]), np.argsort(b[g])))


@pytest.mark.parametrize("name", ["vit", pytest.param("cnn", marks=pytest.mark.slow)])
@pytest.mark.parametrize("exporter,opset", [pytest.param("legacy", 17, marks=pytest.mark.slow), ("dynamo", 20)])
def test_data_criteria_run_and_differ_from_magnitude(tmp_path, name, exporter, opset):
    model = _vit() if name == "vit" else randomize(timm.create_model("resnet18", num_classes=10), seed=5)
    path = _export(tmp_path, model, exporter, opset, True)
    a = analyze(path)
    proto = io.to_proto(a.model)
    calib = load("synthetic", proto, n_batches=2, batch=8)
    base = a.scores(Ratios.from_dict({"importance": "l2"})).values
    live = [g.id for g in a.groups if not g.frozen]
    for crit in ("taylor", "activation", "hessian"):
        sc = a.scores(Ratios.from_dict({"importance": crit}), calib)
        assert not sc.notes, (crit, sc.notes)
        assert set(sc.values) == set(live) and all(sc.used[g] == crit for g in live)
        assert all(np.isfinite(v).all() and (v >= 0).all() and v.any() for v in sc.values.values())
        assert _rankings_differ(sc.values, base, live) >= len(live) // 2, crit


def test_bn_scale_uses_norm_gamma_and_falls_back(tmp_path):
    model = _vit()
    path = _export(tmp_path, model, "dynamo", 20, True)
    a = analyze(path)
    sc = a.scores(Ratios.from_dict({"importance": "bn_scale"}))
    embed = [g for g in a.groups if g.kind == "embed" and not g.frozen]
    assert embed and all(sc.used[g.id] == "bn_scale" for g in embed)
    mlp = [g for g in a.groups if g.kind == "mlp"]
    assert all(sc.used[g.id] == "l2" and "no normalisation scale" in sc.notes[g.id] for g in mlp)
    # embed score = |gamma| summed over the LayerNorms reading the stream: in a ViT every
    # LayerNorm of the torch model (two per block and the final one) reads the residual stream
    norms = [mod for mod in model.modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert len(norms) == 2 * len(model.blocks) + 1
    want = sum(np.abs(mod.weight.detach().double().numpy()) for mod in norms)
    (e,) = embed
    np.testing.assert_allclose(sc.values[e.id], want, rtol=1e-6)


def test_importance_spec_validation():
    r = Ratios.from_dict({"importance": {"heads": "gohsp", "default": "taylor"}})
    assert r.importance_spec == {"heads": "gohsp", "default": "taylor"}
    with pytest.raises(UserError, match="unknown importance"):
        Ratios.from_dict({"importance": "nope"})
    with pytest.raises(UserError, match="unknown kind"):
        Ratios.from_dict({"importance": {"blocks": "l2"}})


def test_data_criterion_without_calibration_is_a_user_error(tmp_path):
    path = _export(tmp_path, _vit(), "dynamo", 20, False)
    with pytest.raises(UserError, match="needs calibration data"):
        prune(path, {"default": 0.3, "importance": "taylor"})


def test_calibration_loaders(tmp_path):
    from onnxprune.torchbridge.data import make_synthetic

    path = _export(tmp_path, _vit(), "dynamo", 20, True)
    proto = onnx.load(path)
    x = np.random.default_rng(0).standard_normal((20, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    c = load(str(tmp_path / "c.npy"), proto, n_batches=3, batch=6)
    assert len(c.batches) == 3 and c.labels is None and np.array_equal(c.batches[1], x[6:12])
    np.savez(tmp_path / "c.npz", x=x, y=np.arange(20) % 10)
    c = load(str(tmp_path / "c.npz"), proto, n_batches=2, batch=5)
    assert [list(y) for y in c.labels] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    root = str(tmp_path / "imgs")
    make_synthetic(root, classes=3, train=4, val=2, size=64, progress=False)
    c = load(root, proto, n_batches=2, batch=4)
    assert c.batches[0].shape == (4, 3, 64, 64) and c.labels is not None
    with pytest.raises(UserError, match="fewer than one batch"):
        load(str(tmp_path / "c.npy"), proto, n_batches=1, batch=64)
    with pytest.raises(UserError, match="shape"):
        np.save(tmp_path / "bad.npy", x[:, :, :32, :32])
        load(str(tmp_path / "bad.npy"), proto, n_batches=1, batch=4)
    with pytest.raises(UserError):
        load("nowhere", proto)


def test_report_records_criterion_scores_and_gohsp(tmp_path):
    path = _export(tmp_path, _vit(), "legacy", 17, True)
    rep = tmp_path / "r.json"
    rc = main([path, "--ratios", json.dumps({"kinds": {"heads": 0.34, "mlp": 0.3}, "scope": "local", "importance": {"heads": "gohsp", "default": "taylor"}}),
               "-o", str(tmp_path / "p.onnx"), "--report", str(rep), "--calib", "synthetic", "--calib-batches", "2",
               "--calib-batch-size", "4", "-q"])
    assert rc == 0
    groups = json.loads(rep.read_text())["groups"]
    heads = [g for g in groups if g["kind"] == "heads" and not g["frozen"]]
    assert heads and all(g["criterion"] == "gohsp" and len(g["gohsp"]["P"]) == g["width"] for g in heads)
    for g in heads:  # the pruned head is one with the lowest stationary probability
        s = np.array(g["gohsp"]["stationary"])
        assert g["kept"] is not None and len(g["kept"]) == 2
        (removed,) = set(range(3)) - set(g["kept"])
        assert s[removed] == s.min()
    mlp = [g for g in groups if g["kind"] == "mlp"]
    assert all(g["criterion"] == "taylor" and len(g["scores"]) == g["width"] for g in mlp)
    assert main(["analyze", path, "--scores", "--importance", "activation", "--calib", "synthetic", "--calib-batches", "1",
                 "--calib-batch-size", "4", "--plot", str(tmp_path / "s.png"), "-q"]) == 0
    assert os.path.getsize(tmp_path / "s.png") > 1000


# -- every criterion's value on models small enough to compute it by hand ------------------------
def _tiny(text: str, inits: dict) -> onnx.ModelProto:
    m = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + text)
    for k, v in inits.items():
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(v, np.float32), k))
    return m


def _mlp():
    """x [4, 6] -> Gemm (5 hidden) -> Relu -> Gemm (3 logits): one prunable group, the 5 hidden units."""
    rng = np.random.default_rng(11)
    w = {"w1": rng.standard_normal((5, 6)), "b1": rng.standard_normal(5) * 0.3,
         "w2": rng.standard_normal((3, 5)), "b2": rng.standard_normal(3) * 0.3}
    m = _tiny("""g (float[4, 6] x) => (float[4, 3] y) {
  [fc1] h = Gemm <transB=1> (x, w1, b1)
  r = Relu(h)
  [fc2] y = Gemm <transB=1> (r, w2, b2)
}""", w)
    return m, {k: v.astype(np.float32).astype(np.float64) for k, v in w.items()}


def _conv():
    """x [2, 3, 5, 5] -> Conv 3x3 (4 channels) -> Relu -> Conv 1x1 (2): the 4 channels are the group."""
    rng = np.random.default_rng(12)
    w = {"w1": rng.standard_normal((4, 3, 3, 3)), "b1": rng.standard_normal(4) * 0.3, "w2": rng.standard_normal((2, 4, 1, 1))}
    m = _tiny("""g (float[2, 3, 5, 5] x) => (float[2, 2, 5, 5] y) {
  [c1] h = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu(h)
  [c2] y = Conv (r, w2)
}""", w)
    return m, {k: v.astype(np.float32).astype(np.float64) for k, v in w.items()}


def _only_group_scores(m, crit, calib=None):
    a = analyze(m)
    (g,) = [g for g in a.groups if not g.frozen]
    sc = a.scores(Ratios.from_dict({"importance": crit}), calib)
    assert sc.used[g.id] == crit and not sc.notes, (sc.used, sc.notes)
    return sc.values[g.id]


def _hand_forward_backward(w, x, y):
    """The MLP in float64 and the gradient of mean cross-entropy with label
    smoothing 0.1, written out: dL/dz = (softmax(z) - q) / B."""
    h = x @ w["w1"].T + w["b1"]
    r = np.maximum(h, 0)
    z = r @ w["w2"].T + w["b2"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    C = z.shape[1]
    q = np.full_like(p, 0.1 / C)
    q[np.arange(len(y)), y] += 0.9
    dz = (p - q) / len(y)
    dr = dz @ w["w2"]
    dh = dr * (h > 0)
    return r, {"w1": dh.T @ x, "b1": dh.sum(0), "w2": dz.T @ r}


def test_magnitude_scores_by_hand():
    m, w = _mlp()
    # channel c's slices: row c of w1, entry c of b1, column c of w2
    sq = (w["w1"] ** 2).sum(1) + w["b1"] ** 2 + (w["w2"] ** 2).sum(0)
    ab = np.abs(w["w1"]).sum(1) + np.abs(w["b1"]) + np.abs(w["w2"]).sum(0)
    np.testing.assert_allclose(_only_group_scores(m, "l2"), np.sqrt(sq), rtol=1e-6)
    np.testing.assert_allclose(_only_group_scores(m, "l1"), ab, rtol=1e-6)
    m, w = _conv()
    sq = (w["w1"] ** 2).sum((1, 2, 3)) + w["b1"] ** 2 + (w["w2"] ** 2).sum((0, 2, 3))
    ab = np.abs(w["w1"]).sum((1, 2, 3)) + np.abs(w["b1"]) + np.abs(w["w2"]).sum((0, 2, 3))
    np.testing.assert_allclose(_only_group_scores(m, "l2"), np.sqrt(sq), rtol=1e-6)
    np.testing.assert_allclose(_only_group_scores(m, "l1"), ab, rtol=1e-6)


def test_activation_scores_by_hand():
    rng = np.random.default_rng(5)
    m, w = _mlp()
    xs = [rng.standard_normal((4, 6)).astype(np.float32) for _ in range(3)]
    want = np.mean([np.abs(np.maximum(x @ w["w1"].T + w["b1"], 0)).mean(0) for x in xs], 0)
    np.testing.assert_allclose(_only_group_scores(m, "activation", Calibration(xs, None, "test")), want, rtol=1e-5)
    m, w = _conv()
    xs = [rng.standard_normal((2, 3, 5, 5)).astype(np.float32) for _ in range(2)]
    acts = []
    for x in xs:  # the 3x3 convolution, padded, by hand
        xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        h = np.zeros((2, 4, 5, 5))
        for i in range(5):
            for j in range(5):
                h[:, :, i, j] = np.einsum("bcyx,ocyx->bo", xp[:, :, i:i + 3, j:j + 3], w["w1"]) + w["b1"]
        acts.append(np.maximum(h, 0).mean((0, 2, 3)))
    np.testing.assert_allclose(_only_group_scores(m, "activation", Calibration(xs, None, "test")), np.mean(acts, 0), rtol=1e-5)


def test_taylor_and_hessian_scores_by_hand():
    rng = np.random.default_rng(6)
    m, w = _mlp()
    xs = [rng.standard_normal((4, 6)).astype(np.float32) for _ in range(3)]
    ys = [rng.integers(0, 3, 4) for _ in range(3)]
    grads = [_hand_forward_backward(w, x.astype(np.float64), y)[1] for x, y in zip(xs, ys)]
    # taylor: |w * sum of the batches' gradients|, summed over channel c's slices
    tot = {k: sum(g[k] for g in grads) for k in grads[0]}
    t = {k: np.abs(w[k] * tot[k]) for k in tot}
    want_taylor = t["w1"].sum(1) + t["b1"] + t["w2"].sum(0)
    # hessian: sum over batches of (w * gradient)^2, summed over the same slices
    f = {k: sum((w[k] * g[k]) ** 2 for g in grads) for k in grads[0]}
    want_hessian = f["w1"].sum(1) + f["b1"] + f["w2"].sum(0)
    calib = Calibration(xs, ys, "test")
    got_t = _only_group_scores(m, "taylor", calib)
    got_h = _only_group_scores(m, "hessian", calib)
    np.testing.assert_allclose(got_t, want_taylor, rtol=1e-4)
    np.testing.assert_allclose(got_h, want_hessian, rtol=1e-4)
    assert len(set(np.argsort(want_taylor))) == 5 and np.ptp(want_taylor) > 0.1 * want_taylor.max()

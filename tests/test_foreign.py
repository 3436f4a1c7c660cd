"""Files from other tools, as small look-alikes: dynamic H/W detectors, Paddle2ONNX's -1 dims and
HardSigmoid SE blocks, quantized graphs, integer inputs, ops without rules. Each is pruned to a
valid model or refused in one line, never a traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune import runtime
from onnxprune.errors import UserError
from onnxprune.pipeline import Job
from onnxprune.plan import Ratios
from onnxprune.api import verify

_rng = np.random.default_rng(7)


def W(*shape):
    return (_rng.standard_normal(shape) * 0.5).astype(np.float32)


def model(text: str, inits: dict, opset=17) -> onnx.ModelProto:
    m = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n{text}')
    for k, v in inits.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(v), k))
    return m


def cli(args, cwd):
    p = subprocess.run([sys.executable, "-m", "onnxprune", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    # an internal error also exits 1 in one line: never accepted as a refusal
    assert "this is a bug" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout, p.stderr


def detector(hw="height, width") -> onnx.ModelProto:
    """An ultralytics-like neck: stride-2 conv, upsample x2 and concat with the skip, dynamic H/W."""
    return model(f"""g (float[batch, 3, {hw}] images) => (float[batch, 6, {hw}] out) {{
  [c1] a = Conv <pads=[1,1,1,1]> (images, w1, b1)
  r1 = Relu(a)
  [c2] b = Conv <strides=[2,2], pads=[1,1,1,1]> (r1, w2, b2)
  r2 = Relu(b)
  up = Resize <mode="nearest"> (r2, , scales)
  cat = Concat <axis=1> (up, r1)
  [c3] c = Conv <pads=[1,1,1,1]> (cat, w3, b3)
  r3 = Relu(c)
  [c4] out = Conv (r3, w4, b4)
}}""", {"w1": W(8, 3, 3, 3), "b1": W(8), "w2": W(16, 8, 3, 3), "b2": W(16), "scales": np.array([1, 1, 2, 2], np.float32),
        "w3": W(12, 24, 3, 3), "b3": W(12), "w4": W(6, 12, 1, 1), "b4": W(6)})


def test_dynamic_hw_needs_an_input_shape(tmp_path):
    onnx.save(detector(), str(tmp_path / "det.onnx"))
    rc, out, err = cli(["det.onnx", "--ratios", '{"default": 0.5}', "-o", "p.onnx"], tmp_path)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "--input-shape images:N,3,<size>,<size>" in err, err
    assert not (tmp_path / "p.onnx").exists()
    rc, out, err = cli(["det.onnx", "--ratios", '{"default": 0.5}', "-o", "p.onnx", "--input-shape", "images:N,3,32,48", "--verify"],
                       tmp_path)
    assert rc == 0, err
    assert "PASS" in out and "FAIL" not in out
    sess = runtime.session(str(tmp_path / "p.onnx"))
    y = sess.run(None, {"images": np.zeros((2, 3, 32, 48), np.float32)})[0]
    assert y.shape == (2, 6, 32, 48)
    # the same through ratios.json
    rc, out, err = cli(["det.onnx", "--ratios", json.dumps({"default": 0.5, "input_shapes": {"images": ["N", 3, 32, 48]}}),
                        "-o", "p2.onnx"], tmp_path)
    assert rc == 0, err


def test_input_shape_errors_are_one_line(tmp_path):
    onnx.save(detector(), str(tmp_path / "det.onnx"))
    for spec, msg in [("nosuch:1,3,32,32", "names no input"), ("images:1,3,32", "the input has 4"), ("images:1,3,0,32", "positive"),
                      ("images", "NAME:d1,d2")]:
        rc, out, err = cli(["det.onnx", "--ratios", '{"default": 0.5}', "-o", "p.onnx", "--input-shape", spec], tmp_path)
        assert rc == 1 and len(err.strip().splitlines()) == 1 and msg in err, (spec, err)


def test_calibration_arrays_give_the_dims_the_model_leaves_open(tmp_path):
    onnx.save(detector(), str(tmp_path / "det.onnx"))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "cal.npy", rng.standard_normal((32, 3, 32, 48)).astype(np.float32))
    rc, out, err = cli(["det.onnx", "--ratios", '{"target_macs": 0.8}', "--calib", "cal.npy", "-o", "p.onnx", "--verify"],
                       tmp_path)
    assert rc == 0, err
    assert "dims batch,3,32,48 taken from the calibration data" in out + err
    sess = runtime.session(str(tmp_path / "p.onnx"))
    assert [d if isinstance(d, int) else "sym" for d in sess.get_inputs()[0].shape] == ["sym", 3, 32, 48]
    assert sess.run(None, {"images": np.zeros((2, 3, 32, 48), np.float32)})[0].shape == (2, 6, 32, 48)
    # timed the same way: the original and the pruned file at the calibration dims
    rc, out, err = cli(["det.onnx", "--ratios", '{"target_macs": 0.8}', "--calib", "cal.npy", "-o", "b.onnx", "--bench",
                        "--runs", "2", "--warmup", "1", "--batch", "2", "--report", "r.json"], tmp_path)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [r["macs"] for r in rep["latency"]] == [rep["before"]["macs"], rep["after"]["macs"]], rep["latency"]
    # an .npz: the array named after the input; --input-shape wins over the data
    np.savez(tmp_path / "cal.npz", images=rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    rc, out, err = cli(["det.onnx", "--ratios", '{"default": 0.5}', "--calib", "cal.npz", "-o", "q.onnx",
                        "--input-shape", "images:N,3,16,32"], tmp_path)
    assert rc == 1 and "'images' samples have shape [3, 16, 16], the model takes [3, 16, 32]" in err, err
    rc, out, err = cli(["det.onnx", "--ratios", '{"default": 0.5}', "--calib", "cal.npz", "-o", "r.onnx"], tmp_path)
    assert rc == 0, err
    assert runtime.session(str(tmp_path / "r.onnx")).get_inputs()[0].shape[1:] == [3, 16, 16]


def test_calibration_dims_that_contradict_the_model_are_not_taken(tmp_path):
    onnx.save(detector(hw="height, 48"), str(tmp_path / "det.onnx"))  # W known: 48
    np.save(tmp_path / "cal.npy", np.zeros((32, 3, 32, 32), np.float32))
    rc, out, err = cli(["det.onnx", "--ratios", '{"default": 0.5}', "--calib", "cal.npy", "-o", "p.onnx"], tmp_path)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "--input-shape images:N,3,<size>,48" in err, err
    assert not (tmp_path / "p.onnx").exists()


def test_a_feed_the_original_cannot_run_is_the_users_error(tmp_path):
    """H, W that the upsample + concat cannot take (odd sizes): the original fails on that feed too."""
    onnx.save(detector(), str(tmp_path / "det.onnx"))
    rc, out, err = cli(["det.onnx", "--ratios", '{"default": 0.5}', "-o", "p.onnx", "--input-shape", "images:1,3,33,33"], tmp_path)
    assert rc == 1 and "original model cannot run" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.onnx").exists()


def paddle_like() -> onnx.ModelProto:
    """Paddle2ONNX habits: batch stored as -1, HardSigmoid squeeze-excite, HardSwish, opset 11."""
    m = model("""g (float[1, 3, 16, 16] x) => (float[1, 5, 16, 16] y) {
  [c1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  h = HardSwish(a)
  p = GlobalAveragePool(h)
  [se1] s1 = Conv (p, ws1, bs1)
  sr = Relu(s1)
  [se2] s2 = Conv (sr, ws2, bs2)
  gate = HardSigmoid <alpha=0.2, beta=0.5> (s2)
  sc = Mul(h, gate)
  [c2] y = Conv (sc, w2, b2)
}""", {"w1": W(8, 3, 3, 3), "b1": W(8), "ws1": W(4, 8, 1, 1), "bs1": W(4), "ws2": W(8, 4, 1, 1), "bs2": W(8),
       "w2": W(5, 8, 1, 1), "b2": W(5)}, opset=14)
    for v in (m.graph.input[0], m.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_value = -1
    return m


def test_minus_one_batch_and_hard_sigmoid_se():
    m = paddle_like()
    job = Job.open(m)
    kinds = sorted(g.kind for g in job.groups if not g.frozen)
    assert len(kinds) >= 2  # the SE bottleneck and the block's channels
    rows = verify(m, Ratios.from_dict({"default": 0.5}))
    assert rows and all(r.status == "PASS" for r in rows if r.max_rel_err is not None)
    assert any(r.max_rel_err is not None and r.status == "PASS" for r in rows)
    feeds = runtime.random_inputs(m, batch=3)
    assert feeds["x"].shape == (3, 3, 16, 16)


def test_quantized_dynamic_graph_is_counted_and_refused_in_one_line(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxprune.core import metrics

    mm = model("""g (float[1, 3, 8, 8] x) => (float[1, 4] y) {
  [c1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu(a)
  p = GlobalAveragePool(r)
  f = Flatten(p)
  [fc] y = Gemm <transB=1> (f, w2, b2)
}""", {"w1": W(16, 3, 3, 3), "b1": W(16), "w2": W(4, 16), "b2": W(4)})
    onnx.save(mm, str(tmp_path / "f.onnx"))
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in q.graph.node}
    fm, qm = metrics.count(mm), metrics.count(q)
    conv_macs = 16 * 8 * 8 * 3 * 9
    assert fm["macs"] >= conv_macs and qm["macs"] >= conv_macs  # ConvInteger counted like Conv
    assert qm["params"] >= 16 * 27  # int8 weights are params
    rc, out, err = cli(["q.onnx", "--ratios", '{"default": 0.5}', "-o", "p.onnx"], tmp_path)
    assert rc == 1 and "nothing to prune" in err and "ConvInteger" in err and len(err.strip().splitlines()) == 1, err


def test_integer_inputs_get_valid_ids_and_masks():
    m = model("""g (int64[batch, 6] ids, int64[batch, 6] mask) => (float[batch, 6, 4] y) {
  e = Gather(table, ids)
  mf = Cast <to=1> (mask)
  mu = Unsqueeze(mf, ax)
  y = Mul(e, mu)
}""", {"table": W(11, 4), "ax": np.array([2], np.int64)})
    for seed in range(3):
        f = runtime.random_inputs(m, batch=5, seed=seed)
        assert f["ids"].shape == (5, 6) and f["ids"].min() >= 0 and f["ids"].max() <= 10
        assert set(np.unique(f["mask"])) <= {0, 1}
        runtime.session(m).run(None, f)


ODD = {
    "custom domain op": ("""g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
  [c1] a = Conv <pads=[1,1,1,1]> (x, w1)
  b = com.example.Foo(a)
  [c2] y = Conv (b, w2)
}""", {"w1": W(6, 3, 3, 3), "w2": W(4, 6, 1, 1)}),
    "LSTM": ("""g (float[5, 1, 4] x) => (float[5, 1, 1, 3] y) {
  y, h, c = LSTM <hidden_size=3> (x, w, r)
}""", {"w": W(1, 12, 4), "r": W(1, 12, 3)}),
    "no floating weights": ("""g (float[1, 3, 8, 8] x) => (float[1, 3, 8, 8] y) {
  y = Relu(x)
}""", {}),
}


# what each one is refused with: a user error naming the cause, never an internal one
ODD_REFUSAL = {
    "custom domain op": "onnxprune: error: nothing to prune: all 1 groups are frozen (no rule for com.example::Foo (opset 1)); "
                        "ops without a rule: com.example::Foo x1",
    "LSTM": "onnxprune: error: nothing to prune: no prunable channel group was found; ops without a rule: LSTM x1",
    "no floating weights": "onnxprune: error: nothing to prune: no prunable channel group was found",
}


@pytest.mark.parametrize("name", list(ODD))
def test_odd_graphs_never_crash(tmp_path, name):
    text, inits = ODD[name]
    m = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>\n' + text)
    for k, v in inits.items():
        m.graph.initializer.append(numpy_helper.from_array(v, k))
    onnx.save(m, str(tmp_path / "m.onnx"))
    rc, out, err = cli(["m.onnx", "--ratios", '{"default": 0.5}', "-o", "p.onnx"], tmp_path)
    assert "Traceback" not in err and "this is a bug" not in err, err
    assert rc == 1 and err.strip() == ODD_REFUSAL[name], err
    assert not (tmp_path / "p.onnx").exists()


def test_input_shapes_api():
    job = Job.open(detector(), input_shapes={"images": ["N", 3, 16, 16]})
    assert any(not g.frozen for g in job.groups)
    with pytest.raises(UserError, match="dynamic dim 2"):
        Job.open(detector())


# -- a BERT-style encoder: embeddings gathered from tables, an additive mask over heads, a pooler --
def _bert(tmp_path, exporter: str) -> str:
    import torch
    import torch.nn as nn

    class Layer(nn.Module):
        def __init__(s, C=32, H=4, F=64):
            super().__init__()
            s.H = H
            s.q, s.k, s.v, s.o = (nn.Linear(C, C) for _ in range(4))
            s.ln1, s.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
            s.f1, s.f2 = nn.Linear(C, F), nn.Linear(F, C)

        def forward(s, x, mask):
            B, N, C = x.shape
            heads = lambda t: t.view(B, N, s.H, C // s.H).permute(0, 2, 1, 3)  # noqa: E731
            q, k, v = heads(s.q(x)), heads(s.k(x)), heads(s.v(x))
            a = ((q @ k.transpose(-1, -2)) / (C // s.H) ** 0.5 + mask).softmax(-1) @ v
            x = s.ln1(x + s.o(a.permute(0, 2, 1, 3).reshape(B, N, C)))
            return s.ln2(x + s.f2(torch.nn.functional.gelu(s.f1(x))))

    class Bert(nn.Module):
        def __init__(s, V=50, C=32, N=16):
            super().__init__()
            s.w, s.p, s.t, s.ln = nn.Embedding(V, C), nn.Embedding(N, C), nn.Embedding(2, C), nn.LayerNorm(C)
            s.layers = nn.ModuleList([Layer(C) for _ in range(2)])
            s.pool = nn.Linear(C, C)

        def forward(s, ids, mask, tt):
            x = s.ln(s.w(ids) + s.p(torch.arange(ids.shape[1])) + s.t(tt))
            m = (1.0 - mask[:, None, None, :].float()) * -10000.0
            for layer in s.layers:
                x = layer(x, m)
            return x, torch.tanh(s.pool(x[:, 0]))

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 16))
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    path = str(tmp_path / f"bert_{exporter}.onnx")
    if exporter == "legacy":  # dynamic batch and sequence, as encoders are usually exported
        torch.onnx.export(Bert().eval(), args, path, dynamo=False, opset_version=17, input_names=names,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    else:
        torch.onnx.export(Bert().eval(), args, path, dynamo=True, opset_version=20, input_names=names, external_data=False)
    return path


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_bert_encoder_with_mask_gets_heads_pruned(tmp_path, exporter):
    path = _bert(tmp_path, exporter)
    shapes = ["input_ids:N,16", "attention_mask:N,16", "token_type_ids:N,16"] if exporter == "legacy" else []
    job = Job.open(path, shapes)
    kinds = {}
    for g in job.groups:
        if not g.frozen:
            kinds[g.kind] = kinds.get(g.kind, 0) + 1
    assert kinds.get("heads") == 2 and kinds.get("mlp") == 2 and kinds.get("head_dim", 0) >= 2, kinds
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 50, (32, 16)), attention_mask=rng.integers(0, 2, (32, 16)),
             token_type_ids=rng.integers(0, 2, (32, 16)))
    args = [path, "--ratios", '{"kinds": {"heads": 0.5, "mlp": 0.5}, "importance": {"heads": "gohsp"}}', "--calib",
            str(tmp_path / "calib.npz"), "--calib-batch-size", "8", "-o", str(tmp_path / "p.onnx"), "--verify",
            "--report", str(tmp_path / "r.json")] + [a for s in shapes for a in ("--input-shape", s)]
    rc, out, err = cli(args, tmp_path)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    heads = [g for g in rep["groups"] if g["kind"] == "heads"]
    assert heads and all(g["width_after"] == 2 for g in heads)
    assert rep["oracle"] and all(r["status"] == "PASS" for r in rep["oracle"] if r["max_rel_err"] is not None)
    assert any(r["status"] == "PASS" for r in rep["oracle"])
    if exporter == "legacy":  # without the sequence length: one line naming the flag
        rc, out, err = cli([path, "--ratios", '{"kinds": {"heads": 0.5}}', "-o", str(tmp_path / "q.onnx")], tmp_path)
        assert rc == 1 and "--input-shape input_ids:N,<size>" in err, err


# -- torch's nn.MultiheadAttention through the legacy exporter, dynamic batch (torchvision's ViT) --
def _mha_vit(tmp_path, batch_first: bool) -> str:
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(s, C=32, H=4):
            super().__init__()
            s.ln1, s.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
            s.attn = nn.MultiheadAttention(C, H, batch_first=batch_first)
            s.f1, s.f2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

        def forward(s, x):
            h = s.ln1(x)
            x = x + s.attn(h, h, h, need_weights=False)[0]
            return x + s.f2(torch.nn.functional.gelu(s.f1(s.ln2(x))))

    class ViT(nn.Module):
        def __init__(s, C=32):
            super().__init__()
            s.C = C
            s.embed = nn.Conv2d(3, C, 8, 8)
            s.blocks = nn.Sequential(Block(C), Block(C))
            s.head = nn.Linear(C, 10)

        def forward(s, x):  # torchvision's patch flattening: sizes read from the input
            n, _, h, w = x.shape
            t = s.embed(x).reshape(n, s.C, (h // 8) * (w // 8)).permute(0, 2, 1)
            if not batch_first:
                t = t.transpose(0, 1)
            t = s.blocks(t)
            return s.head(t.mean(1 if batch_first else 0))

    torch.manual_seed(0)
    path = str(tmp_path / f"mha_{batch_first}.onnx")
    torch.onnx.export(ViT().eval(), (torch.randn(2, 3, 32, 32),), path, dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})  # not named "batch"
    return path


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_multihead_attention_from_the_legacy_exporter_gets_heads_head_dims_and_stream_pruned(tmp_path, batch_first):
    """The legacy export folds the heads into the batch ([L, N, E] -> [L, N * H, E / H],
    N read at run time times a constant H) and reads the patch grid's sizes from the
    input: heads, head dims and the residual stream all stay prunable, the constant H
    follows the heads kept, and the pruned file runs at any batch size."""
    import onnxruntime as ort

    path = _mha_vit(tmp_path, batch_first)
    job = Job.open(path)
    kinds = {}
    for g in job.groups:
        if not g.frozen:
            kinds[g.kind] = kinds.get(g.kind, 0) + 1
    assert kinds.get("heads") == 2 and kinds.get("head_dim") == 2 and kinds.get("embed") == 1, kinds
    out = tmp_path / "p.onnx"
    rc, _, err = cli([path, "--ratios", '{"default": 0, "kinds": {"heads": 0.5, "head_dim": 0.25}}', "-o", str(out),
                      "--verify", "--report", str(tmp_path / "r.json")], tmp_path)
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    kept = [g["width_after"] for g in rep["groups"] if g["kind"] == "heads"]
    assert len(kept) == 2 and sum(kept) == 4 and min(kept) >= 1, kept
    checked = [r for r in rep["oracle"] if r["max_rel_err"] is not None]
    assert checked and all(r["status"] == "PASS" for r in checked)
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    whole = sess.run(None, {"x": x})[0]
    alone = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(whole, alone, rtol=1e-4, atol=1e-5)
    # the scalar H of each block's "batch * H" now spells its heads kept; no 4 is left
    pruned = onnx.load(str(out))
    scalars = {int(numpy_helper.to_array(i)) for i in pruned.graph.initializer
               if numpy_helper.to_array(i).ndim == 0 and numpy_helper.to_array(i).dtype.kind == "i"}
    assert set(kept) <= scalars and 4 not in scalars, (kept, scalars)


def _qdq(tmp_path, m: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    onnx.save(m, str(tmp_path / "f.onnx"))
    name = m.graph.input[0].name
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: np.random.default_rng(k).standard_normal(shape).astype(np.float32)} for k in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return onnx.load(str(tmp_path / "q.onnx"))


def test_qdq_model_prunes_like_its_float_original(tmp_path):
    f = model("""g (float[1, 3, 8, 8] x) => (float[1, 4] y) {
  [c1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu(a)
  [c2] b = Conv <pads=[1,1,1,1]> (r, w2, b2)
  s = Add(b, r)
  p = GlobalAveragePool(s)
  q = Flatten(p)
  [fc] y = Gemm <transB=1> (q, w3, b3)
}""", {"w1": W(16, 3, 3, 3), "b1": W(16), "w2": W(16, 16, 3, 3), "b2": W(16), "w3": W(4, 16), "b3": W(4)})
    q = _qdq(tmp_path, f)
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Conv" in ops
    fa, qa = Job.open(f), Job.open(q)
    sig = lambda a: sorted((g.kind, g.width, g.set_name) for g in a.groups if not g.frozen)  # noqa: E731
    assert sig(fa) == sig(qa) and sig(qa)
    rows = verify(q, Ratios.from_dict({"default": 0.5}))
    tested = [r for r in rows if r.max_rel_err is not None]
    assert tested and all(r.status == "PASS" for r in tested)
    from onnxprune.api import prune

    res = prune(q, {"default": 0.5})
    assert res.after["params"] < res.before["params"]
    dq_w = [t for t in res.proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert dq_w and all(t.dims[0] < 16 for t in dq_w)  # the int8 weights were sliced
    # the oracle can fail on QDQ: zero one channel's weights without pruning it
    from onnxprune.validate.oracle import check_subset

    job = Job.open(q)
    plan = job.plan(Ratios.from_dict({"default": 0.5}))
    gid = next(g.id for g in job.groups if g.id in plan.keep and g.kind == "embed")
    other = np.setdiff1d(np.arange(16), plan.keep[gid])[:len(plan.keep[gid])]
    real = Job.edited

    def lying(self, keep, zero=False, prune=False, consumer_only=frozenset()):
        return real(self, {gid: other} if prune else keep, zero=zero, prune=prune, consumer_only=consumer_only)

    Job.edited = lying
    try:
        assert check_subset(job, {gid}, plan.keep, 1) > 1e-3
    finally:
        Job.edited = real


def test_qdq_grouped_conv_with_a_quantized_bias_is_named_and_pruned_like_its_float_original(tmp_path):
    # a grouped conv whose int32 bias goes through DequantizeLinear: the set is named from the
    # conv's (quantized) weight, not from the bias
    from test_recover import small_cnn

    f = small_cnn(seed=1)
    q = _qdq(tmp_path, f)
    assert any(n.op_type == "DequantizeLinear" and n.input[0].startswith("b2") for n in q.graph.node)
    fa, qa = Job.open(f), Job.open(q)
    sig = lambda a: sorted((g.kind, g.width, g.set_name) for g in a.groups if not g.frozen)  # noqa: E731
    assert sig(fa) == sig(qa) and any("gconv3x3" in s for _, _, s in sig(qa))
    rows = verify(q, Ratios.from_dict({"default": 0.5}))
    tested = [r for r in rows if r.max_rel_err is not None]
    assert tested and all(r.status == "PASS" for r in tested)


def svtr_like() -> onnx.ModelProto:
    """Paddle2ONNX's SVTR attention (PP-OCR's recogniser): the feature map
    flattened by a Reshape whose target is ``Concat(Slice(Shape(x), 0, 2), -1)``
    (ONNX shape inference gives up on it), then qkv split by a Reshape whose
    target is computed at run time from the token count, behind int32 Casts:
    ``Concat(Cast(0), Cast(Slice(Cast(Shape(t)), 1, 2)), Cast(3), Cast(heads),
    Cast(head dim))``. C 24 = 4 heads of 6, 10 tokens."""
    C, H, D, T = 24, 4, 6, 10
    return model(f"""g (float[batch, {C}, 1, {T}] x) => (float[batch, {T}, {C}] y) {{
  s0 = Shape(x)
  s1 = Slice(s0, z1, two1)
  tgt = Concat <axis=0> (s1, m1)
  f = Reshape(x, tgt)
  t = Transpose <perm=[0,2,1]> (f)
  [qkv_mm] q0 = MatMul(t, wqkv)
  qkv = Add(q0, bqkv)
  ts = Shape(qkv)
  ts32 = Cast <to=6> (ts)
  tn = Slice(ts32, one1, two1)
  c0 = Cast <to=7> (zero32)
  c1 = Cast <to=7> (tn)
  c2 = Cast <to=7> (three32)
  c3 = Cast <to=7> (heads32)
  c4 = Cast <to=7> (dim32)
  tgt2 = Concat <axis=0> (c0, c1, c2, c3, c4)
  r = Reshape(qkv, tgt2)
  p = Transpose <perm=[2,0,3,1,4]> (r)
  q = Gather <axis=0> (p, i0)
  k = Gather <axis=0> (p, i1)
  v = Gather <axis=0> (p, i2)
  kt = Transpose <perm=[0,1,3,2]> (k)
  a0 = MatMul(q, kt)
  a1 = Mul(a0, scale)
  a = Softmax <axis=-1> (a1)
  o = MatMul(a, v)
  ot = Transpose <perm=[0,2,1,3]> (o)
  tgt3 = Concat <axis=0> (c0, c1, cdim)
  o2 = Reshape(ot, tgt3)
  [proj] y0 = MatMul(o2, wproj)
  y = Add(y0, bproj)
}}""", {"z1": np.array([0], np.int64), "one1": np.array([1], np.int64), "two1": np.array([2], np.int64),
        "m1": np.array([-1], np.int64), "wqkv": W(C, 3 * C), "bqkv": W(3 * C),
        "zero32": np.array([0], np.int32), "three32": np.array([3], np.int32), "heads32": np.array([H], np.int32),
        "dim32": np.array([D], np.int32), "cdim": np.array([C], np.int64), "i0": np.array(0, np.int64),
        "i1": np.array(1, np.int64), "i2": np.array(2, np.int64), "scale": np.array(D ** -0.5, np.float32),
        "wproj": W(C, C), "bproj": W(C)}, opset=12)  # PP-OCRv4's opset: ONNX infers neither Reshape's shape


def test_paddle_svtr_attention_gets_heads_and_head_dims_pruned():
    """Shapes that only onnxruntime's symbolic inference proves make the
    run-time Reshape targets foldable: heads and head dims become prunable
    groups (they were frozen: 'Reshape target computed at run time') and
    pass the oracle."""
    m = svtr_like()
    job = Job.open(m)
    live = {g.kind: g.width for g in job.groups if not g.frozen}
    assert live.get("heads") == 4 and live.get("head_dim") == 6, [(g.kind, g.width, g.frozen) for g in job.groups]
    rows = verify(m, Ratios.from_dict({"kinds": {"heads": 0.25, "head_dim": 0.34}}))
    checked = [r for r in rows if r.max_rel_err is not None]
    assert {r.kind for r in checked} >= {"heads", "head_dim"}
    assert all(r.status == "PASS" for r in checked)


def swin_mask_like() -> onnx.ModelProto:
    """torchvision's Swin through the legacy exporter, shifted-window blocks:
    the logits of every window ``[batch * windows, heads, N, N]`` are reshaped
    to ``[batch, windows, heads, N, N]`` to add the shift mask, the target a
    ``Concat`` of a run-time ``Div`` (windows per image from shapes), the windows,
    the heads and N as constants, then back to ``[-1, heads, N, N]``. 8 tokens in
    2 windows of 4; C 16 = 4 heads of 4."""
    C, H, D, N, NW = 16, 4, 4, 4, 2
    return model(f"""g (float[batch, {N * NW}, {C}] x) => (float[batch, {N * NW}, {C}] y) {{
  [qkv_mm] q0 = MatMul(x, wqkv)
  qkv = Add(q0, bqkv)
  r = Reshape(qkv, tgt5)
  p = Transpose <perm=[2,0,3,1,4]> (r)
  q = Gather <axis=0> (p, i0)
  k = Gather <axis=0> (p, i1)
  v = Gather <axis=0> (p, i2)
  kt = Transpose <perm=[0,1,3,2]> (k)
  a0 = MatMul(q, kt)
  a1 = Mul(a0, scale)
  s = Shape(a1)
  bw = Gather <axis=0> (s, i0)
  b = Div(bw, nw)
  b1 = Unsqueeze(b, z1)
  tgt = Concat <axis=0> (b1, nw1, heads1, n1, n1)
  m5 = Reshape(a1, tgt)
  masked = Add(m5, mask)
  a2 = Reshape(masked, back)
  a = Softmax <axis=-1> (a2)
  o = MatMul(a, v)
  ot = Transpose <perm=[0,2,1,3]> (o)
  o2 = Reshape(ot, merged)
  [proj] y0 = MatMul(o2, wproj)
  y = Add(y0, bproj)
}}""", {"wqkv": W(C, 3 * C), "bqkv": W(3 * C), "tgt5": np.array([-1, N, 3, H, D], np.int64),
        "i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "i2": np.array(2, np.int64),
        "scale": np.array(D ** -0.5, np.float32), "nw": np.array(NW, np.int64), "z1": np.array([0], np.int64),
        "nw1": np.array([NW], np.int64), "heads1": np.array([H], np.int64), "n1": np.array([N], np.int64),
        "mask": np.where(_rng.random((1, NW, 1, N, N)) < 0.3, -100.0, 0.0).astype(np.float32),
        "back": np.array([-1, H, N, N], np.int64), "merged": np.array([-1, N * NW, C], np.int64),
        "wproj": W(C, C), "bproj": W(C)})


def test_swin_shifted_window_mask_reshape_gets_heads_pruned():
    """A Reshape target with a piece computed at run time that cannot be
    followed (a Div of sizes) beside the heads as a constant: the heads are
    rewritten there (they were frozen: 'Reshape target computed at run time')
    and pass the oracle; the pruned model runs at another batch size."""
    m = swin_mask_like()
    onnx.checker.check_model(m, full_check=True)
    job = Job.open(m)
    live = {g.kind: g.width for g in job.groups if not g.frozen}
    assert live.get("heads") == 4, [(g.kind, g.width, g.frozen, g.reason) for g in job.groups]
    rows = verify(m, Ratios.from_dict({"default": 0, "kinds": {"heads": 0.5}}))
    checked = [r for r in rows if r.max_rel_err is not None and r.kind == "heads"]
    assert checked and all(r.status == "PASS" for r in checked), rows
    from onnxprune.api import prune

    res = prune(m, {"default": 0, "kinds": {"heads": 0.5}})
    x = np.random.default_rng(0).standard_normal((3, 8, 16)).astype(np.float32)
    assert runtime.session(res.proto).run(None, {"x": x})[0].shape == (3, 8, 16)


def _qdq_pair(tmp_path, per_channel=True, weight_type="QInt8"):
    """A small float CNN and its QDQ version from onnxruntime's static quantizer."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(7)  # its own weights, whichever tests ran before

    def W(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    f = model("""g (float[1, 3, 8, 8] x) => (float[1, 4] y) {
  [c1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu(a)
  [c2] b = Conv <pads=[1,1,1,1]> (r, w2, b2)
  p = GlobalAveragePool(b)
  q = Flatten(p)
  [fc] y = Gemm <transB=1> (q, w3, b3)
}""", {"w1": W(16, 3, 3, 3), "b1": W(16), "w2": W(16, 16, 3, 3), "b2": W(16), "w3": W(4, 16), "b3": W(4)})
    onnx.save(f, str(tmp_path / "f.onnx"))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": np.random.default_rng(k).standard_normal((1, 3, 8, 8)).astype(np.float32)}
                            for k in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, weight_type=getattr(QuantType, weight_type),
                    activation_type=QuantType.QUInt8)
    return f, onnx.load(str(tmp_path / "q.onnx"))


def _outputs(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = runtime.session(m)
    return np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("per_channel,weight_type", [(True, "QInt8"), (False, "QUInt8")])
def test_recover_on_a_qdq_model_refits_and_writes_back_on_the_quantized_grid(tmp_path, per_channel, weight_type):
    """A QDQ model's layers are fitted on their dequantized weights and written
    back quantized: integer weights of the same type (per channel or per
    tensor, zero points kept), int32 biases whose scale is still the input's
    times the weight's, and outputs closer to the quantized original's on new
    inputs than the plain prune's."""
    from onnxprune.api import prune

    _, q = _qdq_pair(tmp_path, per_channel, weight_type)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    res = prune(q, {"default": 0.5}, calib=str(tmp_path / "calib.npy"), calib_batches=4, calib_batch_size=8,
                recover="ridge")
    rows = {r.node: r for r in res.recovery}
    assert rows["c2"].status == "refit" and rows["fc"].status == "refit", res.recovery_text()
    assert rows["c2"].inputs_kept == "8/16", rows["c2"].inputs_kept  # the kept channels, read at the DequantizeLinear

    def inits(m):
        return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}

    plain = prune(q, plan=res.plan)  # the same plan, not recovered
    before, pruned, after = inits(q), inits(plain.proto), inits(res.proto)
    wtype = np.int8 if weight_type == "QInt8" else np.uint8
    for w in ("w2_quantized", "w3_quantized"):
        assert after[w].dtype == wtype and after[w].shape == pruned[w].shape
        assert not np.array_equal(after[w], pruned[w]), w  # the fit was written, not the pruned weight left
        zp = w.replace("quantized", "zero_point")
        assert after[zp].dtype == wtype and np.array_equal(after[zp], pruned[zp])
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2 for t in res.proto.graph.initializer)
    for b, x, w in (("b2_quantized", "r_scale", "w2_scale"), ("b3_quantized", "p_scale", "w3_scale")):
        assert after[b].dtype == np.int32
        rel = after[b + "_scale"].astype(np.float64) / (after[x].astype(np.float64) * after[w])
        assert np.allclose(rel, 1.0, rtol=1e-5), (b, rel)
    assert np.allclose(before["b2_quantized_scale"] / (before["r_scale"] * before["w2_scale"]), 1.0, rtol=1e-5)
    # closer to the quantized original on inputs no fit saw: the model's output, and c2's own output
    # channels (each against the original channel it kept: fc's pruned weight columns say which)
    x = np.random.default_rng(7).standard_normal((48, 3, 8, 8)).astype(np.float32)
    ref = _outputs(q, x)
    err = lambda m: float(np.linalg.norm(_outputs(m, x) - ref) / np.linalg.norm(ref))  # noqa: E731
    assert err(res.proto) < 0.5 * err(plain.proto), (err(res.proto), err(plain.proto))
    kept = [next(j for j in range(16) if np.array_equal(col, before["w3_quantized"][:, j]))
            for col in pruned["w3_quantized"].T]

    def c2_out(m):
        m = onnx.ModelProto.FromString(m.SerializeToString())
        m.graph.output.append(onnx.ValueInfoProto(name="b"))
        s = runtime.session(m)
        return np.concatenate([s.run(["b"], {"x": x[i:i + 1]})[0] for i in range(len(x))])

    b0 = c2_out(q)[:, kept]
    c2_err = lambda m: float(np.linalg.norm(c2_out(m) - b0) / np.linalg.norm(b0))  # noqa: E731
    assert c2_err(res.proto) < c2_err(plain.proto), (c2_err(res.proto), c2_err(plain.proto))


def test_recover_on_a_qdq_model_it_cannot_write_back_names_why(tmp_path):
    """Weights quantized per *input* channel: a re-fit could not keep their
    biases' scales tied to them, so recovery leaves them, says why per layer
    and in one warning, and reports no held-out check it never ran."""
    from onnxprune.api import prune
    from onnxprune.recover.graph import QUANTIZED

    _, q = _qdq_pair(tmp_path)
    inits = {t.name: t for t in q.graph.initializer}
    for n in q.graph.node:  # c2's and fc's weights: scales along the input axis instead
        if n.op_type == "DequantizeLinear" and n.input[0] in ("w2_quantized", "w3_quantized"):
            width = numpy_helper.to_array(inits[n.input[0]]).shape[1]
            for name, arr in ((n.input[1], np.full(width, 0.01, np.float32)), (n.input[2], np.zeros(width, np.int8))):
                inits[name].CopyFrom(numpy_helper.from_array(arr, name))
            del n.attribute[:]
            n.attribute.append(onnx.helper.make_attribute("axis", 1))
    onnx.checker.check_model(q, full_check=True)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    import logging

    seen = []
    handler = logging.Handler()
    handler.emit = lambda rec: seen.append(rec.getMessage())
    logging.getLogger("onnxprune.recover").addHandler(handler)
    try:
        res = prune(q, {"default": 0.5}, calib=str(tmp_path / "calib.npy"), calib_batches=2, calib_batch_size=8,
                    recover="ridge")
    finally:
        logging.getLogger("onnxprune.recover").removeHandler(handler)
    consumers = [r for r in res.recovery if r.node in ("c2", "fc")]
    assert len(consumers) == 2 and all(r.status == "skipped" and "per input channel" in r.reason
                                       and r.reason.endswith(QUANTIZED) for r in consumers), res.recovery_text()
    assert any("re-fitted no layer" in m and "per input channel" in m for m in seen), seen
    text = res.recovery_text()
    assert "no layer was re-fitted" in text and "held-out check" not in text


def test_a_qdq_model_meets_its_macs_target_in_the_written_file(tmp_path):
    """The budget counts a QDQ layer's work through its weight's integer
    tensor (where the analysis binds the channels): the file written holds
    the MACs the plan promised, as the float model's does."""
    from onnxprune.api import prune
    from onnxprune.core.metrics import count

    f, q = _qdq_pair(tmp_path)
    for m in (f, q):
        res = prune(m, {"target_macs": 0.6})
        got = count(res.proto)
        assert got == res.after, (got, res.after)
        assert abs(got["macs"] / count(m)["macs"] - 0.6) < 0.05, got


def test_a_qdq_vit_recovers_its_linear_layers_and_says_why_not_its_logits(tmp_path):
    """A vision transformer quantized by onnxruntime (QDQ): with head dims
    gone, --recover re-fits its MatMul layers on their integer grid and moves
    the output toward the quantized original on new inputs (the layers that
    write into the residual stream take up its loss); the joint q/k
    logit fit is found and refused with its reason (the activation quantizers'
    ranges), not silently left out."""
    import logging as _logging
    import pathlib

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from onnxprune.api import prune
    from onnxprune.core.metrics import count

    src = pathlib.Path(__file__).resolve().parent.parent / "models" / "ref_vit.onnx"
    f = onnx.load(str(src))
    name = f.graph.input[0].name
    shape = [d.dim_value or 1 for d in f.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal([48] + shape[1:]).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x[i:i + 8]} for i in range(0, 32, 8)])

        def get_next(self):
            return next(self.it, None)

    root = _logging.getLogger()
    level = root.level
    root.setLevel(_logging.ERROR)  # the quantizer's advice on pre-processing
    try:
        quantize_static(str(src), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)
    q = onnx.load(str(tmp_path / "q.onnx"))
    sig = lambda a: sorted((g.kind, g.width, g.set_name) for g in a.groups if not g.frozen)  # noqa: E731
    assert sig(Job.open(q)) == sig(Job.open(f)) and any(k == "mlp" for k, _, _ in sig(Job.open(f)))
    np.save(tmp_path / "calib.npy", x[:32])
    res = prune(q, {"kinds": {"head_dim": 0.25, "mlp": 0.25}}, calib=str(tmp_path / "calib.npy"), calib_batches=4,
                calib_batch_size=8, recover="ridge")
    assert res.after["params"] < 0.85 * count(q)["params"]  # the MLPs pruned too (a QDQ MLP is kind mlp)
    refit = [r for r in res.recovery if r.status == "refit" and r.op == "MatMul" and r.method != "qk-logits"]
    assert len(refit) >= 8, res.recovery_text()
    streams = [r for r in refit if r.target == "stream"]  # branches into the residual Adds, past their Q -> DQ pairs
    assert 4 <= len(streams) < len(refit)  # not every layer: the bias Add behind a MatMul's Q -> DQ is its own
    float_adds = lambda m: sum(n.op_type == "Add" for n in m.graph.node)  # noqa: E731
    assert float_adds(res.proto) == float_adds(q)  # biases re-fitted in their own Adds, no new float Add
    logits = [r for r in res.recovery if r.method == "qk-logits"]
    assert logits and all(r.status == "skipped" and "activation quantizers" in r.reason for r in logits)
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2 for t in res.proto.graph.initializer)
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 for t in res.proto.graph.initializer)
    plain = prune(q, plan=res.plan)
    s_q, s_p, s_r = (runtime.session(m) for m in (q, plain.proto, res.proto))
    new = x[32:]
    ref = s_q.run(None, {name: new})[0]
    err = lambda s: float(np.linalg.norm(s.run(None, {name: new})[0] - ref) / np.linalg.norm(ref))  # noqa: E731
    assert err(s_r) < 0.5 * err(s_p), (err(s_r), err(s_p))

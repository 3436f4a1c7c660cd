"""onnxruntime's fused ops (com.microsoft): groups, the zero-contribution oracle,
MACs, and graphs put through ``onnxruntime.transformers.optimizer`` compared with
the same model before fusion."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import io
from onnxprune.core import metrics
from onnxprune.api import analyze, prune
from onnxprune.plan import Ratios
from onnxprune.rules import ort_fused
from onnxprune.api import verify

APPROX = "approximate (not tested)"
MS = "com.microsoft"
B, S, CIN = 1, 5, 8
_rng = np.random.default_rng(7)


def W(*shape):
    return (_rng.standard_normal(shape) * 0.5).astype(np.float32)


def ms(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs, domain=MS, name=op, **attrs)


def mm(name, a, w, out):
    return helper.make_node("MatMul", [a, w], [out], name=name)


def model(nodes, inits, extra_inputs=(), out_shape=(B, S, 4)):
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, CIN]), *extra_inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=8)


def live(job):
    out: dict[str, list] = {}
    for g in job.groups:
        if not g.frozen:
            out.setdefault(g.kind, []).append(g.width)
    return {k: sorted(v) for k, v in out.items()}


def rows_by_kind(rows):
    return {r.kind: r.status for r in rows if r.scope != "all exact groups"}


def check_oracle(m, kinds):
    rows = verify(m, Ratios.from_dict({"kinds": kinds}))
    assert rows, "oracle removed nothing"
    for r in rows:
        assert r.status in ("PASS", APPROX), (r.scope, r.status, r.max_rel_err)
    assert any(r.status == "PASS" for r in rows)
    return rows


def check_prune(m, kinds):
    res = prune(m, {"kinds": kinds})  # validate(): checker + ORT
    assert res.plan.keep
    assert res.after == metrics.count(res.proto)  # the estimate is the count of the rewritten model
    assert res.after["macs"] < res.before["macs"]
    return res


def attr_of(proto, op, name):
    n = next(n for n in proto.graph.node if n.op_type == op)
    return helper.get_attribute_value(next(a for a in n.attribute if a.name == name))


# -- SkipLayerNormalization and the Gelu family ---------------------------------------------
ACTS = {
    "BiasGelu": lambda: ([ms("BiasGelu", ["h", "b1"], ["a"])], {"b1": W(32)}),
    "FastGelu+bias": lambda: ([ms("FastGelu", ["h", "b1"], ["a"])], {"b1": W(32)}),
    "FastGelu": lambda: ([ms("FastGelu", ["h"], ["a"])], {}),
    "QuickGelu": lambda: ([ms("QuickGelu", ["h"], ["a"], alpha=1.702)], {}),
    "Gelu": lambda: ([ms("Gelu", ["h"], ["a"])], {}),
}
NORMS = {
    "SkipLayerNormalization": (["m", "s0", "gamma", "beta", "bias"], ["n", "", "", "s1"]),
    "SkipLayerNormalization-nobias": (["m", "s0", "gamma", "beta"], ["n"]),
    "SkipSimplifiedLayerNormalization": (["m", "s0", "gamma", "bias"], ["n", "", "", "s1"]),
}


def stream_model(norm="SkipLayerNormalization", act="BiasGelu"):
    """x -> [E] stream s0 -> fc1 (32) -> act -> fc2 -> Skip*Norm(fc2, s0) -> head (+ the sum output)."""
    ins, outs = NORMS[norm]
    act_nodes, inits = ACTS[act]()
    op = norm.split("-")[0]
    nodes = [mm("embed", "x", "we", "s0"), mm("fc1", "s0", "w1", "h"), *act_nodes, mm("fc2", "a", "w2", "m"),
             ms(op, ins, outs, epsilon=1e-5), mm("head", "n", "wo", "y0")]
    inits.update(we=W(CIN, 16), w1=W(16, 32), w2=W(32, 16), gamma=1 + W(16), beta=W(16), bias=W(16), wo=W(16, 4))
    if "s1" in outs:  # the residual stream leaves through the sum output too
        nodes += [mm("head2", "s1", "wo2", "y1"), helper.make_node("Add", ["y0", "y1"], ["y"])]
        inits["wo2"] = W(16, 4)
    else:
        nodes[-1].output[0] = "y"
    return model(nodes, inits)


@pytest.mark.parametrize("norm", list(NORMS))
def test_skip_layer_norm_is_the_residual_join(norm):
    m = stream_model(norm)
    job = analyze(m)
    assert live(job) == {"mlp": [32], "embed": [16]}
    (e,) = [g for g in job.groups if g.kind == "embed" and not g.frozen]
    assert not e.exact and {"residual", "norm"} <= e.space.tags
    slots = {t.slot for t in e.tensors if t.node.op_type == norm.split("-")[0]}
    assert slots == set(range(2, len(NORMS[norm][0])))  # gamma (beta) (bias)
    assert {(t.node.name, t.role) for t in e.tensors if t.node.op_type == "MatMul"} >= {
        ("embed", "out"), ("fc2", "out"), ("fc1", "in"), ("head", "in")}
    kinds = {"mlp": 0.5, "embed": 0.25}
    assert rows_by_kind(check_oracle(m, kinds)) == {"mlp": "PASS", "embed": APPROX}
    check_prune(m, kinds)


@pytest.mark.parametrize("act", list(ACTS))
def test_gelu_family_keeps_the_mlp_exact(act):
    m = stream_model(act=act)
    job = analyze(m)
    (g,) = [g for g in job.groups if g.kind == "mlp" and not g.frozen]
    assert g.width == 32 and g.exact
    has_bias = any(t.node.domain == MS and t.slot == 1 for t in g.tensors)
    assert has_bias == ("bias" in act.lower())
    assert rows_by_kind(check_oracle(m, {"mlp": 0.5})) == {"mlp": "PASS"}


def test_simplified_layer_norm_onnx_domain():
    """RMSNorm as ORT registers it in the ONNX domain: a norm over the stream."""
    nodes = [mm("embed", "x", "we", "s0"), helper.make_node("SimplifiedLayerNormalization", ["s0", "g"], ["n"], axis=-1, epsilon=1e-5),
             mm("fc1", "n", "w1", "h"), helper.make_node("Relu", ["h"], ["a"]), mm("fc2", "a", "w2", "y")]
    m = model(nodes, {"we": W(CIN, 16), "g": 1 + W(16), "w1": W(16, 32), "w2": W(32, 4)})
    job = analyze(m)
    assert live(job) == {"mlp": [16, 32]}
    (c,) = [g for g in job.groups if g.width == 16]
    assert not c.exact and any(t.node.op_type == "SimplifiedLayerNormalization" for t in c.tensors)
    rows = check_oracle(m, {"mlp": 0.5})
    assert sorted(r.status for r in rows if r.scope != "all exact groups") == ["PASS", APPROX]
    check_prune(m, {"mlp": 0.5})  # the checker rejects this ONNX-domain op: validate() checks it as contrib


def test_bias_add_and_ms_layer_norm_analysis_only():
    """BiasAdd and com.microsoft LayerNormalization have no CPU kernels in
    onnxruntime 1.32: analysis only (residual join, norm tag)."""
    nodes = [mm("embed", "x", "we", "s0"), mm("fc", "s0", "w1", "h"), ms("BiasAdd", ["h", "b", "s0"], ["s1"]),
             ms("LayerNormalization", ["s1", "g", "beta"], ["n"], axis=-1), mm("head", "n", "wo", "y")]
    m = model(nodes, {"we": W(CIN, 16), "w1": W(16, 16), "b": W(16), "g": 1 + W(16), "beta": W(16), "wo": W(16, 4)})
    job = analyze(m)
    assert live(job) == {"embed": [16]}
    (e,) = [g for g in job.groups if not g.frozen]
    assert {"residual", "norm"} <= e.space.tags
    assert {t.node.op_type for t in e.tensors} == {"MatMul", "BiasAdd", "LayerNormalization"}


def test_ms_simplified_layer_norm_and_onnx_domain_skip_simplified_analysis_only():
    """com.microsoft SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization in the
    ONNX domain (as ORT registers it too): a norm over the stream, and the residual join."""
    nodes = [mm("embed", "x", "we", "s0"), ms("SimplifiedLayerNormalization", ["s0", "g"], ["n0"], axis=-1, epsilon=1e-5),
             mm("fc", "n0", "w1", "h"), helper.make_node("SkipSimplifiedLayerNormalization", ["h", "s0", "g2"], ["n"], epsilon=1e-5),
             mm("head", "n", "wo", "y")]
    m = model(nodes, {"we": W(CIN, 16), "g": 1 + W(16), "w1": W(16, 16), "g2": 1 + W(16), "wo": W(16, 4)})
    job = analyze(m)
    assert live(job) == {"embed": [16]}
    (e,) = [g for g in job.groups if not g.frozen]
    assert {"residual", "norm"} <= e.space.tags
    assert {(t.node.domain, t.node.op_type) for t in e.tensors} >= {
        (MS, "SimplifiedLayerNormalization"), ("", "SkipSimplifiedLayerNormalization")}


# -- com.microsoft::Attention (packed q/k/v weight) ------------------------------------------
H, D = 2, 4


def attention_model(mask=False, attn_bias=False, past=False, scale=None):
    ins = ["s", "wqkv", "bqkv", "mask" if mask else ""]
    extra = [helper.make_tensor_value_info("mask", TensorProto.INT32, [B, S])] if mask else []
    inits = {"win": W(CIN, 16), "wqkv": W(16, 3 * H * D), "bqkv": W(3 * H * D), "wo": W(H * D, 4)}
    if past:
        ins += ["past"]
        extra.append(helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, B, H, 3, D]))
    if attn_bias:
        ins += ["", "ab"] if not past else ["ab"]
        inits["ab"] = W(1, H, S, S)
    attrs = {"num_heads": H} if scale is None else {"num_heads": H, "scale": scale}
    outs = ["o", "present"] if past else ["o"]
    nodes = [mm("proj_in", "x", "win", "s"), ms("Attention", ins, outs, **attrs), mm("proj_out", "o", "wo", "y")]
    return model(nodes, inits, extra)


@pytest.mark.parametrize("mask,attn_bias", [(False, False), (True, False), (False, True)], ids=["plain", "mask_index", "attention_bias"])
def test_packed_attention(mask, attn_bias):
    m = attention_model(mask, attn_bias)
    job = analyze(m)
    assert live(job) == {"channels": [16], "heads": [H], "head_dim": [D, D]}
    (node,) = [n for n in job.model.graph if n.op_type == "Attention"]
    # pinned at load: the original scale, and explicit q/k/v widths (v head dim prunes apart)
    assert node.attributes["scale"].value == pytest.approx(1 / math.sqrt(D))
    assert list(node.attributes["qkv_hidden_sizes"].value) == [H * D] * 3
    (heads,) = [g for g in job.groups if g.kind == "heads"]
    assert {(a.node.op_type, a.attr) for a in heads.attrs} == {("Attention", "num_heads"), ("Attention", "qkv_hidden_sizes")}
    if attn_bias:
        assert any(t.value.name == "ab" and t.axis == 1 for t in heads.tensors)
    kinds = {"heads": 0.5, "head_dim": 0.5, "channels": 0.5}
    assert rows_by_kind(check_oracle(m, kinds)) == {"heads": "PASS", "head_dim": "PASS", "channels": "PASS"}
    res = check_prune(m, kinds)
    assert attr_of(res.proto, "Attention", "num_heads") == 1
    assert attr_of(res.proto, "Attention", "qkv_hidden_sizes") == [2, 2, 2]


def test_packed_attention_macs():
    """Projection + QK^T + AV, as the unfused MatMuls count them."""
    m = attention_model()
    per_node = Counter()
    for t in metrics.terms(m):
        if t.metric == "macs":
            per_node[t.node] += t.value
    assert per_node[1] == B * S * 16 * 3 * H * D + 2 * B * S * S * H * D


def test_attention_kv_cache_is_frozen_with_a_reason():
    m = attention_model(past=True)
    job = analyze(m)
    assert "heads" not in live(job) and "head_dim" not in live(job)
    assert any("KV cache" in r for g in job.groups for r in g.frozen)


def test_attention_scale_must_be_pinned(monkeypatch):
    """Without the load-time pin, q/k head dims are frozen; claiming them exact
    anyway makes the oracle fail (the default scale follows the pruned D)."""
    from onnxprune.io import passes

    monkeypatch.setattr(passes, "_pin_ms_attention", lambda node: 0)
    m = attention_model()
    job = analyze(m)
    (qd,) = [g for g in job.groups if g.kind == "head_dim"]  # q, k, v share D without qkv_hidden_sizes
    assert qd.frozen and any("scale" in r for r in qd.frozen)
    monkeypatch.setattr(ort_fused, "_scale_pinned", lambda ctx, node: True)
    rows = verify(m, Ratios.from_dict({"kinds": {"head_dim": 0.5}}))
    assert rows_by_kind(rows) == {"head_dim": "FAIL"}


# -- MultiHeadAttention and GroupQueryAttention ---------------------------------------------
def mha_model(bias=True, padding_mask=False):
    dv = 3
    ins = ["q", "k", "v", "bias" if bias else "", "kpm" if padding_mask else ""]
    extra = [helper.make_tensor_value_info("kpm", TensorProto.INT32, [B, S])] if padding_mask else []
    inits = {"wq": W(CIN, H * D), "wk": W(CIN, H * D), "wv": W(CIN, H * dv), "bias": W(2 * H * D + H * dv), "wo": W(H * dv, 4)}
    nodes = [mm("q", "x", "wq", "q"), mm("k", "x", "wk", "k"), mm("v", "x", "wv", "v"),
             ms("MultiHeadAttention", ins, ["o"], num_heads=H), mm("out", "o", "wo", "y")]
    return model(nodes, inits, extra)


@pytest.mark.parametrize("bias,padding_mask", [(True, False), (False, True)], ids=["bias", "key_padding_mask"])
def test_multi_head_attention(bias, padding_mask):
    m = mha_model(bias, padding_mask)
    job = analyze(m)
    assert live(job) == {"heads": [H], "head_dim": [3, D]}
    (n,) = [n for n in job.model.graph if n.op_type == "MultiHeadAttention"]
    assert n.attributes["scale"].value == pytest.approx(1 / math.sqrt(D))
    kinds = {"heads": 0.5, "head_dim": 0.5}
    assert rows_by_kind(check_oracle(m, kinds)) == {"heads": "PASS", "head_dim": "PASS"}
    res = check_prune(m, kinds)
    assert attr_of(res.proto, "MultiHeadAttention", "num_heads") == 1
    macs = sum(t.value for t in metrics.terms(m) if t.metric == "macs" and t.node == 3)
    assert macs == B * S * S * (H * D + H * 3)  # QK^T + AV


def gqa_model(past=False, attn_bias=False):
    nq, nkv, d = 4, 2, 8
    ins = ["q", "k", "v", "pk" if past else "", "pv" if past else "", "sl", "tl"]
    extra = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, nkv, 2, d]) for n in ("pk", "pv")] if past else []
    inits = {"wq": W(CIN, nq * d), "wk": W(CIN, nkv * d), "wv": W(CIN, nkv * d), "wo": W(nq * d, 4),
             "sl": np.array([S - 1], np.int32), "tl": np.array(S, np.int32)}
    if attn_bias:
        ins += ["", "", "", "ab"]
        inits["ab"] = W(1, nq, S, S)
    nodes = [mm("q", "x", "wq", "q"), mm("k", "x", "wk", "k"), mm("v", "x", "wv", "v"),
             ms("GroupQueryAttention", ins, ["o", "present_k", "present_v"], num_heads=nq, kv_num_heads=nkv),
             mm("out", "o", "wo", "y")]
    return model(nodes, inits, extra)


@pytest.mark.parametrize("attn_bias", [False, True], ids=["plain", "attention_bias"])
def test_group_query_attention_prunes_whole_kv_groups(attn_bias):
    m = gqa_model(attn_bias=attn_bias)
    job = analyze(m)
    assert live(job) == {"heads": [2]}  # two KV groups of two query heads each
    if attn_bias:  # a per-query-head bias follows its KV group
        (g,) = [g for g in job.groups if g.kind == "heads" and not g.frozen]
        assert any(t.value.name == "ab" and t.axis == 1 for t in g.tensors)
    frozen = {r for g in job.groups if g.frozen for r in g.frozen}
    assert any("KV group" in r for r in frozen) and any("multiple of 8" in r for r in frozen)
    assert rows_by_kind(check_oracle(m, {"heads": 0.5})) == {"heads": "PASS"}
    res = check_prune(m, {"heads": 0.5})
    assert (attr_of(res.proto, "GroupQueryAttention", "num_heads"), attr_of(res.proto, "GroupQueryAttention", "kv_num_heads")) == (2, 1)


def test_group_query_attention_kv_cache_is_frozen():
    job = analyze(gqa_model(past=True))
    assert "heads" not in live(job)
    assert any("KV cache" in r for g in job.groups for r in g.frozen)


# -- end to end: onnxruntime's transformer optimizer -------------------------------------------
def _ops(path):
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in onnx.load(path).graph.node)


def _bert(torch):
    """Embeddings (word + position + token type) + LayerNorm, post-LN encoder
    layers with separate q/k/v, an additive mask and a GELU MLP, a pooler."""

    class Bert(torch.nn.Module):
        def __init__(self, vocab=50, c=32, h=4, layers=2, s=8, f=64):
            super().__init__()
            self.h, self.d = h, c // h
            self.we, self.pe, self.te = torch.nn.Embedding(vocab, c), torch.nn.Embedding(s, c), torch.nn.Embedding(2, c)
            self.ln0 = torch.nn.LayerNorm(c)
            self.layers = torch.nn.ModuleList()
            for _ in range(layers):
                blk = torch.nn.Module()
                for n, (i, o) in dict(q=(c, c), k=(c, c), v=(c, c), o=(c, c), f1=(c, f), f2=(f, c)).items():
                    setattr(blk, n, torch.nn.Linear(i, o))
                blk.ln1, blk.ln2 = torch.nn.LayerNorm(c), torch.nn.LayerNorm(c)
                self.layers.append(blk)
            self.pool = torch.nn.Linear(c, c)

        def _heads(self, t):
            return t.view(t.shape[0], t.shape[1], self.h, self.d).permute(0, 2, 1, 3)

        def forward(self, ids, mask, tt):
            pos = torch.arange(ids.shape[1], dtype=torch.long).unsqueeze(0)
            x = self.ln0(self.we(ids) + self.pe(pos) + self.te(tt))
            ext = (1.0 - mask[:, None, None, :].to(torch.float32)) * -10000.0
            for blk in self.layers:
                q, k, v = self._heads(blk.q(x)), self._heads(blk.k(x)), self._heads(blk.v(x))
                a = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d) + ext, -1)
                c = torch.matmul(a, v).permute(0, 2, 1, 3).contiguous()
                x = blk.ln1(blk.o(c.view(c.shape[0], c.shape[1], -1)) + x)
                x = blk.ln2(blk.f2(torch.nn.functional.gelu(blk.f1(x))) + x)
            return self.pool(x[:, 0])

    return Bert()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import warnings

    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from onnxruntime.transformers.optimizer import optimize_model
    from timm_models import randomize

    warnings.filterwarnings("ignore")
    d = tmp_path_factory.mktemp("ortfused")
    out = {}
    vit = randomize(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), seed=2)
    out["vit"] = str(d / "vit.onnx")
    torch.onnx.export(vit, (torch.randn(1, 3, 32, 32),), out["vit"], dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    bert = randomize(_bert(torch), seed=3)
    ids = torch.randint(0, 50, (2, 8))
    out["bert"] = str(d / "bert.onnx")
    torch.onnx.export(bert, (ids, torch.ones_like(ids), torch.zeros_like(ids)), out["bert"], dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["out"],
                      dynamic_axes={n: {0: "batch"} for n in ("input_ids", "attention_mask", "token_type_ids", "out")})
    from onnxruntime.transformers.fusion_options import FusionOptions

    mha = FusionOptions("bert")
    mha.use_multi_head_attention = True
    for name, kind, heads, width, level, opts in (("vit", "vit", 3, 192, 1, None), ("vit", "vit", 3, 192, 2, None),
                                                  ("bert", "bert", 4, 32, 1, None), ("bert", "bert", 4, 32, 2, None),
                                                  ("bert", "bert", 4, 32, 1, mha)):
        tag = f"{name}_{'mha' if opts else f'o{level}'}"
        out[tag] = str(d / f"{tag}.onnx")
        optimize_model(out[name], model_type=kind, num_heads=heads, hidden_size=width, opt_level=level,
                       optimization_options=opts).save_model_to_file(out[tag])
    return out


E2E = {  # optimised graph: the fused ops it must contain (what onnxruntime 1.32 emits)
    "vit_o1": {"com.microsoft::SkipLayerNormalization", "com.microsoft::Gelu"},
    "vit_o2": {"com.microsoft::SkipLayerNormalization", "com.microsoft::BiasGelu"},
    "bert_o1": {"com.microsoft::EmbedLayerNormalization", "com.microsoft::Attention", "com.microsoft::SkipLayerNormalization",
                "com.microsoft::BiasGelu"},
    "bert_o2": {"com.microsoft::EmbedLayerNormalization", "com.microsoft::SkipLayerNormalization", "com.microsoft::BiasGelu"},
    "bert_mha": {"com.microsoft::EmbedLayerNormalization", "com.microsoft::MultiHeadAttention",
                 "com.microsoft::SkipLayerNormalization", "com.microsoft::BiasGelu"},
}
E2E_KINDS = {"heads": 0.5, "head_dim": 0.25, "mlp": 0.5, "embed": 0.25}


@pytest.mark.parametrize("name", list(E2E))
def test_optimised_graph_prunes_like_the_original(exported, name):
    ops = _ops(exported[name])
    assert E2E[name] <= set(ops), ops
    base = exported[name.split("_")[0]]
    before, after = analyze(base), analyze(exported[name])
    assert live(after) == live(before)  # same heads / head_dim / mlp / embed groups as before fusion
    assert not after.ctx.unhandled and not any("no rule" in r for g in after.groups for r in g.frozen)
    m0, m1 = metrics.count(io.read_proto(base)), metrics.count(io.read_proto(exported[name]))
    assert abs(m1["macs"] - m0["macs"]) <= 0.01 * m0["macs"]
    rows = verify(io.read_proto(exported[name]), Ratios.from_dict({"kinds": E2E_KINDS}))
    assert rows_by_kind(rows) == {"heads": "PASS", "head_dim": "PASS", "mlp": "PASS", "embed": APPROX}
    assert rows[-1].status == "PASS"
    res = prune(exported[name], {"kinds": E2E_KINDS})
    assert res.checks["checker"] == "ok" and res.after == metrics.count(res.proto)
    assert res.after == prune(base, {"kinds": E2E_KINDS}).after  # same plan size, same pruned cost


def test_embed_layer_norm_starts_the_residual_stream():
    # ids -> EmbedLayerNormalization (word + position tables, gamma, beta) -> an MLP whose
    # output joins it in a SkipLayerNormalization -> head: the embedding width is the stream,
    # its tables' column axis and gamma/beta are members
    H, V = 16, 11
    nodes = [ms("EmbedLayerNormalization", ["ids", "", "word", "pos", "", "gamma", "beta"], ["e", "mask_index"], epsilon=1e-5),
             mm("fc1", "e", "w1", "h"), helper.make_node("Relu", ["h"], ["r"]), mm("fc2", "r", "w2", "f"),
             ms("SkipLayerNormalization", ["e", "f", "g2", "b2"], ["n"], epsilon=1e-5),
             mm("head", "n", "wh", "y")]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, [B, S])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, 4])],
        [numpy_helper.from_array(v, k) for k, v in
         {"word": W(V, H), "pos": W(S, H), "gamma": W(H), "beta": W(H), "w1": W(H, 8), "w2": W(8, H),
          "g2": W(H), "b2": W(H), "wh": W(H, 4)}.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=8)
    job = analyze(m)
    (e,) = [g for g in job.groups if not g.frozen and g.kind == "embed"]
    assert e.width == H and {"residual", "norm"} <= e.space.tags
    emb = sorted((t.slot, t.axis) for t in e.tensors if t.node.op_type == "EmbedLayerNormalization")
    assert emb == [(2, 1), (3, 1), (5, 0), (6, 0)]
    assert {(t.node.name, t.role) for t in e.tensors if t.node.op_type == "MatMul"} == {
        ("fc1", "in"), ("fc2", "out"), ("head", "in")}
    res = check_prune(m, {"embed": 0.25})
    w = {i.name: numpy_helper.to_array(i) for i in res.proto.graph.initializer}
    assert w["word"].shape == (V, 12) and w["pos"].shape == (S, 12) and w["wh"].shape == (12, 4)


@pytest.mark.parametrize("name,op", [("bert_o1", "Attention"), ("bert_mha", "MultiHeadAttention")])
def test_recover_refits_the_fused_attention_logits(exported, name, op):
    """--recover on onnxruntime-optimised BERTs: with head dims gone, q and k
    are re-fitted jointly for the logits inside the fused op (the packed
    Attention's own projection, or MultiHeadAttention's inputs with its packed
    bias), and the model is closer to the original on inputs no fit saw than
    with q and k re-fitted column by column."""
    from onnxprune import runtime
    from onnxprune.recover import format_rows, recover

    path = exported[name]
    rng = np.random.default_rng(5)

    def feeds(n, batch=16):
        return [{"input_ids": rng.integers(0, 50, (batch, 8)).astype(np.int64),
                 "attention_mask": np.ones((batch, 8), np.int64),
                 "token_type_ids": rng.integers(0, 2, (batch, 8)).astype(np.int64)} for _ in range(n)]

    calib, held = feeds(6), feeds(3)
    original = io.read_proto(path)
    sess = runtime.session(original)
    need = {i.name: i.type.tensor_type.elem_type for i in original.graph.input}
    cast = lambda fd: {k: v.astype(np.int32) if need[k] == TensorProto.INT32 else v for k, v in fd.items()}  # noqa: E731
    calib, held = [cast(f) for f in calib], [cast(f) for f in held]
    res = prune(path, {"kinds": {"head_dim": 0.5}, "importance": "l2"})
    kw = dict(progress=False, rows_per_batch=2048)
    sep, _ = recover(original, res.proto, res.analyzed.ctx, res.plan.keep, calib, attention_logits=False, **kw)
    joint, rows = recover(original, res.proto, res.analyzed.ctx, res.plan.keep, calib, **kw)
    logit_rows = [r for r in rows if r.method == "qk-logits"]
    assert len(logit_rows) == 2 and {r.op for r in logit_rows} == {op}, format_rows(rows)
    assert all(r.status == "refit" and r.held_after < r.held_before for r in logit_rows), format_rows(rows)

    def err(proto):
        s = runtime.session(proto)
        num = den = 0.0
        for fd in held:
            y0, y = sess.run(None, fd)[0], s.run(None, fd)[0]
            num, den = num + float(((y - y0) ** 2).sum()), den + float(((y0 - y0.mean(0)) ** 2).sum())
        return num / den

    e_pruned, e_sep, e_joint = err(res.proto), err(sep), err(joint)
    print(format_rows(rows), e_pruned, e_sep, e_joint)
    assert e_joint < e_sep < e_pruned, (e_pruned, e_sep, e_joint)

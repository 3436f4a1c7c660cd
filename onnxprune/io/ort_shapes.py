"""Output shapes of onnxruntime's fused ops (com.microsoft), which ONNX shape
inference does not know.

:func:`infer_contrib` alternates ONNX shape inference with these functions
until the fused ops' outputs stop changing: ONNX keeps the value infos it is
given, so each round carries shapes one fused op further. Only the outputs
the rules in :mod:`onnxprune.rules.ort_fused` read are inferred; KV-cache
outputs are left unknown (those nodes are frozen anyway).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

MS = "com.microsoft"
# ORT registers these contrib ops in the ONNX domain as well
DEFAULT_DOMAIN_CONTRIB = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}

def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _reduced(dims, axis):
    axis = axis % len(dims)
    return dims[:axis] + [1] * (len(dims) - axis)


def _shapes(node, ins, inits):
    """``[(elem_type, dims) | None]`` per output; ``ins`` maps input slot -> (type, dims)."""
    op = node.op_type
    x = ins.get(0)
    if op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
        if x is None:
            return []
        red = (TensorProto.FLOAT, x[1][:-1] + [1])
        return [x, red, red, x]
    if op in ("LayerNormalization", "SimplifiedLayerNormalization"):
        if x is None:
            return []
        red = (TensorProto.FLOAT, _reduced(x[1], int(_attr(node, "axis", -1))))
        return [x, red, red]
    if op in ("BiasGelu", "FastGelu", "QuickGelu", "Gelu", "BiasAdd"):
        return [x] if x is not None else []
    if op == "EmbedLayerNormalization":
        ids, w = ins.get(0), inits.get(node.input[2]) if len(node.input) > 2 else None
        if ids is None or w is None:
            return []
        out = (w.data_type, ids[1] + [w.dims[1]])
        return [out, (TensorProto.INT32, ids[1][:1]), out]
    if op == "Attention":
        w = inits.get(node.input[1]) if len(node.input) > 1 else None
        if x is None or w is None or len(x[1]) != 3:
            return []
        sizes = _attr(node, "qkv_hidden_sizes")
        hv = sizes[2] if sizes else w.dims[1] // 3
        return [(x[0], x[1][:2] + [hv])]
    if op == "MultiHeadAttention":
        v = ins.get(2)
        if x is None or v is None or len(x[1]) != 3 or len(v[1]) != 3:
            return []
        return [(x[0], x[1][:2] + [v[1][2]])]
    if op == "GroupQueryAttention":
        if x is None or len(x[1]) != 3:
            return []
        nq, nkv = int(_attr(node, "num_heads", 0)), int(_attr(node, "kv_num_heads", 0))
        width = x[1][2]
        has_kv = len(node.input) > 1 and node.input[1]
        if not nq or not isinstance(width, int):
            return []
        d = width // nq if has_kv else width // (nq + 2 * nkv)
        return [(x[0], x[1][:2] + [nq * d])]
    return []


def is_contrib(node: onnx.NodeProto) -> bool:
    return node.domain == MS or (node.domain in ("", "ai.onnx") and node.op_type in DEFAULT_DOMAIN_CONTRIB)


def _known(proto: onnx.ModelProto) -> dict:
    out = {}
    g = proto.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            out[vi.name] = (tt.elem_type, dims)
    for t in g.initializer:
        out[t.name] = (t.data_type, list(t.dims))
    return out


def contrib_infos(proto: onnx.ModelProto) -> dict:
    """Value infos of fused-op outputs computed from what ``proto`` knows now."""
    known = _known(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    out: dict = {}
    for node in proto.graph.node:
        if not is_contrib(node):
            continue
        ins = {i: known[n] for i, n in enumerate(node.input) if n and n in known}
        for o, res in zip(node.output, _shapes(node, ins, inits)):
            if o and res is not None:
                out[o] = helper.make_tensor_value_info(o, res[0], res[1])
                known[o] = res
    return out


def infer_contrib(proto: onnx.ModelProto, infer_once) -> onnx.ModelProto:
    """``infer_once`` (ONNX shape inference, which keeps given value infos) with the
    fused ops' outputs filled in, repeated until those stop changing."""
    if not any(is_contrib(n) for n in proto.graph.node):
        return infer_once(proto)
    out = infer_once(proto)
    infos: dict = {}
    for _ in range(len(proto.graph.node) + 1):
        new = contrib_infos(out)
        if new == infos:
            break
        infos = new
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(infos.values())
        out = infer_once(proto)
    del proto.graph.value_info[:]
    return out

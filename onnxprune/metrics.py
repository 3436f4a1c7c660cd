"""Params and MACs from an ONNX graph with inferred shapes.

MACs count Conv, ConvTranspose, Gemm, MatMul (activation x activation
included) and Attention at batch 1: symbolic input dimensions are set to 1 before shape
inference, so derived dims (batch x windows, batch x heads) come out exact. Params count the
elements of floating-point initializers per use (exporters deduplicate equal
tensors, so a file can hold fewer distinct tensors than the model has weights).
"""
from __future__ import annotations

from math import prod

import onnx


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    g = proto.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    for init in g.initializer:
        out[init.name] = list(init.dims)
    return out


def count(proto: onnx.ModelProto) -> dict[str, int]:
    """``{"params": ..., "macs": ...}`` of a model (shapes inferred on a copy at batch 1)."""
    from .io import infer

    p = onnx.ModelProto()
    p.CopyFrom(proto)
    for i in p.graph.input:
        for d in i.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = 1
    p = infer(p)
    shapes = _shapes(p)
    inits = {i.name: i for i in p.graph.initializer}
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    params = 0
    macs = 0
    for n in p.graph.node:
        for i in n.input:
            t = inits.get(i)
            if t is not None and t.data_type in floating and prod(t.dims) > 1:
                params += prod(t.dims)
        if n.op_type in ("Conv", "ConvTranspose"):
            w = shapes.get(n.input[1])
            y = shapes.get(n.output[0])
            x = shapes.get(n.input[0])
            if not w or not y or not x:
                continue
            if n.op_type == "Conv":
                macs += prod(y) * prod(w[1:])
            else:
                macs += prod(x) * prod(w[1:])
        elif n.op_type == "Gemm":
            a, y = shapes.get(n.input[0]), shapes.get(n.output[0])
            if not a or not y:
                continue
            trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[1]
            macs += prod(y) * k
        elif n.op_type == "Attention":
            q, k, v = (shapes.get(x) for x in n.input[:3])
            if q and k and v:  # QK^T and AV: q rows x kv length x (D + Dv)
                macs += prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
        elif n.op_type == "MatMul":
            a, y = shapes.get(n.input[0]), shapes.get(n.output[0])
            if not a or not y:
                continue
            macs += prod(y) * a[-1]
    return {"params": int(params), "macs": int(macs)}


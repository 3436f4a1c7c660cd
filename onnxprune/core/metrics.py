"""Params and MACs from an ONNX graph with inferred shapes.

MACs count Conv, ConvTranspose, Gemm, MatMul (activation x activation
included) and Attention at batch 1: symbolic input dimensions are set to 1 before shape
inference, so derived dims (batch x windows, batch x heads) come out exact. Params count the
elements of floating-point initializers per use (exporters deduplicate equal
tensors, so a file can hold fewer distinct tensors than the model has weights).

Both are sums of products of tensor dimensions (:func:`terms`). Each factor
names the axis it comes from, so :mod:`onnxprune.budget` can re-evaluate the
same sums for a plan without rewriting the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import onnx

FLOATING = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
# quantized weights count as params too (int8/uint8/int4 tensors are weights, never shape constants)
WEIGHT_TYPES = FLOATING | {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
# quantized ops with the float op's cost: (float op, weight input slot, data input slot)
QUANTIZED = {"ConvInteger": ("Conv", 1, 0), "QLinearConv": ("Conv", 3, 0),
             "MatMulInteger": ("MatMul", 1, 0), "QLinearMatMul": ("MatMul", 3, 0)}


@dataclass(frozen=True)
class Factor:
    """One dimension of a cost term: ``dim`` at batch 1, read from axis ``axis``
    of the node's input ``slot`` (``io == "in"``) or output ``slot`` (``"out"``).
    ``ref`` is None for a constant factor (kernel size, ...)."""

    dim: int
    ref: tuple | None  # ("in"|"out", slot, axis), or ("x", name, 0): a width the node's rule named


@dataclass(frozen=True)
class Term:
    node: int  # index of the node in graph order
    metric: str  # "params" | "macs"
    factors: tuple

    @property
    def value(self) -> int:
        return prod(f.dim for f in self.factors)


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    g = proto.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    for init in g.initializer:
        out[init.name] = list(init.dims)
    return out


def _axes(shape: list[int], io: str, slot: int, axes=None) -> list[Factor]:
    axes = range(len(shape)) if axes is None else axes
    return [Factor(shape[a], (io, slot, a)) for a in axes]


def _unknown_layer_shapes(p: onnx.ModelProto) -> bool:
    """True when a layer's output has a dim shape inference could not make static."""
    vis = {v.name: v for v in list(p.graph.value_info) + list(p.graph.output)}
    for n in p.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.output:
            v = vis.get(n.output[0])
            if v is None or not v.type.tensor_type.HasField("shape") or any(
                    not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim):
                return True
    return False


def terms(proto: onnx.ModelProto) -> list[Term]:
    """Every params and MACs term of a model (shapes inferred on a copy at batch 1)."""
    from onnxprune.io import infer

    p = onnx.ModelProto()
    p.CopyFrom(proto)
    for i in p.graph.input:
        for d in i.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = 1
    p = infer(p)
    shapes = _shapes(p)
    if _unknown_layer_shapes(p):  # shapes computed at run time (Shape -> Slice -> Pad ...): fold them, then infer
        from onnxprune.io import skeleton, to_ir

        try:
            # only the shapes come from the folded copy: the terms stay on this
            # model's own nodes (their index is the node's place in the graph,
            # which folding changes)
            shapes.update(_shapes(infer(skeleton(to_ir(p)))))
        except Exception:  # noqa: BLE001 - e.g. a dim no folding makes static: count with what inference gave
            pass
    inits = {i.name: i for i in p.graph.initializer}
    out: list[Term] = []
    for k, n in enumerate(p.graph.node):
        for slot, i in enumerate(n.input):
            t = inits.get(i)
            if t is not None and t.data_type in WEIGHT_TYPES and prod(t.dims) > 1:
                out.append(Term(k, "params", tuple(_axes(list(t.dims), "in", slot))))
        f = None
        op, wslot, xslot = QUANTIZED.get(n.op_type, (n.op_type, 1, 0))
        if op in ("Conv", "ConvTranspose") and len(n.input) > wslot:
            w, y, x = (shapes.get(v) for v in (n.input[wslot], n.output[0], n.input[xslot]))
            if w and y and x:
                # Conv: every output element x (C_in/groups x kernel); ConvTranspose: every input element
                f = (_axes(y, "out", 0) if op == "Conv" else _axes(x, "in", xslot))
                f += [Factor(w[1], ("in", wslot, 1))] + [Factor(d, None) for d in w[2:]]
        elif n.op_type == "Gemm":
            a, y = shapes.get(n.input[0]), shapes.get(n.output[0])
            if a and y:
                trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
                f = _axes(y, "out", 0) + _axes(a, "in", 0, [0 if trans_a else 1])
        elif n.domain == "com.microsoft":
            out.extend(_ms_terms(k, n, shapes, inits))
        elif n.op_type == "Attention":
            q, k_, v = (shapes.get(x) for x in n.input[:3])
            if q and k_ and v and len(q) == 4 and len(k_) == 4 and len(v) == 4:
                # QK^T and AV: B x H x q rows x kv length x (D + Dv)
                qk = _axes(q, "in", 0, [0, 1, 2]) + _axes(k_, "in", 1, [2])
                out.append(Term(k, "macs", tuple(qk + _axes(q, "in", 0, [3]))))
                out.append(Term(k, "macs", tuple(qk + _axes(v, "in", 2, [3]))))
            elif q and k_ and v:  # 3-D form: heads folded into the width
                out.append(Term(k, "macs", tuple([Factor(prod(q[:-1]), None), Factor(k_[-2], None), Factor(q[-1] + v[-1], None)])))
        elif op == "MatMul":
            a, y = shapes.get(n.input[xslot]), shapes.get(n.output[0])
            if a and y:
                f = _axes(y, "out", 0) + _axes(a, "in", xslot, [len(a) - 1])
        elif op == "Einsum":
            f = _einsum_factors(n, shapes)
        if f is not None:
            out.append(Term(k, "macs", tuple(f)))
    return out


def _einsum_factors(n: onnx.NodeProto, shapes: dict) -> list[Factor] | None:
    """An Einsum's MACs: the product of every index's size (each multiply-add
    once), each index counted at its first operand axis."""
    from onnxprune.core.dims import einsum_terms

    eq = next((a.s.decode() for a in n.attribute if a.name == "equation"), "")
    got = einsum_terms(eq, len(n.input))
    ins = [shapes.get(x) for x in n.input]
    if got is None or any(s is None or len(s) != len(t) for s, t in zip(ins, got[0])):
        return None
    seen: dict[str, Factor] = {}
    for slot, (shape, t) in enumerate(zip(ins, got[0])):
        for axis, c in enumerate(t):
            seen.setdefault(c, Factor(shape[axis], ("in", slot, axis)))
    return list(seen.values())


def _ms_terms(k: int, n: onnx.NodeProto, shapes: dict, inits: dict) -> list[Term]:
    """onnxruntime's fused attention: the packed projection (``Attention``) and
    QK^T + AV, B x S x T x (q width + v width) (as the unfused MatMuls count)."""
    ins = [shapes.get(x) if x else None for x in n.input]
    x = ins[0] if ins else None
    if n.op_type not in ("Attention", "MultiHeadAttention", "GroupQueryAttention") or not x or len(x) != 3:
        return []
    bs = _axes(x, "in", 0, [0, 1])
    if n.op_type == "Attention":
        w = ins[1] if len(ins) > 1 else None
        if not w or len(w) != 2:
            return []
        sizes = next((list(a.ints) for a in n.attribute if a.name == "qkv_hidden_sizes"), None) or [w[1] // 3] * 3
        past = ins[4] if len(ins) > 4 and ins[4] and len(ins[4]) == 5 else None
        t = Factor(x[1] + (past[3] if past else 0), None)
        return [Term(k, "macs", tuple(bs + [Factor(w[0], ("in", 1, 0)), Factor(w[1], ("in", 1, 1))])),
                Term(k, "macs", tuple(bs + [t, Factor(sizes[0], ("x", "q", 0))])),
                Term(k, "macs", tuple(bs + [t, Factor(sizes[2], ("x", "v", 0))]))]
    key, val = (ins[1], ins[2]) if len(ins) > 2 else (None, None)
    if not key or not val or len(key) != 3 or len(val) != 3:
        return []
    past_slot = 3 if n.op_type == "GroupQueryAttention" else 6  # past_key [B, kv heads, P, D]
    past = ins[past_slot] if len(ins) > past_slot else None
    t = Factor(key[1] + (past[2] if past and len(past) == 4 else 0), None)
    if n.op_type == "MultiHeadAttention":
        return [Term(k, "macs", tuple(bs + [t, Factor(x[2], ("in", 0, 2))])),
                Term(k, "macs", tuple(bs + [t, Factor(val[2], ("in", 2, 2))]))]
    # GQA: every query head reads its group's keys and values (head dim D)
    return [Term(k, "macs", tuple(bs + [t, Factor(x[2], ("in", 0, 2))])) for _ in range(2)]


def count(proto: onnx.ModelProto) -> dict[str, int]:
    """``{"params": ..., "macs": ...}`` of a model at batch 1."""
    ts = terms(proto)
    return {m: int(sum(t.value for t in ts if t.metric == m)) for m in ("params", "macs")}

"""QDQ quantization: QuantizeLinear / DequantizeLinear.

A quantized *weight* (DequantizeLinear of a constant) is seen by the other rules
as a constant: :meth:`RuleContext.const` dequantizes it and :meth:`RuleContext.member`
binds its members to the integer tensor (and to per-channel scale and zero
point), so Conv/Gemm/MatMul need nothing special. On activations both ops pass
channels through; a per-channel scale or zero point along the channel axis is
a member of that channel's group.
"""
from __future__ import annotations

import onnx_ir as ir

from onnxprune.core.analysis import PARAM, RuleContext
from onnxprune.core.registry import Registry

RULES = Registry()


@RULES.rule("QuantizeLinear", "DequantizeLinear")
@RULES.rule("QuantizeLinear", "DequantizeLinear", domain="com.microsoft")
def qdq(ctx: RuleContext, node: ir.Node) -> None:
    if node.op_type == "DequantizeLinear" and ctx.quantized_weight(node.outputs[0]) is node:
        return  # a quantized weight: its consumers own its members
    lay = ctx.layout(node, 0)
    if lay is None:
        ctx.freeze_node(node, "unknown rank")
        return
    axis = int(ctx.attr(node, "axis", 1)) % max(len(lay), 1)
    for slot in (1, 2):
        v = node.inputs[slot] if slot < len(node.inputs) else None
        if v is None:
            continue
        p = ctx.const(v)
        if p is None:
            ctx.freeze_node(node, f"{node.op_type} with a run-time scale or zero point")
            return
        if p.ndim > 1:
            ctx.freeze_node(node, f"{node.op_type} with blocked scales")
            return
        if p.size > 1:
            ctx.member(node, slot, 0, lay[axis], PARAM)
    ctx.set_layout(node.outputs[0], lay)

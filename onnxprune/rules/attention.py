"""The ONNX ``Attention`` op (opset 23): q/k/v heads tied, q/k head dims tied.

4-D inputs are ``[B, H, S, D]``; 3-D inputs ``[B, S, H*D]`` are factorised by
``q_num_heads`` / ``kv_num_heads`` (rewritten with the heads). The default
scale ``1/sqrt(D)`` is pinned to its original value at load
(``io.pin_attention_scale``), so pruning head dims keeps what the weights expect.
Grouped-query attention (fewer kv heads) and KV-cache inputs are frozen.
"""
from __future__ import annotations

import onnx_ir as ir

from onnxprune.core.analysis import RuleContext
from onnxprune.core.registry import Registry

RULES = Registry()


@RULES.rule("Attention")
def attention(ctx: RuleContext, node: ir.Node) -> None:
    lays = [ctx.layout(node, k) for k in range(3)]
    if any(lay is None for lay in lays) or len(node.inputs) > 4 or any(o.uses() for o in node.outputs[1:]):
        ctx.freeze_node(node, "Attention with KV cache or unknown ranks")
        return
    q, k, v = lays
    t = ctx.spaces
    if len(q) == 4:
        qh, qd, kh, kd, vh, vd = q[1], q[3], k[1], k[3], v[1], v[3]
    elif len(q) == 3:
        nq = int(ctx.attr(node, "q_num_heads", 0))
        nkv = int(ctx.attr(node, "kv_num_heads", 0))
        dq, dk, dv = (ctx.dims(node.inputs[i])[-1] for i in range(3))
        if not nq or nq != nkv or None in (dq, dk, dv) or q[2] is None or k[2] is None or v[2] is None:
            ctx.freeze_node(node, "3-D Attention with grouped or unknown heads")
            return
        qh, qd = t.factor(q[2], [nq, dq // nq], origin=node.name)
        kh, kd = t.factor(k[2], [nkv, dk // nkv], origin=node.name)
        vh, vd = t.factor(v[2], [nkv, dv // nkv], origin=node.name)
        ctx.attr_entry(node, "q_num_heads", [qh])
        ctx.attr_entry(node, "kv_num_heads", [qh])
    else:
        ctx.freeze_node(node, "Attention of unexpected rank")
        return
    heads = ctx.tie(ctx.tie(qh, kh, node, " (Attention heads)"), vh, node, " (Attention heads)")
    ctx.tie(qd, kd, node, " (Attention q/k head dim)")
    ctx.tie(k[-2], v[-2], node)
    t.tag(heads, "heads")
    t.tag(qd, "head_dim")
    t.tag(vd, "head_dim")
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        mask = ctx.layout(node, 3)
        if mask is not None and len(mask) == 4 and (ctx.dims(node.inputs[3]) or [1, 1])[1] != 1:
            ctx.tie(heads, mask[1], node, " (Attention mask per head)")
    out = (q[0], heads, q[2], vd) if len(q) == 4 else (q[0], q[1], t.product([heads, vd], origin=node.name))
    ctx.set_layout(node.outputs[0], out)

"""Conv and ConvTranspose: output channels are a new group; input channels are
columns of the input's group. Depthwise convs pass channels through (and own
the ``group`` attribute); grouped convs factor the input into groups x per-group.
"""
from __future__ import annotations

import onnx_ir as ir

from onnxprune.core.analysis import IN, OUT, PARAM, RuleContext
from onnxprune.core.registry import Registry

RULES = Registry()


def _spatial_untracked(ctx: RuleContext, node: ir.Node, lay) -> None:
    ctx.freeze(lay[2:], node, "channels on a spatial axis")


@RULES.rule("Conv")
def conv(ctx: RuleContext, node: ir.Node) -> None:
    w = ctx.const(node.inputs[1])
    lay = ctx.layout(node, 0)
    if w is None or lay is None:
        ctx.freeze_node(node, "Conv weight is not a constant")
        return
    _spatial_untracked(ctx, node, lay)
    g = int(ctx.attr(node, "group", 1))
    m, cpg = w.shape[0], w.shape[1]
    cin = cpg * g
    x = lay[1]
    t = ctx.spaces
    if g == 1:
        ctx.member(node, 1, 1, x, IN)
        out = t.atom(m, origin=node.name)
    elif cpg == 1 and x is not None:
        # depthwise (channel multiplier k = m / cin): output channel c*k + j reads input c
        k = m // cin
        out = x if k == 1 else t.product([x, t.fixed(k)], origin=node.name)
        ctx.attr_entry(node, "group", [x])
    elif x is None:
        out = t.product([t.fixed(g), t.atom(m // g, origin=node.name)], origin=node.name)
    else:
        groups, per = t.factor(x, [g, cpg], origin=node.name)
        ctx.member(node, 1, 1, per, IN)
        out = t.product([groups, t.atom(m // g, origin=node.name)], origin=node.name)
        ctx.attr_entry(node, "group", [groups])
    ctx.member(node, 1, 0, out, OUT)
    if len(node.inputs) > 2:
        ctx.member(node, 2, 0, out, PARAM)
    ctx.set_layout(node.outputs[0], (lay[0], out) + (None,) * (len(lay) - 2))


@RULES.rule("ConvTranspose")
def conv_transpose(ctx: RuleContext, node: ir.Node) -> None:
    w = ctx.const(node.inputs[1])
    lay = ctx.layout(node, 0)
    if w is None or lay is None:
        ctx.freeze_node(node, "ConvTranspose weight is not a constant")
        return
    _spatial_untracked(ctx, node, lay)
    g = int(ctx.attr(node, "group", 1))
    cin, opg = w.shape[0], w.shape[1]
    x = lay[1]
    t = ctx.spaces
    if g == 1:
        ctx.member(node, 1, 0, x, IN)
        out = t.atom(opg, origin=node.name)
        ctx.member(node, 1, 1, out, OUT)
    elif opg == 1 and g == cin and x is not None:
        ctx.member(node, 1, 0, x, OUT)
        ctx.attr_entry(node, "group", [x])
        out = x
    else:
        ctx.freeze_node(node, "grouped ConvTranspose")
        return
    if len(node.inputs) > 2:
        ctx.member(node, 2, 0, out, PARAM)
    ctx.set_layout(node.outputs[0], (lay[0], out) + (None,) * (len(lay) - 2))

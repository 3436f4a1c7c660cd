"""Normalisations. BatchNorm and InstanceNorm are per-channel (exact to prune);
LayerNorm over a channel axis and GroupNorm inside a group are approximate
(their statistics change), which is recorded as the ``norm`` tag."""
from __future__ import annotations

import onnx_ir as ir

from onnxprune.core.analysis import PARAM, RuleContext
from onnxprune.core.registry import Registry

RULES = Registry()


@RULES.rule("BatchNormalization", "InstanceNormalization")
def per_channel(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    if lay is None or len(lay) < 2:
        ctx.freeze_node(node, "unknown rank")
        return
    for slot in range(1, len(node.inputs)):
        if ctx.const(node.inputs[slot]) is None:
            ctx.freeze_node(node, "normalisation parameters are not constants")
            return
        ctx.member(node, slot, 0, lay[1], PARAM)
    if node.op_type == "InstanceNormalization":
        # statistics over axes 2+: channels folded into them (GroupNorm(1) exported as
        # Reshape [N, 1, C*H*W] -> InstanceNormalization) make pruning them approximate
        for s in lay[2:]:
            if s is not None:
                ctx.spaces.tag(s, "norm")
    for o in node.outputs[:1]:
        ctx.set_layout(o, lay)


@RULES.rule("LayerNormalization")
def layer_norm(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    if lay is None:
        ctx.freeze_node(node, "unknown rank")
        return
    axis = int(ctx.attr(node, "axis", -1)) % len(lay)
    for s in lay[axis:]:
        ctx.spaces.tag(s, "norm")
    for slot in (1, 2):
        if slot >= len(node.inputs) or node.inputs[slot] is None:
            continue
        p = ctx.const(node.inputs[slot])
        if p is None:
            ctx.freeze_node(node, "LayerNormalization parameters are not constants")
            return
        for back in range(p.ndim):
            ax = p.ndim - 1 - back
            s = lay[len(lay) - 1 - back]
            if p.shape[ax] > 1:
                ctx.member(node, slot, ax, s, PARAM)
    ctx.set_layout(node.outputs[0], lay)
    for o in node.outputs[1:]:  # mean / inv std-dev outputs: reduced axes
        ctx.set_layout(o, lay[:axis] + (None,) * (len(lay) - axis))


@RULES.rule("GroupNormalization")
def group_norm(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    scale = ctx.const(node.inputs[1])
    if lay is None or scale is None or lay[1] is None:
        ctx.freeze_node(node, "GroupNormalization on untracked channels")
        return
    ng = int(ctx.attr(node, "num_groups"))
    c = lay[1].size
    groups, per = ctx.spaces.factor(lay[1], [ng, c // ng], origin=node.name)
    ctx.spaces.tag(per, "norm")  # removing channels inside a group changes its statistics
    ch = groups if scale.shape[0] == ng else lay[1]  # opset 18 scales per group, 21 per channel
    ctx.member(node, 1, 0, ch, PARAM)
    ctx.member(node, 2, 0, ch, PARAM)
    ctx.attr_entry(node, "num_groups", [groups])
    ctx.set_layout(node.outputs[0], lay)


@RULES.rule("LRN")
def lrn(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    if lay is None:
        ctx.freeze_node(node, "unknown rank")
        return
    ctx.freeze([lay[1]], node, "LRN mixes neighbouring channels")
    ctx.set_layout(node.outputs[0], lay)

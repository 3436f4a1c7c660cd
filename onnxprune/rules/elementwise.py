"""Element-wise ops: activations pass layouts through; broadcasting ops tie axes.

A broadcasting op ties the axes its inputs share: an Add of two activation
paths is a residual join (the group becomes ``embed``), a per-channel constant
(bias, layer-scale, PRelu slope) becomes a member of the channel's group.
"""
from __future__ import annotations

import onnx_ir as ir

from onnxprune.core.analysis import Refusal, RuleContext
from onnxprune.core.registry import Registry

RULES = Registry()

UNARY = (
    "Relu LeakyRelu Elu Selu Celu Sigmoid HardSigmoid HardSwish Tanh Softplus Softsign Erf Gelu "
    "Mish Abs Neg Exp Log Sqrt Reciprocal Identity Cast CastLike Floor Ceil Round Sign Not Sin Cos "
    "ThresholdedRelu IsNaN IsInf Swish"
).split()

JOINS = {"Add", "Sub", "Sum", "Mean", "Max", "Min"}
BINARY = "Add Sub Mul Div Pow Max Min Mean Sum PRelu Where Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor Mod BitShift".split()


@RULES.rule(*UNARY)
def unary(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    ctx.set_layout(node.outputs[0], lay)


@RULES.rule("Dropout")
def dropout(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    for o in node.outputs:
        ctx.set_layout(o, lay)


@RULES.rule("Clip")
def clip(ctx: RuleContext, node: ir.Node) -> None:
    for slot in (1, 2):
        v = node.inputs[slot] if slot < len(node.inputs) else None
        if v is not None and ctx.const(v) is None and (ctx.rank(v) or 0) > 0:
            ctx.freeze_node(node, "Clip with tensor bounds")
            return
    ctx.set_layout(node.outputs[0], ctx.layout(node, 0))


def _distribution(ctx: RuleContext, node: ir.Node, lay, axes) -> None:
    # a distribution over channels (YOLO's DFL bins, channel attention): removing entries
    # changes what it means, not just its statistics
    ctx.freeze([lay[a] for a in axes], node, "Softmax over channels (a distribution: entries are not removable)")
    ctx.set_layout(node.outputs[0], lay)


@RULES.rule("Softmax", "LogSoftmax", "Hardmax", since=13)
def softmax(ctx: RuleContext, node: ir.Node) -> None:
    """One axis (``axis``, default -1) holds the distribution."""
    lay = ctx.layout(node, 0)
    if lay is None:
        raise Refusal("unknown rank")
    _distribution(ctx, node, lay, [ctx.attr(node, "axis", -1) % len(lay)])


@RULES.rule("Softmax", "LogSoftmax", "Hardmax", until=12)
def softmax_flat(ctx: RuleContext, node: ir.Node) -> None:
    """Opsets 1-12: the input is flattened to 2-D at ``axis`` (default 1); the
    distribution runs over every axis from ``axis`` on."""
    lay = ctx.layout(node, 0)
    if lay is None:
        raise Refusal("unknown rank")
    axis = ctx.attr(node, "axis", 1) % len(lay)
    _distribution(ctx, node, lay, range(axis, len(lay)))


@RULES.rule(*BINARY)
def broadcast(ctx: RuleContext, node: ir.Node) -> None:
    slots = [i for i, v in enumerate(node.inputs) if v is not None]
    items = []
    for slot in slots:
        v = node.inputs[slot]
        lay, dims = ctx.layout(node, slot), ctx.dims(v)
        if lay is None or dims is None:
            ctx.freeze_node(node, "input of unknown rank")
            return
        items.append((lay, dims, ctx.const(v) is not None))
    rank = max(len(lay) for lay, _, _ in items)
    out = []
    for i in range(rank):
        acts, consts, untracked = [], [], False
        for lay, dims, is_const in items:
            k = i - (rank - len(lay))
            if k < 0 or dims[k] == 1:
                continue
            s = lay[k]
            if s is None:
                untracked = untracked or not is_const
            elif is_const:
                consts.append(s)
            else:
                acts.append(s)
        if not acts and not consts:
            out.append(None)
            continue
        if untracked:
            if acts:
                ctx.freeze(acts, node, "channels meet an untracked axis")
            for s in consts:  # a constant's axis that is not a channel axis: nothing to note
                ctx.freeze([s], node, "constant axis is not a channel axis")
        roots = {id(ctx.spaces.find(s)) for s in acts}
        res = None
        for s in acts + consts:
            res = s if res is None else ctx.tie(res, s, node)
        if node.op_type in JOINS and len(roots) >= 2:
            ctx.spaces.tag(res, "residual")
        out.append(None if untracked and not acts else res)
    ctx.set_layout(node.outputs[0], out)

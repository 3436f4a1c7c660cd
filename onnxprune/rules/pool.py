"""Pools, reductions, Resize and Pad: channel axes pass through; reducing over
a channel axis makes the group approximate (``reduced`` tag)."""
from __future__ import annotations

import onnx_ir as ir

from onnxprune.core.analysis import RuleContext
from onnxprune.core.registry import Registry

RULES = Registry()


@RULES.rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")
def pool(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    if lay is None:
        ctx.freeze_node(node, "unknown rank")
        return
    ctx.freeze(lay[2:], node, "channels on a pooled axis")
    out = (lay[0], lay[1]) + (None,) * (len(lay) - 2)
    for o in node.outputs:
        ctx.set_layout(o, out)


REDUCE = "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceSumSquare ArgMax ArgMin".split()


@RULES.rule(*REDUCE)
def reduce(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    if lay is None:
        ctx.freeze_node(node, "unknown rank")
        return
    r = len(lay)
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [int(ctx.attr(node, "axis", 0))]
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        a = ctx.const(node.inputs[1])
        if a is None:
            ctx.freeze_node(node, "reduction axes computed at run time")
            return
        axes = [int(x) for x in a.reshape(-1)]
    else:
        axes = ctx.attr(node, "axes")
        axes = list(axes) if axes is not None else []
    if not axes:
        if int(ctx.attr(node, "noop_with_empty_axes", 0)):
            ctx.set_layout(node.outputs[0], lay)
            return
        axes = list(range(r))
    axes = sorted({a % r for a in axes})
    for a in axes:
        ctx.spaces.tag(lay[a], "reduced")
    keep = int(ctx.attr(node, "keepdims", 1))
    out = [None if i in axes else s for i, s in enumerate(lay)] if keep else [s for i, s in enumerate(lay) if i not in axes]
    ctx.set_layout(node.outputs[0], out)


@RULES.rule("Resize", "Upsample")
def resize(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    if lay is None:
        ctx.freeze_node(node, "unknown rank")
        return
    dims = ctx.dims(node.inputs[0]) or [None] * len(lay)
    scale_slot, size_slot = (1, None) if node.op_type == "Upsample" else (2, 3)
    scales = ctx.const(node.inputs[scale_slot]) if scale_slot < len(node.inputs) else None
    sizes = ctx.const(node.inputs[size_slot]) if size_slot is not None and size_slot < len(node.inputs) else None
    axes = ctx.attr(node, "axes")
    axes = list(axes) if axes is not None else list(range(len(lay)))
    for pos, ax in enumerate(axes):
        s = lay[ax % len(lay)]
        if s is None:
            continue
        if scales is not None and scales.size and float(scales.reshape(-1)[pos]) != 1.0:
            ctx.freeze([s], node, "Resize scales a channel axis")
        elif sizes is not None and sizes.size:
            if int(sizes.reshape(-1)[pos]) == dims[ax % len(lay)]:
                ctx.shape_entry(node, size_slot, pos, [s])
            else:
                ctx.freeze([s], node, "Resize changes a channel axis")
        elif (scales is None or not scales.size) and (sizes is None or not sizes.size):
            ctx.freeze([s], node, "Resize with computed scales/sizes")
    ctx.set_layout(node.outputs[0], lay)


@RULES.rule("Pad")
def pad(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    if lay is None:
        ctx.freeze_node(node, "unknown rank")
        return
    r = len(lay)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        pads = ctx.const(node.inputs[1])
        ax_in = ctx.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    else:
        pads, ax_in = ctx.attr(node, "pads"), None
    if pads is None:
        ctx.freeze([s for s in lay if s is not None], node, "Pad amounts computed at run time")
    else:
        pads = [int(p) for p in list(pads.reshape(-1) if hasattr(pads, "reshape") else pads)]
        axes = [int(a) % r for a in ax_in.reshape(-1)] if ax_in is not None else list(range(r))
        n = len(axes)
        for i, ax in enumerate(axes):
            if (pads[i] or pads[i + n]) and lay[ax] is not None:
                ctx.freeze([lay[ax]], node, "Pad on a channel axis")
    ctx.set_layout(node.outputs[0], lay)

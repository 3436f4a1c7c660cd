"""Gemm, MatMul and Einsum: a constant operand's output axis is a new group and
its contracted axis joins the other operand's group; activation x activation
MatMuls and Einsums (attention) tie the contracted axes and carry the rest through."""
from __future__ import annotations

import onnx_ir as ir

from onnxprune.core.analysis import IN, OUT, PARAM, RuleContext
from onnxprune.core.dims import einsum_terms
from onnxprune.core.registry import Registry

RULES = Registry()


@RULES.rule("Gemm")
def gemm(ctx: RuleContext, node: ir.Node) -> None:
    a_c, b_c = ctx.const(node.inputs[0]), ctx.const(node.inputs[1])
    ta, tb = int(ctx.attr(node, "transA", 0)), int(ctx.attr(node, "transB", 0))
    t = ctx.spaces
    if b_c is not None and a_c is None:
        la = ctx.layout(node, 0)
        if la is None:
            ctx.freeze_node(node, "unknown rank")
            return
        rows, k = (la[1], la[0]) if ta else (la[0], la[1])
        ctx.member(node, 1, 1 if tb else 0, k, IN)
        out = t.atom(b_c.shape[0] if tb else b_c.shape[1], origin=node.name)
        ctx.member(node, 1, 0 if tb else 1, out, OUT)
        lay = (rows, out)
    elif a_c is not None and b_c is None:
        lb = ctx.layout(node, 1)
        if lb is None:
            ctx.freeze_node(node, "unknown rank")
            return
        cols, k = (lb[0], lb[1]) if tb else (lb[1], lb[0])
        ctx.member(node, 0, 0 if ta else 1, k, IN)
        out = t.atom(a_c.shape[1] if ta else a_c.shape[0], origin=node.name)
        ctx.member(node, 0, 1 if ta else 0, out, OUT)
        lay = (out, cols)
    else:
        ctx.freeze_node(node, "Gemm without exactly one constant operand")
        return
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = ctx.const(node.inputs[2])
        if c is None:
            ctx.freeze_node(node, "Gemm with a computed C")
            return
        for back, s in enumerate(reversed(lay)):
            ax = c.ndim - 1 - back
            if ax >= 0 and c.shape[ax] > 1:
                if s is None:
                    continue
                ctx.member(node, 2, ax, s, PARAM)
    ctx.set_layout(node.outputs[0], lay)


@RULES.rule("MatMul")
def matmul(ctx: RuleContext, node: ir.Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    a_c, b_c = ctx.const(a), ctx.const(b)
    la, lb = ctx.layout(node, 0) if a_c is None else None, ctx.layout(node, 1) if b_c is None else None
    t = ctx.spaces
    ra = a_c.ndim if a_c is not None else ctx.rank(a)
    rb = b_c.ndim if b_c is not None else ctx.rank(b)
    if ra is None or rb is None or ra < 2 or rb < 2:
        ctx.freeze_node(node, "MatMul with a vector or unknown-rank operand")
        return
    if b_c is not None and a_c is None:
        ctx.member(node, 1, rb - 2, la[-1], IN)
        out = t.atom(b_c.shape[-1], origin=node.name)
        ctx.member(node, 1, rb - 1, out, OUT)
        batch = _batch(ctx, node, la[:-2], None, b_c.shape[:-2], 1)
        lay = batch + (la[-2], out)
    elif a_c is not None and b_c is None:
        ctx.member(node, 0, ra - 1, lb[-2], IN)
        out = t.atom(a_c.shape[-2], origin=node.name)
        ctx.member(node, 0, ra - 2, out, OUT)
        batch = _batch(ctx, node, lb[:-2], None, a_c.shape[:-2], 0)
        lay = batch + (out, lb[-1])
    elif a_c is None and b_c is None:
        if la is None or lb is None:
            ctx.freeze_node(node, "unknown rank")
            return
        ctx.tie(la[-1], lb[-2], node, " (MatMul contraction)")
        batch = _batch(ctx, node, la[:-2], lb[:-2], None, None)
        lay = batch + (la[-2], lb[-1])
        # attention: the batch axes of QK^T / AV are heads, the feature axes head dims
        for s in batch:
            ctx.spaces.tag(s, "heads")
        for s in (la[-1], lb[-1]):
            ctx.spaces.tag(s, "head_dim")
    else:
        ctx.freeze_node(node, "MatMul of two constants")
        return
    ctx.set_layout(node.outputs[0], lay)


def _batch(ctx: RuleContext, node, la, lb, const_batch, const_slot):
    """Broadcast the leading (batch) axes of a MatMul."""
    if lb is None:
        n = max(len(la), len(const_batch))
        out = []
        for i in range(n):
            ka, kc = i - (n - len(la)), i - (n - len(const_batch))
            s = la[ka] if ka >= 0 else None
            if kc >= 0 and const_batch[kc] > 1:
                ctx.member(node, const_slot, kc, s, PARAM) if s is not None else None
            out.append(s)
        return tuple(out)
    n = max(len(la), len(lb))
    da = ctx.dims(node.inputs[0])[: len(la)]
    db = ctx.dims(node.inputs[1])[: len(lb)]
    out = []
    for i in range(n):
        ka, kb = i - (n - len(la)), i - (n - len(lb))
        sa = la[ka] if ka >= 0 and da[ka] != 1 else None
        sb = lb[kb] if kb >= 0 and db[kb] != 1 else None
        if sa is not None and sb is not None:
            out.append(ctx.tie(sa, sb, node))
        elif (sa is None) != (sb is None):
            # the other side may be broadcast (dim 1) or untracked
            other_dim = (db[kb] if kb >= 0 else 1) if sa is not None else (da[ka] if ka >= 0 else 1)
            s = sa or sb
            if other_dim != 1:
                ctx.freeze([s], node, "channels meet an untracked axis")
            out.append(s)
        else:
            out.append(None)
    return tuple(out)


@RULES.rule("Einsum")
def einsum(ctx: RuleContext, node: ir.Node) -> None:
    """Activation x activation Einsum (MaxViT's attention, ``BGHID,BGHJD->BGHIJ``):
    axes with the same index are tied, the output's axes carry their index's
    space. As for MatMul, indices every operand and the output share are heads,
    the others head dims (what the tags mean only for attention). A constant
    operand (a layer written as an Einsum) is not followed."""
    eq = ctx.attr(node, "equation")
    terms = einsum_terms(eq.decode() if isinstance(eq, bytes) else str(eq), len(node.inputs))
    if terms is None:
        ctx.freeze_node(node, "Einsum with an ellipsis, an implicit output or a repeated index")
        return
    if any(v is None or ctx.const(v) is not None for v in node.inputs):
        ctx.freeze_node(node, "Einsum with a constant operand")
        return
    ins, out = terms
    lays = [ctx.layout(node, i) for i in range(len(node.inputs))]
    if any(lay is None or len(lay) != len(t) for lay, t in zip(lays, ins)):
        ctx.freeze_node(node, "unknown rank")
        return
    space: dict[str, object] = {}
    for lay, t in zip(lays, ins):
        for s, c in zip(lay, t):
            space[c] = ctx.tie(space[c], s, node, f" (Einsum index {c})") if c in space else s
    shared = set(out).intersection(*map(set, ins))
    for c, s in space.items():
        ctx.spaces.tag(s, "heads" if c in shared else "head_dim")
    ctx.set_layout(node.outputs[0], [space[c] for c in out])

"""Structural ops: they move, cut, merge and split channel axes.

Concat and Split/Slice make concat spaces (offsets), Flatten/Reshape make
product spaces (a channel owns H*W consecutive features before a Gemm; a width
becomes heads x head_dim). Integer constants that spell a pruned width
(a Reshape target, Split sizes, Slice bounds) become shape members, resolved
through run-time ``Shape -> Gather -> Concat`` chains where they are built.
"""
from __future__ import annotations

from math import prod

import onnx_ir as ir

from onnxprune.core.analysis import Refusal, RuleContext
from onnxprune.core.registry import Registry
from onnxprune.core.dims import Token, axis_groups, divides, size, tdiv, tprod
from onnxprune.core.space import PRODUCT, LayoutError, Space

RULES = Registry()

INT_MAX = 2**62


# -- helpers ---------------------------------------------------------------------------
def _axes_input(ctx: RuleContext, node: ir.Node, slot: int = 1, attr: str = "axes"):
    if slot < len(node.inputs) and node.inputs[slot] is not None:
        a = ctx.const(node.inputs[slot])
        return None if a is None else [int(x) for x in a.reshape(-1)]
    a = ctx.attr(node, attr)
    return [] if a is None else [int(x) for x in a]


def _merge(ctx: RuleContext, node, spaces, dims) -> Space | None:
    """Layout of one axis made by merging consecutive axes (row-major); a
    dynamic dimension (``None``) joins as a dynamic fixed extent."""
    if all(s is None for s in spaces):
        return None
    parts = []
    for s, d in zip(spaces, dims):
        if s is not None:
            parts.append(s)
        elif d != 1:
            parts.append(ctx.spaces.fixed(d))
    return ctx.spaces.product(parts, origin=node.name)


def shape_vector(ctx: RuleContext, node: ir.Node, slot: int):
    """Resolve an int64 shape-like input into elements:
    ``("const", value, node, slot, index)``, ``("dim", value, axis)`` or ``("unknown",)``;
    None where not even its length is known. A piece that cannot be followed (a
    ``Div`` of two run-time sizes: Swin's windows per image) is ``("unknown",)`` per
    element where its length is known, so the constants beside it in a ``Concat`` (the
    heads of Swin's shifted-window mask reshape) still resolve."""
    vec = _shape_vector(ctx, node, slot)
    if vec is None:
        d = ctx.dims(node.inputs[slot])
        if d is not None and len(d) <= 1 and all(isinstance(x, int) for x in d):
            return [("unknown",)] * (d[0] if d else 1)
    return vec


def _shape_vector(ctx: RuleContext, node: ir.Node, slot: int):
    v = node.inputs[slot]
    arr = ctx.const(v)
    if arr is not None:
        return [("const", int(x), node, slot, i) for i, x in enumerate(arr.reshape(-1))]
    p = v.producer()
    if p is None:
        return None
    op = p.op_type
    if op == "Shape":
        r = ctx.rank(p.inputs[0])
        if r is None:
            return None
        start = int(ctx.attr(p, "start", 0))
        end = ctx.attr(p, "end")
        axes = list(range(r))[slice(start, None if end is None else int(end))]
        return [("dim", p.inputs[0], a) for a in axes]
    if op == "Concat":
        out = []
        for k in range(len(p.inputs)):
            sub = shape_vector(ctx, p, k)
            if sub is None:
                return None
            out.extend(sub)
        return out
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity") or (op == "Reshape" and ctx.rank(p.inputs[0]) == 1):
        return shape_vector(ctx, p, 0)
    if op == "Equal":
        a, b = shape_vector(ctx, p, 0), shape_vector(ctx, p, 1)
        if a is None or b is None:
            return None
        if len(a) == 1 or len(b) == 1:
            a, b = a * (len(b) if len(a) == 1 else 1), b * (len(a) if len(b) == 1 else 1)
        return [("const", int(x[1] == y[1]), None, None, None) if x[0] == y[0] == "const" else ("unknown",) for x, y in zip(a, b)]
    if op == "Where":
        c, a, b = (shape_vector(ctx, p, k) for k in range(3))
        if c is None or a is None or b is None or not len(c) == len(a) == len(b):
            return None
        return [(x if cc[1] else y) if cc[0] == "const" else ("unknown",) for cc, x, y in zip(c, a, b)]
    if op == "Mul":  # a dynamic dim times a constant: the legacy exporter's batch * heads
        a, b = shape_vector(ctx, p, 0), shape_vector(ctx, p, 1)
        if a is None or b is None or len(a) != 1 or len(b) != 1:
            return None
        (x,), (y,) = a, b
        if x[0] == "const":
            x, y = y, x
        if x[0] == "dim" and y[0] == "const":
            return [("scaled", x, y)]
        return [("unknown",)]
    if op == "Gather" and int(ctx.attr(p, "axis", 0)) == 0:
        data, idx = shape_vector(ctx, p, 0), ctx.const(p.inputs[1])
        if data is None or idx is None:
            return None
        return [data[int(i)] for i in idx.reshape(-1)]
    if op == "Slice":
        data = shape_vector(ctx, p, 0)
        st = ctx.const(p.inputs[1]) if len(p.inputs) > 1 else None
        en = ctx.const(p.inputs[2]) if len(p.inputs) > 2 else None
        if data is None or st is None or en is None or len(p.inputs) > 4:
            return None
        return data[int(st.reshape(-1)[0]) : int(min(en.reshape(-1)[0], INT_MAX))]
    return None  # shape_vector: unknown elements where the length is known


def bind_shape(ctx: RuleContext, node: ir.Node, slot: int, out_lay, what: str) -> None:
    """Make the shape vector at ``slot`` follow the output layout ``out_lay``."""
    tracked = [(j, s) for j, s in enumerate(out_lay) if s is not None]
    if not tracked:
        return
    vec = shape_vector(ctx, node, slot)
    if vec is None or len(vec) != len(out_lay):
        ctx.freeze([s for _, s in tracked], node, f"{what} target computed at run time")
        return
    for j, s in tracked:
        e = vec[j]
        if e[0] == "const":
            if e[1] > 1 and e[2] is None:
                ctx.freeze([s], node, f"{what} size derived from a constant it cannot rewrite")
            elif e[1] > 1:
                ctx.shape_entry(e[2], e[3], e[4], [s])
        elif e[0] == "dim":
            src = ctx.known(e[1])
            ss = src[e[2]] if e[2] < len(src) else None
            if ss is None or not ctx.spaces.same(ss, s):
                ctx.freeze([s], node, f"{what} size read from another tensor")
        elif e[0] == "scaled" and _bind_scaled(ctx, e, s):
            continue
        else:
            ctx.freeze([s], node, f"{what} size computed at run time")


def _bind_scaled(ctx: RuleContext, e, s) -> bool:
    """A target entry ``dim * c`` (``batch * heads``) on an axis laid out as
    ``s``: when ``s`` is a dynamic extent times tracked parts that ``c`` spells,
    ``c`` becomes a shape member of those parts. Whether it could bind."""
    _, (_, src, axis), (_, c, cnode, cslot, cidx) = e
    dims = ctx.dims(src)
    if cnode is None or dims is None or axis >= len(dims) or dims[axis] is not None:
        return False
    r = ctx.spaces.find(s)
    kids = [ctx.spaces.find(k) for k in r.children] if r.kind == PRODUCT else []
    static = [k for k in kids if k.size is not None]
    if len(kids) - len(static) != 1 or not static or c != prod(k.size for k in static):
        return False
    ctx.shape_entry(cnode, cslot, cidx, [ctx.spaces.product(static, origin=cnode.name)])
    return True


def _reshape_out_tokens(ctx: RuleContext, node: ir.Node, tin: list[Token]):
    """Output dims of a Reshape, from its shape vector where inference gave up."""
    tout = ctx.tokens(node.outputs[0])
    vec = shape_vector(ctx, node, 1)
    if vec is None or tout is None or len(vec) != len(tout):
        return tout
    allowzero = int(ctx.attr(node, "allowzero", 0))
    res: list = []
    for j, e in enumerate(vec):
        known = tout[j] if not tout[j][1] else None
        if e[0] == "const" and e[1] > 0:
            res.append((e[1], ()))
        elif e[0] == "const" and e[1] == 0 and not allowzero and j < len(tin):
            res.append(tin[j])
        elif e[0] == "dim":
            src = tin if e[1] is node.inputs[0] else ctx.tokens(e[1])
            res.append(src[e[2]] if src and e[2] < len(src) else known)
        else:
            res.append(known if e[0] != "const" else None)
    if sum(t is None for t in res) == 1:
        k = res.index(None)
        total, rest = tprod(tin), tprod([t for t in res if t is not None])
        if not divides(rest, total):
            return tout
        res[k] = tdiv(total, rest)
    if None in res:
        return tout
    for d, t in zip(node.outputs[0].shape.dims if node.outputs[0].shape is not None else (), res):
        name = getattr(d, "value", None)
        if name and not isinstance(d, int) and t != (1, (name,)):
            ctx.alias(name, t)
    return res


def reshape_layout(ctx: RuleContext, node, lay, tin, tout):
    groups = axis_groups(tin, tout)
    if groups is None:
        raise Refusal("reshape cannot be matched axis by axis")
    out: list = [None] * len(tout)
    for ia, ja in groups:
        merged = _merge(ctx, node, [lay[i] for i in ia], [size(tin[i]) for i in ia])
        if merged is None:
            continue
        if len(ja) == 1:
            out[ja[0]] = merged
        else:
            parts = ctx.spaces.factor(merged, [size(tout[j]) for j in ja], origin=node.name,
                                      scales=[tout[j][0] if tout[j][1] else 1 for j in ja])
            for j, p in zip(ja, parts):
                out[j] = p
    return out


# -- rules -------------------------------------------------------------------------------
@RULES.rule("Transpose")
def transpose(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    if lay is None:
        ctx.freeze_node(node, "unknown rank")
        return
    perm = ctx.attr(node, "perm")
    perm = list(perm) if perm is not None else list(reversed(range(len(lay))))
    ctx.set_layout(node.outputs[0], [lay[p] for p in perm])


@RULES.rule("Squeeze")
def squeeze(ctx: RuleContext, node: ir.Node) -> None:
    lay, dims = ctx.layout(node, 0), ctx.dims(node.inputs[0])
    axes = _axes_input(ctx, node)
    if lay is None or axes is None or dims is None:
        ctx.freeze_node(node, "Squeeze axes unknown")
        return
    axes = {a % len(lay) for a in axes} if axes else {i for i, d in enumerate(dims) if d == 1}
    ctx.set_layout(node.outputs[0], [s for i, s in enumerate(lay) if i not in axes])


@RULES.rule("Unsqueeze")
def unsqueeze(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    axes = _axes_input(ctx, node)
    if lay is None or axes is None:
        ctx.freeze_node(node, "Unsqueeze axes unknown")
        return
    r = len(lay) + len(axes)
    axes = {a % r for a in axes}
    it = iter(lay)
    ctx.set_layout(node.outputs[0], [None if i in axes else next(it) for i in range(r)])


@RULES.rule("Flatten")
def flatten(ctx: RuleContext, node: ir.Node) -> None:
    lay, dims = ctx.layout(node, 0), ctx.dims(node.inputs[0])
    if lay is None or dims is None:
        ctx.freeze_node(node, "unknown rank")
        return
    a = int(ctx.attr(node, "axis", 1)) % (len(lay) + 1)
    ctx.set_layout(
        node.outputs[0],
        [_merge(ctx, node, lay[:a], dims[:a]), _merge(ctx, node, lay[a:], dims[a:])],
    )


@RULES.rule("Reshape")
def reshape(ctx: RuleContext, node: ir.Node) -> None:
    lay = ctx.layout(node, 0)
    tin = ctx.tokens(node.inputs[0])
    tout = _reshape_out_tokens(ctx, node, tin) if tin is not None else None
    if lay is None or tin is None or tout is None:
        ctx.freeze_node(node, "Reshape with unknown shapes")
        return
    if all(s is None for s in lay):
        ctx.set_layout(node.outputs[0], [None] * len(tout))
        return
    try:
        out = reshape_layout(ctx, node, lay, tin, tout)
    except LayoutError:
        groups = _shuffle_groups(ctx, node, tin, tout)
        if groups is None:
            raise
        raise Refusal(f"channel shuffle of {groups} concatenated branches (Reshape-Transpose-Reshape): "
                      f"pruning would move channels between branches") from None
    bind_shape(ctx, node, 1, out, "Reshape")
    ctx.set_layout(node.outputs[0], out)


def _shuffle_groups(ctx: RuleContext, node: ir.Node, tin, tout) -> int | None:
    """The group count when ``node`` starts a channel shuffle: it splits one axis
    into (groups, width), a Transpose swaps the two, and a Reshape merges them back."""
    if len(tout) != len(tin) + 1:
        return None
    k = next((i for i, (a, b) in enumerate(zip(tin, tout)) if a != b), None)
    uses = list(node.outputs[0].uses())
    if k is None or len(uses) != 1 or uses[0][0].op_type != "Transpose":
        return None
    tr = uses[0][0]
    perm = list(ctx.attr(tr, "perm", []) or [])
    swapped = list(range(len(tout)))
    swapped[k], swapped[k + 1] = k + 1, k
    after = list(tr.outputs[0].uses())
    if perm != swapped or len(after) != 1 or after[0][0].op_type != "Reshape":
        return None
    return size(tout[k])


@RULES.rule("Expand")
def expand(ctx: RuleContext, node: ir.Node) -> None:
    lay, din, dout = ctx.layout(node, 0), ctx.dims(node.inputs[0]), ctx.dims(node.outputs[0])
    if lay is None or din is None or dout is None:
        ctx.freeze_node(node, "Expand with unknown shapes")
        return
    out = []
    for j in range(len(dout)):
        k = j - (len(dout) - len(lay))
        s = lay[k] if k >= 0 and din[k] != 1 else None
        out.append(s)
    bind_shape(ctx, node, 1, out, "Expand")
    ctx.set_layout(node.outputs[0], out)


@RULES.rule("Concat")
def concat(ctx: RuleContext, node: ir.Node) -> None:
    lays, dims = [], []
    for k, v in enumerate(node.inputs):
        lay, d = ctx.layout(node, k), ctx.dims(v)
        if lay is None or d is None:
            ctx.freeze_node(node, "Concat input of unknown rank")
            return
        lays.append(lay)
        dims.append(d)
    r = len(lays[0])
    axis = int(ctx.attr(node, "axis", 0)) % r
    out = []
    for i in range(r):
        if i == axis:
            if all(lay[i] is None for lay in lays):
                out.append(None)
                continue
            parts = []
            for lay, d in zip(lays, dims):
                if lay[i] is not None:
                    parts.append(lay[i])
                elif d[i] is None:
                    raise Refusal("Concat of channels with a dynamic extent")
                elif d[i] > 0:
                    parts.append(ctx.spaces.fixed(d[i]))
            out.append(ctx.spaces.concat(parts, origin=node.name))
            continue
        res, untracked = None, False
        for lay, d, v in zip(lays, dims, node.inputs):
            s = lay[i]
            if s is None:
                untracked = untracked or (d[i] != 1 and ctx.const(v) is None)
                continue
            res = s if res is None else ctx.tie(res, s, node)
        if untracked and res is not None:
            ctx.freeze([res], node, "channels meet an untracked axis")
        out.append(res)
    ctx.set_layout(node.outputs[0], out)


@RULES.rule("Split")
def split(ctx: RuleContext, node: ir.Node) -> None:
    lay, din = ctx.layout(node, 0), ctx.dims(node.inputs[0])
    if lay is None or din is None:
        ctx.freeze_node(node, "unknown rank")
        return
    axis = int(ctx.attr(node, "axis", 0)) % len(lay)
    s = lay[axis]
    explicit = None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        explicit = ("input", ctx.const(node.inputs[1]))
        if explicit[1] is None:
            ctx.freeze_node(node, "Split sizes computed at run time")
            return
        sizes = [int(x) for x in explicit[1].reshape(-1)]
    elif ctx.attr(node, "split") is not None:
        explicit = ("attr", None)
        sizes = [int(x) for x in ctx.attr(node, "split")]
    else:
        sizes = [ctx.dims(o)[axis] if ctx.dims(o) else None for o in node.outputs]
        if any(x is None for x in sizes):
            if s is not None:
                ctx.freeze_node(node, "Split sizes unknown")
                return
    if s is None:
        for o in node.outputs:
            ctx.set_layout(o, lay)
        return
    pieces = ctx.spaces.split(s, sizes, origin=node.name)
    if explicit is None:
        shapes = {tuple(sorted(p.id for p in ctx.spaces.leaves(x))) for x in pieces}
        if len(shapes) > 1:
            ctx.freeze(pieces, node, "equal Split without explicit sizes")
    elif explicit[0] == "input":
        for i, p in enumerate(pieces):
            ctx.shape_entry(node, 1, i, [p])
    else:
        for i, p in enumerate(pieces):
            ctx.attr_entry(node, "split", [p], index=i)
    for o, p in zip(node.outputs, pieces):
        ctx.set_layout(o, lay[:axis] + (p,) + lay[axis + 1 :])


@RULES.rule("Slice")
def slice_(ctx: RuleContext, node: ir.Node) -> None:
    lay, din = ctx.layout(node, 0), ctx.dims(node.inputs[0])
    if lay is None or din is None:
        ctx.freeze_node(node, "unknown rank")
        return
    if len(node.inputs) < 3:
        if any(s is not None for s in lay):
            ctx.freeze_node(node, "attribute-form Slice (opset < 10) on channels")
        else:
            ctx.set_layout(node.outputs[0], lay)
        return
    starts, ends = ctx.const(node.inputs[1]), ctx.const(node.inputs[2])
    axes = ctx.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = ctx.const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None):
        ctx.freeze_node(node, "Slice bounds computed at run time")
        return
    starts, ends = starts.reshape(-1).tolist(), ends.reshape(-1).tolist()
    axes = list(range(len(starts))) if axes is None else [int(a) % len(lay) for a in axes.reshape(-1)]
    steps = [1] * len(starts) if steps is None else steps.reshape(-1).tolist()
    out = list(lay)
    for k, ax in enumerate(axes):
        s = lay[ax]
        if s is None:
            continue
        n = din[ax]
        st, en = int(starts[k]), int(ends[k])
        b = st + n if st < 0 else min(st, n)
        e = en + n if en < 0 else min(en, n)
        if steps[k] != 1:
            ctx.freeze([s], node, "strided Slice on channels")
            continue
        if b == 0 and e >= n:
            continue
        sizes = [x for x in (b, e - b, n - e)]
        try:
            pieces = ctx.spaces.split(s, [x for x in sizes if x > 0], origin=node.name)
        except LayoutError as err:
            ctx.freeze([s], node, str(err))
            out[ax] = None
            continue
        it = iter(pieces)
        before = [next(it)] if b > 0 else []
        mid = next(it)
        after = [next(it)] if n - e > 0 else []
        out[ax] = mid
        ctx.shape_entry(node, 1, k, [mid] + after if st < 0 else before, -1 if st < 0 else 1)
        if en < 0:
            ctx.shape_entry(node, 2, k, after, -1)
        elif en < n:
            ctx.shape_entry(node, 2, k, before + [mid])
    ctx.set_layout(node.outputs[0], out)


@RULES.rule("Gather")
def gather(ctx: RuleContext, node: ir.Node) -> None:
    lay, ir_ = ctx.layout(node, 0), ctx.rank(node.inputs[1])
    if lay is None or ir_ is None:
        ctx.freeze_node(node, "unknown rank")
        return
    axis = int(ctx.attr(node, "axis", 0)) % len(lay)
    ctx.freeze([lay[axis]], node, "Gather selects channels")
    ctx.set_layout(node.outputs[0], lay[:axis] + (None,) * ir_ + lay[axis + 1 :])


SHAPE_PASS = {"Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape", "Equal", "Where"}
SHAPE_SINKS = {("Reshape", 1), ("Expand", 1), ("ConstantOfShape", 0), ("Resize", 3)}


@RULES.rule("Shape")
def shape(ctx: RuleContext, node: ir.Node) -> None:
    src = node.inputs[0]
    lay = ctx.known(src)
    start = int(ctx.attr(node, "start", 0))
    end = ctx.attr(node, "end")
    entries = list(lay)[slice(start, None if end is None else int(end))]
    read = [s for s in entries if s is not None]
    ctx.set_layout(node.outputs[0], [None])
    if not read:
        return
    # follow the shape vector; while its entries are known, a Gather that picks
    # only untracked dims (the batch, the sequence) carries no channel count
    todo, seen = [(node.outputs[0], [s is not None for s in entries])], set()
    while todo:
        v, flags = todo.pop()
        for use in v.uses():
            user, slot = use.node, use.idx
            if (user.op_type, slot) in SHAPE_SINKS:
                continue
            if user.op_type == "Gather" and slot == 0 and flags is not None:
                idx = ctx.const(user.inputs[1]) if len(user.inputs) > 1 else None
                if idx is not None and idx.dtype.kind in "iu" and all(-len(flags) <= i < len(flags) for i in idx.flat):
                    picked = [flags[int(i)] for i in idx.flat]
                    if not any(picked):
                        continue
                    if id(user) not in seen:
                        seen.add(id(user))
                        todo.extend((o, picked if idx.ndim == 1 else None) for o in user.outputs)
                    continue
            if user.op_type in SHAPE_PASS and id(user) not in seen:
                seen.add(id(user))
                todo.extend((o, None) for o in user.outputs)
                continue
            if user.op_type not in SHAPE_PASS:
                ctx.freeze(read, user, "channel count read at run time and used in arithmetic")
                return

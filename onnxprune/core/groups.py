"""Groups (one per prunable atom), their kinds and isomorphic sets."""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxprune.core.analysis import Analysis
from onnxprune.core.members import IN, OUT, AttrMember, ShapeMember, TensorMember
from onnxprune.core.quant import dq_node
from onnxprune.core.space import ATOM, Space

APPROX_TAGS = {"norm", "reduced"}
KINDS = ("embed", "channels", "heads", "head_dim", "mlp")


@dataclass(eq=False)
class Group:
    id: int
    space: Space
    tensors: list[TensorMember] = field(default_factory=list)
    shapes: list[ShapeMember] = field(default_factory=list)
    attrs: list[AttrMember] = field(default_factory=list)
    kind: str = "channels"
    set_name: str = ""
    signature: str = ""
    frozen: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.space.size

    @property
    def exact(self) -> bool:
        """True when zeroed channels contribute nothing (the oracle applies)."""
        return not (self.space.tags & APPROX_TAGS)

    def names(self) -> set[str]:
        out = set()
        for m in self.tensors:
            out.add(m.node.name or "")
            out.add(m.value.name or "")
        return out

    def label(self) -> str:
        """Short description of the producers and consumers, e.g. ``conv3x3>conv1x1``."""
        outs = sorted({_op_label(m) for m in self.tensors if m.role == OUT})
        ins = sorted({_op_label(m) for m in self.tensors if m.role == IN})
        return f"{'+'.join(outs) or 'const'}>{'+'.join(ins) or 'none'}"


def _user(m: TensorMember) -> tuple[ir.Node, int]:
    """The node and input slot that use the member's tensor: for a quantized
    weight (member on a DequantizeLinear) the op that reads the dequantized value."""
    if m.node.op_type == "DequantizeLinear" and m.slot == 0:
        uses = list(m.node.outputs[0].uses())
        if uses:
            return uses[0].node, uses[0].idx
    return m.node, m.slot


def _conv_weight(node):
    """A Conv's constant weight, also where a DequantizeLinear feeds it (QDQ
    models: its quantized input), else None."""
    v = node.inputs[1] if len(node.inputs) > 1 else None
    dq = dq_node(v)
    return dq.inputs[0].const_value if dq is not None else (v.const_value if v is not None else None)


def _op_label(m: TensorMember) -> str:
    node, _ = _user(m)
    op = node.op_type.lower()
    if node.op_type in ("Conv", "ConvTranspose"):
        w = _conv_weight(node)
        k = "x".join(str(d) for d in w.shape[2:]) if w is not None else ""
        g = node.attributes.get("group")
        dw = "dw" if g is not None and g.value > 1 and w is not None and w.shape[1] == 1 else ("g" if g is not None and g.value > 1 else "")
        return f"{dw}{op}{k}"
    return op


def _descriptor(ctx: Analysis, m: TensorMember) -> tuple:
    v = m.value
    node, slot = _user(m)
    shape = tuple(v.const_value.shape) if v.const_value is not None else ()
    kernel = shape[2:] if node.op_type in ("Conv", "ConvTranspose") else ()
    return (_op_label(m), slot, m.role, m.axis - len(shape), kernel, ctx.table.find(m.space).kind)


def build_groups(ctx: Analysis) -> list[Group]:
    t = ctx.table
    by_leaf: dict[int, Group] = {}

    def group_of(leaf: Space) -> Group:
        g = by_leaf.get(leaf.id)
        if g is None:
            g = by_leaf[leaf.id] = Group(leaf.id, leaf)
        return g

    for m in ctx.tensors:
        for leaf in t.leaves(m.space):
            if leaf.kind == ATOM:
                group_of(leaf).tensors.append(m)
    for m in ctx.shapes:
        for leaf in {x.id: x for s in m.spaces for x in t.leaves(s)}.values():
            if leaf.kind == ATOM and leaf.id in by_leaf:
                by_leaf[leaf.id].shapes.append(m)
    for m in ctx.attrs:
        for leaf in {x.id: x for s in m.spaces for x in t.leaves(s)}.values():
            if leaf.kind == ATOM and leaf.id in by_leaf:
                by_leaf[leaf.id].attrs.append(m)

    groups = []
    for g in sorted(by_leaf.values(), key=lambda g: g.id):
        g.frozen = list(g.space.frozen)
        if g.width <= 1:
            continue
        if not any(m.role == OUT for m in g.tensors):
            if all(m.role != IN for m in g.tensors):
                continue  # a constant's own axis that never met a layer: not a group
            g.frozen.append("no layer produces these channels")
        g.kind = _kind(g)
        groups.append(g)
    _assign_sets(ctx, groups)
    return groups


LINEAR = {"MatMul", "Gemm"}


def _kind(g: Group) -> str:
    """heads / head_dim (axes of activation x activation MatMuls), embed (crosses a
    residual join), mlp (a Linear -> Linear hidden width), channels (the rest)."""
    tags = g.space.tags
    if "heads" in tags:
        return "heads"
    if "head_dim" in tags:
        return "head_dim"
    if "residual" in tags:
        return "embed"
    outs = {_layer_op(m.node) for m in g.tensors if m.role == OUT}
    ins = {_layer_op(m.node) for m in g.tensors if m.role == IN}
    if outs and ins and outs <= LINEAR and ins <= LINEAR:
        return "mlp"
    return "channels"


def _layer_op(node) -> str:
    """The op a member's tensor feeds: a QDQ weight's DequantizeLinear stands for the layer reading it."""
    if node.op_type == "DequantizeLinear":
        uses = list(node.outputs[0].uses())
        if len(uses) == 1:
            return uses[0].node.op_type
    return node.op_type


def _assign_sets(ctx: Analysis, groups: list[Group]) -> None:
    """Isomorphic sets: groups with the same canonical structure (ops, roles,
    axes, kernel shapes, layout kinds; widths normalised away)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for g in groups:
        desc = Counter(_descriptor(ctx, m) for m in g.tensors)
        key = repr((g.kind, sorted(desc.items()), sorted(g.space.tags - {"residual"})))
        g.signature = hashlib.sha1(key.encode()).hexdigest()[:10]
        if g.frozen:
            continue
        if key not in names:
            # first set with a label takes it; later ones add their width, then a counter
            base = f"{g.kind}:{g.label()}"
            name, n = base, 1
            if name in taken:
                name = f"{base}@{g.width}"
            while name in taken:
                n += 1
                name = f"{base}#{n}"
            taken.add(name)
            names[key] = name
        g.set_name = names[key]


def isomorphic_sets(groups: list[Group]) -> dict[str, list[Group]]:
    out: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        if g.set_name:
            out[g.set_name].append(g)
    return dict(out)

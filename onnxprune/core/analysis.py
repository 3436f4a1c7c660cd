"""Propagate channel spaces through a graph and collect the members of each space.

The driver walks nodes in topological order and calls the rule registered for
each op type (``onnxprune/rules``). A rule reads the layouts of its inputs
(one :class:`Space` or ``None`` per axis), registers the constant axes it owns
as members, and sets the layouts of its outputs. Anything a rule cannot prove
safe is frozen with a reason; unknown ops freeze everything they touch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_ir as ir

from .members import IN, OUT, PARAM, AttrMember, ShapeMember, TensorMember
from .space import LayoutError, Space, SpaceTable

log = logging.getLogger(__name__)

Layout = tuple  # tuple[Space | None, ...]


@dataclass
class FrozenNote:
    where: str
    reason: str


@dataclass
class Analysis:
    """State of one analysis: spaces, per-value layouts and members."""

    model: ir.Model
    table: SpaceTable = field(default_factory=SpaceTable)
    layouts: dict = field(default_factory=dict)  # ir.Value -> Layout
    tensors: list[TensorMember] = field(default_factory=list)
    shapes: list[ShapeMember] = field(default_factory=list)
    attrs: list[AttrMember] = field(default_factory=list)
    notes: list[FrozenNote] = field(default_factory=list)
    sym_alias: dict = field(default_factory=dict)  # symbolic dim name -> token it stands for
    extents: dict = field(default_factory=dict)  # (id(node), name) -> Space: widths no axis carries (metrics)
    dim_tokens: dict = field(default_factory=dict)  # value name -> probed dims (see io.probe_batch_dims)
    unhandled: dict = field(default_factory=dict)  # op type -> count of nodes no rule analysed

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    # -- value facts ------------------------------------------------------------------
    @staticmethod
    def const(v: ir.Value | None) -> np.ndarray | None:
        """The value of a constant; a quantized weight (``DequantizeLinear`` of a
        constant, QDQ graphs) reads as its dequantized value."""
        if v is None:
            return None
        if v.const_value is not None:
            return v.const_value.numpy()
        dq = dequantized(v)
        if dq is None:
            return None
        q, scale, zp, axis = dq_parts(dq)
        return ((q.astype(np.float32) - zp) * scale).astype(np.float32)

    @staticmethod
    def dims(v: ir.Value) -> list[int | None] | None:
        if v.shape is None:
            if v.const_value is not None:
                return list(v.const_value.shape)
            return None
        return [d if isinstance(d, int) else None for d in v.shape.dims]

    def rank(self, v: ir.Value) -> int | None:
        d = self.dims(v)
        return None if d is None else len(d)

    def attr(self, node: ir.Node, name: str, default=None):
        a = node.attributes.get(name)
        return default if a is None else a.value

    # -- layouts ----------------------------------------------------------------------
    def layout(self, node: ir.Node, slot: int) -> Layout | None:
        """Layout of input ``slot`` of ``node``. A constant used as data gets fresh
        atoms on its non-broadcast axes, owned by this use (so shared tensors
        can be pruned differently per consumer)."""
        v = node.inputs[slot] if slot < len(node.inputs) else None
        if v is None:
            return None
        if dequantized(v) is not None:
            return self._quantized_layout(node, slot, v)
        if v in self.layouts:
            # a space that can no longer be pruned is a plain extent from here on
            return tuple(s if s is None or self.table.prunable(s) else None for s in self.layouts[v])
        arr = self.const(v)
        if arr is not None:
            lay = []
            for ax, n in enumerate(arr.shape):
                if n > 1 and np.issubdtype(arr.dtype, np.floating):
                    s = self.table.atom(n, origin=f"const {v.name}")
                    self.tensors.append(TensorMember(node, slot, ax, s, PARAM))
                    lay.append(s)
                else:
                    lay.append(None)
            return tuple(lay)
        r = self.rank(v)
        return None if r is None else (None,) * r

    def _quantized_layout(self, node: ir.Node, slot: int, v: ir.Value) -> Layout:
        """A quantized constant used as data: fresh atoms as for a constant, the
        members bound to the DequantizeLinear that makes it."""
        lay = []
        for ax, n in enumerate(self.dims(v) or ()):
            if n is not None and n > 1:
                s = self.table.atom(n, origin=f"const {v.name}")
                self.member(node, slot, ax, s, PARAM)
                lay.append(s)
            else:
                lay.append(None)
        return tuple(lay)

    def set_layout(self, v: ir.Value | None, lay) -> None:
        if v is not None and lay is not None:
            self.layouts[v] = tuple(lay)

    def spaces_of(self, v: ir.Value) -> list[Space]:
        return [s for s in self.layouts.get(v, ()) if s is not None]

    # -- members ----------------------------------------------------------------------
    def member(self, node: ir.Node, slot: int, axis: int, space: Space | None, role: str) -> None:
        """Axis ``axis`` of input ``slot`` of ``node`` belongs to ``space``. For a quantized
        weight the member is the integer tensor behind its DequantizeLinear, plus its
        scale and zero point when they are per channel along that axis."""
        if space is None or slot >= len(node.inputs) or node.inputs[slot] is None:
            return
        dq = dequantized(node.inputs[slot])
        if dq is None:
            self.tensors.append(TensorMember(node, slot, axis, space, role))
            return
        self.tensors.append(TensorMember(dq, 0, axis, space, role))
        q, _, _, qaxis = dq_parts(dq)
        if self.const(dq.inputs[1]).ndim > 1:
            self.freeze([space], dq, "blocked quantization scales")
            return
        for s in (1, 2):
            p = self.const(dq.inputs[s]) if s < len(dq.inputs) and dq.inputs[s] is not None else None
            if p is not None and p.ndim == 1 and p.size > 1 and qaxis == axis:
                self.tensors.append(TensorMember(dq, s, 0, space, PARAM))

    def shape_entry(self, node, slot, index, spaces, sign=1) -> None:
        self.shapes.append(ShapeMember(node, slot, index, list(spaces), sign))

    def attr_entry(self, node, name, spaces, index=None) -> None:
        self.attrs.append(AttrMember(node, name, list(spaces), index))

    def extent(self, node, name: str, space: Space | None) -> None:
        """Name a width that no tensor axis carries (a fused op's q hidden size),
        for cost terms that refer to it as ``("x", name, 0)``."""
        if space is not None:
            self.extents[(id(node), name)] = space

    # -- constraints ------------------------------------------------------------------
    def where(self, node: ir.Node) -> str:
        return f"{node.op_type} '{node.name}'"

    def freeze(self, spaces, node: ir.Node | None, reason: str) -> None:
        spaces = [s for s in spaces if s is not None]
        if not spaces:
            return
        if any(self.table.prunable(s) for s in spaces):
            self.notes.append(FrozenNote(self.where(node) if node else "graph", reason))
        full = f"{reason} at {self.where(node)}" if node else reason
        for s in spaces:
            self.table.freeze(s, full)

    def freeze_node(self, node: ir.Node, reason: str) -> None:
        """Freeze every space on every input and output of ``node``; outputs become untracked."""
        sp: list[Space] = []
        for i, v in enumerate(node.inputs):
            if v is not None and v in self.layouts:
                sp.extend(s for s in self.layouts[v] if s is not None)
        self.freeze(sp, node, reason)
        for o in node.outputs:
            r = self.rank(o)
            if r is not None:
                self.layouts[o] = (None,) * r

    def tie(self, a: Space | None, b: Space | None, node: ir.Node, what: str = "") -> Space | None:
        """Unify two axes. A tracked axis tied to an untracked one of width > 1 is frozen."""
        if a is None and b is None:
            return None
        if a is None or b is None:
            self.freeze([a or b], node, f"channels meet an untracked axis{what}")
            return a or b
        try:
            return self.table.unify(a, b)
        except LayoutError as e:
            self.freeze([a, b], node, f"{e}{what}")
            return self.table.find(a)


def dequantized(v: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear node that makes ``v`` from a constant (a QDQ weight), or None."""
    if v is None or v.const_value is not None:
        return None
    n = v.producer()
    if n is None or n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx", "com.microsoft"):
        return None
    if n.inputs[0] is None or n.inputs[0].const_value is None:
        return None
    if any(x is not None and x.const_value is None for x in n.inputs[1:]):
        return None
    return n


def dq_parts(dq: ir.Node):
    """(integer tensor, scale, zero point, axis) of a constant DequantizeLinear,
    scale and zero point shaped to broadcast against the tensor."""
    q = dq.inputs[0].const_value.numpy()
    scale = dq.inputs[1].const_value.numpy().astype(np.float32)
    zp = dq.inputs[2].const_value.numpy().astype(np.float32) if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros((), np.float32)
    a = dq.attributes.get("axis")
    axis = (a.value if a is not None else 1) % max(q.ndim, 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if zp.size > 1 else zp
    return q, scale, zp, axis


Rule = Callable[[Analysis, ir.Node], None]
RULES: dict = {}  # op type (default domain) or (domain, op type) -> rule
DEFAULT_DOMAINS = ("", "ai.onnx")


def register(*op_types: str, domain: str = ""):
    """Register a rule for op types of ``domain`` (the ONNX default domain unless given)."""
    def deco(fn: Rule) -> Rule:
        for op in op_types:
            key = op if domain in DEFAULT_DOMAINS else (domain, op)
            if key in RULES and RULES[key] is not fn:
                raise ValueError(f"two rules for {key}: {RULES[key].__module__}.{RULES[key].__name__} and {fn.__module__}.{fn.__name__}")
            RULES[key] = fn
        return fn

    return deco


def rule_for(node: ir.Node) -> Rule | None:
    if node.domain in DEFAULT_DOMAINS:
        return RULES.get(node.op_type)
    return RULES.get((node.domain, node.op_type))


def run_analysis(model: ir.Model) -> Analysis:
    from .. import rules  # noqa: F401  (fills RULES)

    ctx = Analysis(model)
    g = model.graph
    ctx.dim_tokens = g.meta.get("dim_tokens") or {}
    for v in g.inputs:
        r = ctx.rank(v)
        if r is not None:
            ctx.layouts[v] = (None,) * r
    for node in g:
        rule = rule_for(node)
        if rule is None:
            what = node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"
            ctx.unhandled[what] = ctx.unhandled.get(what, 0) + 1
            ctx.freeze_node(node, f"no rule for {what}")
            continue
        try:
            rule(ctx, node)
        except LayoutError as e:
            ctx.freeze_node(node, str(e))
        for o in node.outputs:
            if o not in ctx.layouts:
                r = ctx.rank(o)
                if r is not None:
                    ctx.layouts[o] = (None,) * r
    for v in g.outputs:
        ctx.freeze(ctx.spaces_of(v), None, f"reaches graph output '{v.name}'")
    return ctx


__all__ = ["Analysis", "register", "rule_for", "run_analysis", "RULES", "IN", "OUT", "PARAM"]

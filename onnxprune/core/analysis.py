"""Propagate channel spaces through a graph and collect the members of each space.

The driver (:func:`run_analysis`) walks nodes in topological order and calls the
rule a :class:`~onnxprune.core.registry.Registry` gives for each node's domain,
op type and opset. Unknown ops freeze everything they touch.

**The rule contract.** A rule is ``rule(ctx: RuleContext, node) -> None``. Through
``ctx`` (and nothing else) it may

- *read*: ``layout`` (its inputs' axes: one :class:`Space` or ``None`` each),
  ``known``, ``const``, ``dims``, ``rank``, ``tokens``, ``attr``, ``opset``,
  ``quantized_weight``;
- *build spaces*: ``ctx.spaces`` (atom, fixed, product, concat, split, factor,
  tag, find, same, leaves): the space algebra without its freeze;
- *declare*: ``set_layout`` of its outputs, ``tie`` two axes, and the members it
  owns: ``member`` (an initializer axis), ``shape_entry`` (an entry of a shape
  constant), ``attr_entry`` (an attribute), ``extent`` (a width no tensor carries),
  ``alias`` (what a symbolic dim stands for);
- *refuse*, one channel: ``ctx.freeze(spaces, node, reason)``; ``freeze_node``
  and ``raise Refusal(reason)`` (also any ``LayoutError`` from the algebra) end
  there too. A refusal freezes the spaces with ``"reason at Op 'node'"``; the
  reason travels with every group that holds the space, into the plan and the
  report's "why frozen".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_ir as ir

from onnxprune.core import dims as D
from onnxprune.core.members import IN, OUT, PARAM, AttrMember, ShapeMember, TensorMember
from onnxprune.core.quant import dq_node, dq_parts, dq_value
from onnxprune.core.registry import DEFAULT_DOMAINS, Registry
from onnxprune.core.space import LayoutError, Space, SpaceTable

log = logging.getLogger(__name__)

Layout = tuple  # tuple[Space | None, ...]


class Refusal(Exception):
    """Raised by a rule that cannot analyse its node: every space on the node's
    inputs and outputs is frozen with this reason."""


@dataclass
class Analysis:
    """State of one analysis: spaces, per-value layouts and members."""

    model: ir.Model
    table: SpaceTable = field(default_factory=SpaceTable)
    layouts: dict = field(default_factory=dict)  # ir.Value -> Layout
    tensors: list[TensorMember] = field(default_factory=list)
    shapes: list[ShapeMember] = field(default_factory=list)
    attrs: list[AttrMember] = field(default_factory=list)
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
        return dq_value(v)

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

    def opset(self, domain: str = "") -> int:
        """The model's opset for ``domain`` (the default domain's is 1 if absent; others 1)."""
        imports = self.model.opset_imports
        if domain in DEFAULT_DOMAINS:
            return imports.get("", imports.get("ai.onnx", 1))
        return imports.get(domain, 1)

    # -- layouts ----------------------------------------------------------------------
    def layout(self, node: ir.Node, slot: int) -> Layout | None:
        """Layout of input ``slot`` of ``node``. A constant used as data gets fresh
        atoms on its non-broadcast axes, owned by this use (so shared tensors
        can be pruned differently per consumer)."""
        v = node.inputs[slot] if slot < len(node.inputs) else None
        if v is None:
            return None
        if dq_node(v) is not None:
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
        dq = dq_node(node.inputs[slot])
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


Rule = Callable[["RuleContext", ir.Node], None]


class SpaceAlgebra:
    """What a rule may do with spaces: build and relate them, never freeze one
    (that goes through :meth:`RuleContext.freeze`, with a reason and a place)."""

    __slots__ = ("_t",)

    def __init__(self, table: SpaceTable):
        self._t = table

    def atom(self, size: int, origin: str = "") -> Space:
        return self._t.atom(size, origin)

    def fixed(self, size: int | None, origin: str = "") -> Space:
        return self._t.fixed(size, origin)

    def product(self, parts: list[Space], origin: str = "") -> Space:
        return self._t.product(parts, origin)

    def concat(self, parts: list[Space], origin: str = "") -> Space:
        return self._t.concat(parts, origin)

    def split(self, s: Space, sizes: list[int], origin: str = "") -> list[Space]:
        return self._t.split(s, sizes, origin)

    def factor(self, s: Space, sizes: list[int], origin: str = "", scales: list[int] | None = None) -> list[Space]:
        return self._t.factor(s, sizes, origin, scales)

    def tag(self, s: Space | None, tag: str) -> None:
        self._t.tag(s, tag)

    def find(self, s: Space) -> Space:
        """The representative of ``s`` (axes tied together share one)."""
        return self._t.find(s)

    def same(self, a: Space | None, b: Space | None) -> bool:
        return a is not None and b is not None and self._t.find(a) is self._t.find(b)

    def leaves(self, s: Space) -> list[Space]:
        return self._t.leaves(s)


class RuleContext:
    """Everything a rule may read and declare (see the module docstring)."""

    __slots__ = ("_a", "spaces")

    def __init__(self, analysis: Analysis):
        self._a = analysis
        self.spaces = SpaceAlgebra(analysis.table)

    # read
    def layout(self, node: ir.Node, slot: int) -> Layout | None:
        return self._a.layout(node, slot)

    def known(self, v: ir.Value | None) -> Layout:
        """The layout already set for ``v`` (``()`` if none), without making
        members of a constant as :meth:`layout` does."""
        return self._a.layouts.get(v, ()) if v is not None else ()

    def spaces_of(self, v: ir.Value) -> list[Space]:
        return self._a.spaces_of(v)

    def const(self, v: ir.Value | None):
        return self._a.const(v)

    def dims(self, v: ir.Value):
        return self._a.dims(v)

    def rank(self, v: ir.Value) -> int | None:
        return self._a.rank(v)

    def tokens(self, v: ir.Value):
        """Dims of ``v`` as :mod:`~onnxprune.core.dims` tokens, aliases and probed dims applied."""
        return D.tokens(v, self._a)

    def attr(self, node: ir.Node, name: str, default=None):
        return self._a.attr(node, name, default)

    def opset(self, domain: str = "") -> int:
        return self._a.opset(domain)

    @staticmethod
    def quantized_weight(v: ir.Value | None) -> ir.Node | None:
        """The DequantizeLinear making ``v`` from constants (a QDQ weight), or None."""
        return dq_node(v)

    # declare
    def set_layout(self, v: ir.Value | None, lay) -> None:
        self._a.set_layout(v, lay)

    def tie(self, a: Space | None, b: Space | None, node: ir.Node, what: str = "") -> Space | None:
        return self._a.tie(a, b, node, what)

    def member(self, node: ir.Node, slot: int, axis: int, space: Space | None, role: str) -> None:
        self._a.member(node, slot, axis, space, role)

    def shape_entry(self, node, slot, index, spaces, sign=1) -> None:
        self._a.shape_entry(node, slot, index, spaces, sign)

    def attr_entry(self, node, name, spaces, index=None) -> None:
        self._a.attr_entry(node, name, spaces, index)

    def extent(self, node, name: str, space: Space | None) -> None:
        self._a.extent(node, name, space)

    def alias(self, name: str, token) -> None:
        """Symbolic dim ``name`` (invented by shape inference) stands for ``token``."""
        self._a.sym_alias[name] = token

    # refuse
    def freeze(self, spaces, node: ir.Node | None, reason: str) -> None:
        self._a.freeze(spaces, node, reason)

    def freeze_node(self, node: ir.Node, reason: str) -> None:
        self._a.freeze_node(node, reason)


def run_analysis(model: ir.Model, rules: Registry) -> Analysis:
    """Analyse ``model`` with ``rules`` (:func:`onnxprune.rules.default_registry` has them all)."""
    ctx = Analysis(model)
    view = RuleContext(ctx)
    g = model.graph
    ctx.dim_tokens = g.meta.get("dim_tokens") or {}
    for v in g.inputs:
        r = ctx.rank(v)
        if r is not None:
            ctx.layouts[v] = (None,) * r
    for node in g:
        rule = rules.lookup(node.domain, node.op_type, ctx.opset(node.domain))
        if rule is None:
            what = node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"
            ctx.unhandled[what] = ctx.unhandled.get(what, 0) + 1
            ctx.freeze_node(node, f"no rule for {what} (opset {ctx.opset(node.domain)})")
            continue
        try:
            rule(view, node)
        except (Refusal, LayoutError) as e:
            ctx.freeze_node(node, str(e))
        for o in node.outputs:
            if o not in ctx.layouts:
                r = ctx.rank(o)
                if r is not None:
                    ctx.layouts[o] = (None,) * r
    _freeze_subgraph_reads(ctx, g)
    for v in g.outputs:
        ctx.freeze(ctx.spaces_of(v), None, f"reaches graph output '{v.name}'")
    return ctx


def _inner_reads(graph: ir.Graph, out: set) -> None:
    """Every value a node of ``graph`` (or of a graph nested in it) reads, into ``out``."""
    for node in graph:
        out.update(v for v in node.inputs if v is not None)
        for attr in node.attributes.values():
            for sub in _subgraphs(attr):
                _inner_reads(sub, out)


def _subgraphs(attr) -> list:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.value]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.value)
    return []


def _freeze_subgraph_reads(ctx: Analysis, g: ir.Graph) -> None:
    """A value of the main graph that a subgraph reads (an ``If`` branch or a
    ``Loop`` body using an outer activation or weight) is read by nodes no rule
    saw: every space on it, and on every member tensor it is, is frozen."""
    for node in g:
        reads: set = set()
        for attr in node.attributes.values():
            for sub in _subgraphs(attr):
                _inner_reads(sub, reads)
        if not reads:
            continue
        why = "read inside a subgraph"
        ctx.freeze([s for v in reads if v in ctx.layouts for s in ctx.layouts[v]], node, why)
        ctx.freeze([m.space for m in ctx.tensors if m.value in reads], node, why)


__all__ = ["Analysis", "RuleContext", "Refusal", "run_analysis", "IN", "OUT", "PARAM"]

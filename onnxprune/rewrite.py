"""The only code that edits an analysed model.

:func:`apply_plan` applies a plan: slice every member tensor, rewrite shape
constants and attributes, un-share constants whose consumers now need
different data. :func:`zero_removed` is the oracle's edit: zero the removed
channels instead. :func:`set_input` and :func:`add_bias_after` are the
recovery stage's edits: new weights for one node, a bias ``Add`` after one.
All of them can record into a :class:`Journal` and be undone."""
from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxprune.core.analysis import Analysis
from onnxprune.core.groups import Group
from onnxprune.core.quant import BIAS_TYPES, Dequantized, dq_constant, dq_parts

log = logging.getLogger(__name__)


def _edits(ctx: Analysis, keep: dict[int, np.ndarray]):
    """Per use (node, slot): axis slices and flat-entry overrides."""
    t = ctx.table
    slices: dict[tuple, dict[int, np.ndarray]] = defaultdict(dict)
    entries: dict[tuple, dict[int, int]] = defaultdict(dict)
    for m in ctx.tensors:
        idx = t.kept(m.space, keep)
        if len(idx) == m.space.size:
            continue
        key = (id(m.node), m.slot)
        prev = slices[key].get(m.axis)
        if prev is not None and not np.array_equal(prev, idx):
            raise RuntimeError(f"conflicting slices for {m.value.name} axis {m.axis}")
        slices[key][m.axis] = idx
    for m in ctx.shapes:
        new = m.sign * sum(t.size_after(s, keep) for s in m.spaces)
        entries[(id(m.node), m.slot)][m.index] = int(new)
    return slices, entries


class Journal:
    """Undo log of in-place edits, so one analysed model can be zeroed and
    rewritten many times (the oracle checks every isomorphic set on one
    analysis). Edits are undone in reverse order."""

    def __init__(self) -> None:
        self._undo: list = []

    def record(self, fn) -> None:
        self._undo.append(fn)

    def mark(self) -> int:
        """Where the log stands now: :meth:`undo` to it undoes only what came after."""
        return len(self._undo)

    def undo(self, to: int = 0) -> None:
        while len(self._undo) > to:
            self._undo.pop()()


def _set_const(value: ir.Value, tensor, journal: Journal | None) -> None:
    if journal is not None:
        old_t, old_s = value.const_value, value.shape
        journal.record(lambda: (setattr(value, "const_value", old_t), setattr(value, "shape", old_s)))
    value.const_value = tensor
    value.shape = ir.Shape(tensor.shape)


def _c_order(a) -> np.ndarray:
    """``a`` as a C-ordered array of the same rank (``np.ascontiguousarray``
    turns a scalar into a 1-element vector, which breaks shape arithmetic)."""
    return np.require(a, requirements="C")


def _sliced(src, sl: dict[int, np.ndarray], en: dict[int, int], name: str):
    """The tensor ``src`` sliced along axes and with flat entries replaced; lazy
    for large tensors (computed when written, so the weights are never held
    twice), eager for shape constants the analysis may read."""
    shape = list(src.shape)
    for a, idx in sl.items():
        shape[a] = len(idx)

    def compute():
        new = src.numpy()
        for a, idx in sl.items():
            new = np.take(new, idx, axis=a)
        if en:
            new = np.array(new).reshape(-1)
            for i, val in en.items():
                new[i] = val
            new = new.reshape(shape)
        return ir.Tensor(_c_order(new), name=name)

    if en or src.nbytes <= 4096:
        return compute()
    return ir.LazyTensor(compute, dtype=src.dtype, shape=ir.Shape(shape), name=name)


def apply_plan(ctx: Analysis, keep: dict[int, np.ndarray], journal: Journal | None = None) -> int:
    """Rewrite ``ctx.model`` in place; returns the number of tensors changed.
    With a ``journal``, every edit can be undone (``journal.undo()``)."""
    g = ctx.graph
    slices, entries = _edits(ctx, keep)
    nodes = {id(n): n for n in g}
    order = {id(n): i for i, n in enumerate(g)}
    touched: dict[ir.Value, list] = defaultdict(list)
    # graph order, so that new initializers are named and written deterministically
    for key in sorted(set(slices) | set(entries), key=lambda k: (order[k[0]], k[1])):
        node = nodes[key[0]]
        touched[node.inputs[key[1]]].append(key)
    changed = 0
    used_names = set(g.initializers) | {v.name for n in g for v in n.outputs}
    for value, keys in touched.items():
        src = value.const_value
        flat_src = None
        specs: dict[tuple, list] = defaultdict(list)
        for use in value.uses():
            key = (id(use.node), use.idx)
            sl = slices.get(key, {})
            en = entries.get(key, {})
            spec = (
                tuple(sorted((a, idx.tobytes()) for a, idx in sl.items())),
                tuple(sorted(en.items())),
            )
            specs[spec].append((use.node, use.idx, sl, en))
        for k, (spec, uses) in enumerate(sorted(specs.items(), key=lambda kv: len(kv[1]), reverse=True)):
            _, _, sl, en = uses[0]
            if not sl:
                if flat_src is None:
                    flat_src = src.numpy().reshape(-1)
                if not any(int(flat_src[i]) != v for i, v in en.items()):
                    continue  # this use keeps the original tensor
            changed += 1
            only_use = len(specs) == 1 and not value.is_graph_input() and not value.is_graph_output()
            if only_use:
                _set_const(value, _sliced(src, sl, en, value.name), journal)
                continue
            name = f"{value.name}__pruned{k}"
            while name in used_names:
                name += "_"
            used_names.add(name)
            tensor = _sliced(src, sl, en, name)
            nv = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
            g.register_initializer(nv)
            for node, slot, _, _ in uses:
                node.replace_input_with(slot, nv)
            if journal is not None:
                journal.record(lambda nv=nv: g.initializers.pop(nv.name))
                for node, slot, _, _ in uses:
                    journal.record(lambda node=node, slot=slot, old=value: node.replace_input_with(slot, old))
    t = ctx.table
    for m in ctx.attrs:
        new = sum(t.size_after(s, keep) for s in m.spaces)
        a = m.node.attributes[m.attr]
        if m.index is None:
            if a.value == new:
                continue
            na = ir.AttrInt64(m.attr, int(new))
        else:
            vals = list(a.value)
            vals[m.index] = int(new)
            na = ir.AttrInt64s(m.attr, vals)
        if journal is not None:
            journal.record(lambda node=m.node, a=a: node.attributes.__setitem__(a.name, a))
        m.node.attributes[m.attr] = na
    for name, v in list(g.initializers.items()):
        if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
            del g.initializers[name]
            if journal is not None:
                journal.record(lambda name=name, v=v: g.initializers.__setitem__(name, v))
    # stale intermediate shapes would be serialised as value_info
    outs = set(g.outputs)
    for node in g:
        for o in node.outputs:
            if o not in outs and o.shape is not None:
                if journal is not None:
                    journal.record(lambda o=o, s=o.shape: setattr(o, "shape", s))
                o.shape = None
    return changed


class ZeroMemo:
    """Zeroed tensors kept across calls of :func:`zero_removed` (the damage
    search zeroes the same plan plus one step candidate after candidate): an
    edit of a tensor object at the same positions gives back the tensor object
    made the first time, so unchanged tensors stay the same objects and are
    not copied again. The latest edits are kept, up to ``budget`` bytes."""

    def __init__(self, budget: int = 256 << 20) -> None:
        self.budget, self.bytes, self.hits = budget, 0, 0
        self._made: dict = {}  # (id of the tensor edited, positions, axis, fill) -> (that tensor, the edited one)

    def get(self, src, pos: np.ndarray, axis: int, fill: str, make):
        key = (id(src), pos.tobytes(), axis, fill)
        got = self._made.get(key)
        if got is not None and got[0] is src:  # the same object (an id is reused only after it is gone)
            self.hits += 1
            self._made[key] = self._made.pop(key)  # the latest last
            return got[1]
        out = make()
        self._made[key] = (src, out)
        self.bytes += out.nbytes
        while self.bytes > self.budget and len(self._made) > 1:
            _, old = self._made.pop(next(iter(self._made)))
            self.bytes -= old.nbytes
        return out


def zero_removed(ctx: Analysis, groups: list[Group], keep: dict[int, np.ndarray], journal=None,
                 consumer_only=frozenset(), memo: ZeroMemo | None = None) -> None:
    """Zero the removed channels of ``groups`` in every member tensor, in place,
    undoable through ``journal``. Groups in ``consumer_only`` (that have consumer
    members) are zeroed only where they are read. ``memo``: tensors zeroed
    before at the same positions are taken from it (:class:`ZeroMemo`)."""
    t = ctx.table
    for g in groups:
        if g.id not in keep:
            continue
        removed = np.setdiff1d(np.arange(g.width), keep[g.id])
        only_in = g.id in consumer_only and any(m.role == "in" for m in g.tensors)
        for m in g.tensors:
            if only_in and m.role != "in":
                continue
            v = m.value
            lm = t.leaf_map(m.space, g.space)
            pos = np.nonzero(np.isin(lm, removed))[0]
            if not len(pos):
                continue
            quant = m.node.op_type == "DequantizeLinear" and m.slot == 0
            # a removed channel must output 0: a divisor or exponent becomes 1, not 0 (0/0)
            neutral = 1 if m.node.op_type in ("Div", "Pow") and m.slot == 1 else 0

            def zeroed(v=v, m=m, pos=pos, quant=quant, neutral=neutral):
                arr = v.const_value.numpy().copy()
                idx = [slice(None)] * arr.ndim
                idx[m.axis] = pos
                if quant:  # a quantized weight is 0 where it equals its zero point
                    _, _, zp, _ = dq_parts(m.node)
                    arr[tuple(idx)] = np.broadcast_to(zp, arr.shape)[tuple(idx)].astype(arr.dtype)
                else:
                    arr[tuple(idx)] = neutral
                return ir.Tensor(arr, name=v.name)

            src = v.const_value
            new = memo.get(src, pos, m.axis, "zp" if quant else str(neutral), zeroed) if memo is not None else zeroed()
            if journal is not None:
                journal.record(lambda v=v, old=src: setattr(v, "const_value", old))
            v.const_value = new


def unique_node_names(nodes) -> list[str]:
    """A unique name per node of ``nodes`` (``(name, op_type, first output)``
    triples, in graph order): its own, unless it has none or an earlier node
    took it; then the op and the first output, ``Conv:538``, made unique against
    every name in use. Deterministic, so an original model and its pruned copy
    (the same values) get the same names."""
    taken = {n for n, _, _ in nodes if n}
    seen, out = set(), []
    for name, op, first in nodes:
        if not name or name in seen:
            name = f"{op}:{first}"
            while name in taken:
                name += "_"
            taken.add(name)
        seen.add(name)
        out.append(name)
    return out


def needs_names(names) -> bool:
    """Whether some node of a graph has no name or shares one (``names``: its nodes' names)."""
    names = list(names)
    return not all(names) or len(set(names)) < len(names)


def name_nodes(graph: ir.Graph) -> int:
    """Give every node of ``graph`` a unique name (:func:`unique_node_names`):
    recovery and its report address layers by name, and old exporters name
    none (some name two nodes alike). Returns how many were renamed."""
    nodes = list(graph)
    names = unique_node_names([(n.name, n.op_type, n.outputs[0].name if n.outputs else "") for n in nodes])
    changed = 0
    for n, name in zip(nodes, names):
        if n.name != name:
            n.name = name
            changed += 1
    return changed


def _fresh(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers) | {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None}
    name = base
    while name in taken:
        name += "_"
    return name


def _initializer(graph: ir.Graph, array: np.ndarray, base: str, journal: Journal | None) -> ir.Value:
    name = _fresh(graph, base)
    tensor = ir.Tensor(_c_order(array), name=name)
    v = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(v)
    if journal is not None:
        journal.record(lambda: graph.initializers.pop(name))
    return v


def set_input(node: ir.Node, slot: int, array: np.ndarray, tag: str, journal: Journal | None = None) -> None:
    """Give ``node``'s input ``slot`` the constant ``array``: in place when only
    this node reads the initializer, else as a new initializer named after the
    node and ``tag`` (an empty or missing slot, e.g. a bias, is filled)."""
    graph = node.graph
    old = node.inputs[slot] if slot < len(node.inputs) else None
    alone = (old is not None and old.name in graph.initializers and len(old.uses()) == 1
             and not old.is_graph_input() and not old.is_graph_output())
    if alone:
        _set_const(old, ir.Tensor(_c_order(array), name=old.name), journal)
        return
    new = _initializer(graph, array, f"{node.name or (old.name if old is not None else 'node')}__{tag}", journal)
    if slot >= len(node.inputs):
        n = len(node.inputs)
        node.resize_inputs(slot + 1)
        if journal is not None:
            journal.record(lambda: node.resize_inputs(n))
    node.replace_input_with(slot, new)
    if journal is not None:
        journal.record(lambda: node.replace_input_with(slot, old))


def add_bias_after(node: ir.Node, bias: np.ndarray, journal: Journal | None = None) -> ir.Node:
    """``node``'s first output ``y`` becomes ``Add(y', bias)``: the new node's
    output takes ``y``'s name and every reader of ``y``, graph outputs included."""
    graph = node.graph
    y = node.outputs[0]
    b = _initializer(graph, bias, f"{node.name}__recover_bias", journal)
    readers = [(u.node, u.idx) for u in y.uses()]
    add = ir.Node("", "Add", [y, b], name=_fresh(graph, f"{node.name}__recover_bias_add"), num_outputs=1)
    out = add.outputs[0]
    out.type, out.shape = y.type, y.shape
    graph.insert_after(node, add)
    for n, i in readers:
        n.replace_input_with(i, out)
    slots = [i for i, o in enumerate(graph.outputs) if o is y]
    for i in slots:
        graph.outputs[i] = out
    name = y.name
    y.name = _fresh(graph, f"{name}__pre_bias")
    out.name = name
    if journal is not None:
        def undo() -> None:
            out.name = f"{name}__recover_tmp"
            y.name = name
            for i in slots:
                graph.outputs[i] = y
            for n, i in readers:
                n.replace_input_with(i, y)
            graph.remove(add, safe=True)
        journal.record(undo)
    return add


def shift_output(node: ir.Node, shift: np.ndarray, journal: Journal | None = None) -> bool:
    """Add ``shift`` (one value per output channel) to what a Conv, Gemm or
    MatMul produces, through its bias: the Conv's or Gemm's bias input (made
    when missing; ``beta`` undone), a MatMul's following ``Add`` of a constant,
    else a new ``Add``; a QDQ model's int32 bias on its own grid. Returns False
    (nothing changed) where the bias is neither a plain nor a quantized constant."""
    op = node.op_type
    shift = np.asarray(shift, np.float64)
    if op in ("Conv", "Gemm"):
        beta = node.attributes.get("beta") if op == "Gemm" else None
        scale = float(beta.value) if beta is not None else 1.0
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if b is None:
            w = node.inputs[1]
            dt = w.const_value.numpy().dtype if w is not None and w.const_value is not None else np.dtype(np.float32)
            set_input(node, 2, (shift / scale).astype(dt), "shift_b", journal)
            return True
        if b.const_value is None:  # a quantized bias moves on its own grid (its scale kept)
            dq = dq_constant(b, lambda v: v.const_value.numpy() if v is not None and v.const_value is not None
                             and v.name in node.graph.initializers else None, BIAS_TYPES)
            if not isinstance(dq, Dequantized) or dq.q.ndim != 1 or dq.q.size not in (1, len(shift)) \
                    or dq.q.size != len(shift) and np.any(shift != shift[0]):
                return False
            q, _ = dq.quantize(dq.value().astype(np.float64) + shift[:dq.q.size] / scale, dq.scale)
            set_input(dq.node, 0, q, "shift_bq", journal)
            return True
        old = b.const_value.numpy()
        if not np.issubdtype(old.dtype, np.floating) or old.ndim and old.shape[-1] not in (1, len(shift)):
            return False
        new = old.astype(np.float64) + (shift / scale).reshape((1,) * max(old.ndim - 1, 0) + (-1,))
        set_input(node, 2, new.astype(old.dtype), "shift_b", journal)
        return True
    if op != "MatMul":
        return False
    found = matmul_bias(node, len(shift))
    if found is not None:
        add, slot, old = found
        set_input(add, slot, (old.astype(np.float64) + shift.reshape(old.shape)).astype(old.dtype), "shift_b", journal)
    else:
        add_bias_after(node, shift.astype(np.float32), journal)
    return True


def matmul_bias(node: ir.Node, width: int, const=None) -> tuple[ir.Node, int, np.ndarray] | None:
    """A MatMul's bias: the ``Add`` that alone reads its output and adds a float
    constant of ``width`` entries along the last axis, as ``(the Add, the
    constant's slot, its value)``, else None. ``const(value)`` reads a constant
    (default: an initializer's array)."""
    y = node.outputs[0]
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output() or uses[0].node.op_type != "Add":
        return None
    add, slot = uses[0].node, 1 - uses[0].idx
    c = add.inputs[slot]
    if const is not None:
        arr = const(c)
    else:
        arr = c.const_value.numpy() if c is not None and c.const_value is not None else None
    if arr is None or not np.issubdtype(arr.dtype, np.floating) or arr.size != width or not arr.shape \
            or arr.shape[-1] != width:
        return None
    return add, slot, arr

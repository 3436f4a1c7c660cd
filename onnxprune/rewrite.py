"""Apply a plan: slice every member tensor, rewrite shape constants and
attributes, un-share constants whose consumers now need different data."""
from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from .core.analysis import Analysis

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


def apply_plan(ctx: Analysis, keep: dict[int, np.ndarray]) -> int:
    """Rewrite ``ctx.model`` in place; returns the number of tensors changed."""
    g = ctx.graph
    slices, entries = _edits(ctx, keep)
    nodes = {id(n): n for n in g}
    touched: dict[ir.Value, list] = defaultdict(list)
    for key in set(slices) | set(entries):
        node = nodes[key[0]]
        touched[node.inputs[key[1]]].append(key)
    changed = 0
    used_names = set(g.initializers) | {v.name for n in g for v in n.outputs}
    for value, keys in touched.items():
        arr = value.const_value.numpy()
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
            new = arr
            for a, idx in sl.items():
                new = np.take(new, idx, axis=a)
            if en:
                flat = np.array(new).reshape(-1).copy()
                for i, val in en.items():
                    flat[i] = val
                new = flat.reshape(new.shape)
            if not sl and not any(int(arr.reshape(-1)[i]) != v for i, v in en.items()):
                continue  # this use keeps the original tensor
            changed += 1
            only_use = len(specs) == 1 and not value.is_graph_input() and not value.is_graph_output()
            if only_use:
                value.const_value = ir.Tensor(np.ascontiguousarray(new), name=value.name)
                value.shape = ir.Shape(new.shape)
                continue
            name = f"{value.name}__pruned{k}"
            while name in used_names:
                name += "_"
            used_names.add(name)
            tensor = ir.Tensor(np.ascontiguousarray(new), name=name)
            nv = ir.Value(name=name, shape=ir.Shape(new.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
            g.register_initializer(nv)
            for node, slot, _, _ in uses:
                node.replace_input_with(slot, nv)
    t = ctx.table
    for m in ctx.attrs:
        new = sum(t.size_after(s, keep) for s in m.spaces)
        a = m.node.attributes[m.attr]
        if m.index is None:
            if a.value != new:
                m.node.attributes[m.attr] = ir.AttrInt64(m.attr, int(new))
        else:
            vals = list(a.value)
            vals[m.index] = int(new)
            m.node.attributes[m.attr] = ir.AttrInt64s(m.attr, vals)
    for name, v in list(g.initializers.items()):
        if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
            del g.initializers[name]
    # stale intermediate shapes would be serialised as value_info
    outs = set(g.outputs)
    for node in g:
        for o in node.outputs:
            if o not in outs:
                o.shape = None
    return changed

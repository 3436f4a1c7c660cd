"""Recovery's view of the models: which nodes can be re-fitted and how
(:func:`plan_fit`), in which order (levels), and the write-back of new
weights into the working proto (:class:`Graph`).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.recover.fit import LayerRow, _Fit

class _Graph:
    """Name-indexed view of a ModelProto that is edited in place."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.g = proto.graph
        self.refresh()

    def refresh(self) -> None:
        g = self.g
        self.nodes = {n.name: n for n in g.node if n.name}
        self.inits = {t.name: t for t in g.initializer}
        self.uses: dict[str, list] = defaultdict(list)
        for n in g.node:
            for i, v in enumerate(n.input):
                if v:
                    self.uses[v].append((n, i))
        self.outputs = {o.name for o in g.output}
        inits = set(self.inits)
        self.inputs = [i.name for i in g.input if i.name not in inits]

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def set_const(self, node, slot: int, arr: np.ndarray, tag: str) -> None:
        """Write ``arr`` into ``node``'s input ``slot``, un-sharing the initializer
        if anything else reads it (or adding the input if the slot is empty)."""
        arr = np.ascontiguousarray(arr.astype(np.float32))
        name = node.input[slot] if slot < len(node.input) else ""
        shared = name and (len(self.uses.get(name, [])) > 1 or name in self.outputs or name in self.inputs)
        if name and not shared and name in self.inits:
            self.inits[name].CopyFrom(numpy_helper.from_array(arr, name))
            return
        new = self._fresh(f"{node.name or name}__{tag}")
        self.g.initializer.append(numpy_helper.from_array(arr, new))
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = new
        self.refresh()

    def _fresh(self, base: str) -> str:
        taken = set(self.inits) | {v for n in self.g.node for v in list(n.input) + list(n.output)}
        name = base
        while name in taken:
            name += "_"
        return name

    def insert_bias_add(self, node, bias: np.ndarray) -> None:
        """``node``'s output ``y`` becomes ``Add(y', bias)``: downstream names unchanged."""
        out = node.output[0]
        mid = self._fresh(f"{out}__pre_bias")
        bname = self._fresh(f"{node.name}__recover_bias")
        self.g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias.astype(np.float32)), bname))
        node.output[0] = mid
        add = helper.make_node("Add", [mid, bname], [out], name=self._fresh(f"{node.name}__recover_bias_add"))
        # rebuild the node list (NodeProto references held elsewhere go stale:
        # callers look nodes up by name)
        nodes = []
        for n in self.g.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            nodes.append(c)
            if n.name == node.name:
                nodes.append(add)
        del self.g.node[:]
        self.g.node.extend(nodes)
        self.refresh()


def _kept_maps(ctx, keep):
    """node name -> list of (slot, axis, kept, width) for IN and OUT members."""
    from onnxprune.core.members import IN, OUT

    ins, outs = defaultdict(list), defaultdict(list)
    for m in ctx.tensors:
        if m.role not in (IN, OUT) or m.space.size is None:
            continue
        k = ctx.table.kept(m.space, keep)
        (ins if m.role == IN else outs)[m.node.name].append((m.slot, m.axis, k, m.space.size, m.node.op_type))
    return ins, outs


def _levels(g: _Graph, names: set[str]) -> dict[str, int]:
    """Level of each consumer: 1 + the highest level of a consumer upstream of it."""
    lv: dict[str, int] = {}
    out: dict[str, int] = {}
    for n in g.g.node:
        up = max((lv.get(v, -1) for v in n.input if v), default=-1)
        if n.name in names:
            out[n.name] = up + 1
            up = up + 1
        for o in n.output:
            lv[o] = up
    return out


def _conv_geometry(g: _Graph, node, w: np.ndarray) -> dict | str:
    if w.ndim != 4:
        return "only 2-D convolutions are re-fitted"
    auto = g.attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return dict(k=tuple(w.shape[2:]), s=list(g.attr(node, "strides", [1, 1])), d=list(g.attr(node, "dilations", [1, 1])),
                pads=list(g.attr(node, "pads", [0, 0, 0, 0])), auto=auto)


def _plan_fit(g: _Graph, orig: _Graph, name: str, ins, outs, max_features: int, method: str) -> _Fit | LayerRow:
    node = g.nodes.get(name)
    op = node.op_type if node is not None else "?"
    row = LayerRow(node=name, op=op, status="skipped", method=method)
    if node is None:
        row.reason = "node not found in the pruned model"
        return row
    if name not in orig.nodes:
        row.reason = "node not found in the original model (unnamed or renamed)"
        return row
    io_in = ins[name]
    row.inputs_kept = ", ".join(f"{len(k)}/{w}" for _, _, k, w, _ in io_in)
    if op not in ("Conv", "Gemm", "MatMul"):
        row.reason = f"{op} is not re-fitted (only Conv, Gemm, MatMul)"
        return row
    wslot = 1
    if any(s != 1 for s, *_ in io_in):
        row.reason = "the constant is the first operand"
        return row
    w = g.const(node.input[1]) if len(node.input) > 1 else None
    if w is None or g.const(node.input[0]) is not None:
        row.reason = "weight is not a constant initializer (or the data input is)"
        return row
    if w.dtype != np.float32:
        row.reason = f"weight dtype {w.dtype} (only float32)"
        return row
    y_node = orig.nodes[name]
    # surviving output channels (indices of the original's output axis)
    out_axis = {"Conv": 0, "Gemm": 0 if g.attr(node, "transB", 0) else 1, "MatMul": w.ndim - 1}[op]
    ko = [(k, wd) for s, a, k, wd, _ in outs.get(name, []) if s == wslot and a == out_axis]
    width_now = w.shape[out_axis]
    kept_out, width0 = ko[0] if ko else (np.arange(width_now), width_now)
    if len(kept_out) != width_now:
        row.reason = f"kept outputs ({len(kept_out)}) do not match the pruned weight ({width_now})"
        return row
    row.outputs_kept = f"{len(kept_out)}/{width0}"
    fit_kw = dict(row=row, node=node, x_name=node.input[0], y_name=y_node.output[0], kept_out=np.asarray(kept_out))
    if op == "Conv":
        grp = int(g.attr(node, "group", 1))
        m, cpg = w.shape[:2]
        if m % grp:
            row.reason = "group does not divide the output channels"
            return row
        geo = _conv_geometry(g, node, w)
        if isinstance(geo, str):
            row.reason = geo
            return row
        b = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(m, np.float32)
        if b is None:
            row.reason = "Conv bias is not a constant"
            return row
        if cpg == 1 and grp > 1:
            row.reason = "depthwise: one input per output channel (re-fitting it did not generalise on held-out data in our runs)"
            return row
        mpg = m // grp
        groups, w0 = [], []
        for gi in range(grp):
            osl = slice(gi * mpg, (gi + 1) * mpg)
            groups.append((slice(gi * cpg, (gi + 1) * cpg), osl))
            w0.append(np.vstack([w[osl].reshape(mpg, -1).T, b[osl][None]]).astype(np.float64))
        d = cpg * w.shape[2] * w.shape[3]
        if d + 1 > max_features:
            row.reason = f"{d} features per group exceed max_features={max_features}"
            return row
        row.features = d
        return _Fit(groups=groups, w0=w0, kind="conv", conv=geo, **fit_kw)
    if op == "Gemm":
        ta, tb = int(g.attr(node, "transA", 0)), int(g.attr(node, "transB", 0))
        alpha, beta = float(g.attr(node, "alpha", 1.0)), float(g.attr(node, "beta", 1.0))
        W = (w.T if tb else w) * alpha  # [K, N]
        n_out = W.shape[1]
        if len(node.input) > 2 and node.input[2]:
            c = g.const(node.input[2])
            if c is None:
                row.reason = "Gemm C is not a constant"
                return row
            if c.size not in (1, n_out) or (c.ndim == 2 and c.shape[0] != 1):
                row.reason = f"Gemm C of shape {list(c.shape)} is not a per-output bias"
                return row
            bias = np.broadcast_to(c.reshape(-1), (n_out,)) * beta
        else:
            bias = np.zeros(n_out)
        if beta == 0:
            row.reason = "Gemm beta is 0: no bias to move"
            return row
        if W.shape[0] + 1 > max_features:
            row.reason = f"{W.shape[0]} features exceed max_features={max_features}"
            return row
        row.features = W.shape[0]
        w0 = [np.vstack([W, bias[None]]).astype(np.float64)]
        return _Fit(groups=[(slice(None), slice(None))], w0=w0, kind="dense",
                    dense=dict(transA=ta, transB=tb, alpha=alpha, beta=beta), **fit_kw)
    # MatMul with a constant right operand
    if w.ndim != 2:
        row.reason = "MatMul weight with batch dimensions"
        return row
    bias_add, bias = None, np.zeros(w.shape[1])
    users = g.uses.get(node.output[0], [])
    if len(users) == 1 and node.output[0] not in g.outputs and users[0][0].op_type == "Add" and users[0][0].name:
        add, slot = users[0]
        other = add.input[1 - slot]
        c = g.const(other)
        if c is not None and c.dtype == np.float32 and c.size == w.shape[1] and c.shape[-1] == w.shape[1] \
                and len(g.uses[other]) >= 1:
            bias_add, bias = add, c.reshape(-1)
    if w.shape[0] + 1 > max_features:
        row.reason = f"{w.shape[0]} features exceed max_features={max_features}"
        return row
    row.features = w.shape[0]
    # the target is the original MatMul's own output (before its bias Add): the
    # fitted bias row is then added to the pruned bias
    w0 = [np.vstack([w, np.zeros((1, w.shape[1]))]).astype(np.float64)]
    fit = _Fit(groups=[(slice(None), slice(None))], w0=w0, kind="dense", dense=dict(matmul=True, bias=bias), **fit_kw)
    fit.bias_add = bias_add.name if bias_add is not None else None
    return fit


def _write_back(g: _Graph, fit: _Fit, Ws: list) -> None:
    node = g.nodes[fit.row.node]
    if fit.kind == "conv":
        w = g.const(node.input[1])
        m = w.shape[0]
        new_w = np.empty_like(w)
        new_b = np.empty(m, np.float64)
        for (isl, osl), W in zip(fit.groups, Ws):
            mg = new_w[osl].shape[0]
            new_w[osl] = W[:-1].T.reshape(mg, *w.shape[1:])
            new_b[osl] = W[-1]
        g.set_const(node, 1, new_w, "recovered_w")
        g.set_const(node, 2, new_b, "recovered_b")
        return
    W = Ws[0]
    if fit.dense.get("matmul"):
        g.set_const(node, 1, W[:-1], "recovered_w")
        bias = fit.dense["bias"] + W[-1]
        if fit.bias_add is not None:
            add = g.nodes[fit.bias_add]
            slot = 1 if add.input[0] == node.output[0] else 0
            c = g.const(add.input[slot])
            g.set_const(add, slot, bias.reshape(c.shape), "recovered_b")
        elif np.any(W[-1] != 0):
            g.insert_bias_add(node, W[-1])
        return
    tb, alpha, beta = fit.dense["transB"], fit.dense["alpha"], fit.dense["beta"]
    Wk = W[:-1] / alpha
    g.set_const(node, 1, Wk.T if tb else Wk, "recovered_w")
    bias = W[-1] / beta
    if len(node.input) > 2 and node.input[2]:
        c = g.const(node.input[2])
        bias = bias.reshape(c.shape) if c.size == bias.size else bias.reshape(1, -1) if c.ndim == 2 else bias
    g.set_const(node, 2, bias, "recovered_b")



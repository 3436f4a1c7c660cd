"""Recovery's view of the models: which nodes can be re-fitted and how
(:func:`_plan_fit`), in which order (levels), and the new weights a fit
hands to the rewriter (:func:`_write_back`: recovery edits nothing itself).
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from onnxprune.core.quant import BIAS_TYPES, WEIGHT_TYPES, Dequantized, dq_constant, dq_value
from onnxprune.recover.fit import LayerRow, _Fit, tap_blocks
from onnxprune.rewrite import Journal, add_bias_after, matmul_bias, set_input

class _Graph:
    """Name-indexed, read-only view of an IR model (the nodes are live objects:
    the rewriter's edits show through without a refresh)."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.g = model.graph
        self.nodes = {n.name: n for n in self.g if n.name}

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        """The initializer behind ``value`` (None when it is computed or absent)."""
        if value is None or value.name not in self.g.initializers or value.const_value is None:
            return None
        return value.const_value.numpy()

    def constant(self, value: ir.Value | None) -> np.ndarray | None:
        """An initializer, or a QDQ model's DequantizeLinear of initializers, as floats."""
        a = self.const(value)
        return dq_value(value) if a is None else a

    @staticmethod
    def attr(node: ir.Node, name: str, default=None):
        a = node.attributes.get(name)
        return default if a is None else a.value


def _output_names(proto: onnx.ModelProto) -> dict[str, str]:
    """node name -> its first output's name, in a proto (the original model)."""
    return {n.name: n.output[0] for n in proto.graph.node if n.name and n.output}


MS = "com.microsoft"


def is_packed_attention(node) -> bool:
    """onnxruntime's packed-weight ``Attention``: its q/k/v projection is inside the op."""
    return node.op_type == "Attention" and node.domain == MS


class _Initializers:
    """A proto's initializers by name, each read into numpy when asked for."""

    def __init__(self, proto: onnx.ModelProto):
        self._t = {t.name: t for t in proto.graph.initializer}
        self._a: dict = {}

    def __contains__(self, name) -> bool:
        return name in self._t

    def __getitem__(self, name):
        if name not in self._a:
            self._a[name] = numpy_helper.to_array(self._t[name])
        return self._a[name]

    def get(self, name, default=None):
        return self[name] if name in self._t else default


def _packed_sources(proto: onnx.ModelProto, names) -> dict:
    """The original's packed-weight Attention nodes among ``names``: name -> its
    input, weight ``[C, q+k+v]``, bias, q width and head count. The projection
    inside the op is the layer a re-fit reproduces (the target is computed from the input)."""
    names = set(names)
    nodes = [n for n in proto.graph.node if is_packed_attention(n) and n.name in names and len(n.input) > 2]
    if not nodes:
        return {}
    inits = _Initializers(proto)
    out = {}
    for n in nodes:
        try:
            w, b = inits.get(n.input[1]), inits.get(n.input[2])
        except Exception:  # e.g. external data not loaded: the layer is reported as not re-fittable
            continue
        if w is None or b is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        sizes = attrs.get("qkv_hidden_sizes")
        q = int(sizes[0]) if sizes is not None and len(sizes) else w.shape[-1] // 3
        out[n.name] = dict(x=n.input[0], w=w, b=b.reshape(-1), q=q, heads=int(attrs.get("num_heads", 0)))
    return out


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


def _levels(g: _Graph, names: set[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Level of each consumer (1 + the highest level of a consumer upstream of
    it), and of each computed value (the highest level of a consumer upstream
    of it; -1: none)."""
    lv: dict[str, int] = {}
    out: dict[str, int] = {}
    for n in g.g:
        up = max((lv.get(v.name, -1) for v in n.inputs if v is not None), default=-1)
        if n.name in names:
            out[n.name] = up + 1
            up = up + 1
        for o in n.outputs:
            lv[o.name] = up
    return out, lv


def _residuals(original: onnx.ModelProto, g: _Graph, fits: list[_Fit], levels: dict[str, int],
               value_level: dict[str, int]) -> dict[str, tuple]:
    """fit node -> ``(r, scale)``, for each layer whose output (its bias Add's,
    for a MatMul) is read only by an ``Add`` whose other input ``r`` is
    computed, directly or through a ``Mul`` by a constant per-channel ``scale``
    (a layer scale: ConvNeXt, CaiT, DeiT III; else ``scale`` is None) and a
    QDQ model's QuantizeLinear -> DequantizeLinear pair (taken as the identity it rounds to): a
    residual branch ``scale * y + r``. Its target becomes the original's sum
    minus the pruned model's ``r`` (over ``scale``), so the layer also takes
    up what the pruned stream lost upstream (the sequential fit's error
    feedback). Only where every layer re-fitted upstream of ``r`` is at a
    lower level (so the pruned ``r`` is final when this layer is fitted), and
    ``r`` is the same value in both models. ``levels``, ``value_level``: of
    :func:`_levels` on the pruned model."""
    inits = _Initializers(original)
    const = {o: n for n in original.graph.node if n.op_type == "Constant" for o in n.output}

    def constant(name):
        if name in const:
            a = [helper.get_attribute_value(a) for a in const[name].attribute if a.name == "value"]
            return numpy_helper.to_array(a[0]) if a else None
        try:
            return inits.get(name)
        except Exception:  # unreadable (e.g. external data not loaded): not a scale we can use
            return None

    readers: dict[str, list] = defaultdict(list)
    for n in original.graph.node:
        for v in n.input:
            if v:
                readers[v].append(n)
    graph_out = {o.name for o in original.graph.output}
    by_name = {n.name: n for n in original.graph.node if n.name}
    out = {}
    for f in fits:
        if f.dense.get("packed"):
            continue
        y = by_name[f.bias_add].output[0] if f.bias_add and f.bias_add in by_name else f.y_name
        rd = readers.get(y, [])
        scale = None
        if len(rd) == 1 and rd[0].op_type == "Mul" and rd[0].domain in ("", "ai.onnx") and len(rd[0].input) == 2 \
                and y not in graph_out:
            other = [v for v in rd[0].input if v != y]
            scale = constant(other[0]) if len(other) == 1 else None
            if scale is None or not _per_channel(scale, f):
                continue
            y = rd[0].output[0]
            rd = readers.get(y, [])
        if len(rd) == 1 and rd[0].op_type == "QuantizeLinear" and y not in graph_out:  # a QDQ model's y -> Q -> DQ
            dq = readers.get(rd[0].output[0], [])
            if len(dq) == 1 and dq[0].op_type == "DequantizeLinear" and rd[0].output[0] not in graph_out:
                y = dq[0].output[0]
                rd = readers.get(y, [])
        if len(rd) != 1 or y in graph_out or rd[0].op_type != "Add" or rd[0].domain not in ("", "ai.onnx"):
            continue
        add = rd[0]
        others = [v for v in add.input if v != y]
        if len(add.input) != 2 or len(others) != 1:
            continue
        r = others[0]  # computed (initializers have no level), final before this layer, read by the same Add
        if r in const or value_level.get(r, levels[f.row.node]) >= levels[f.row.node]:
            continue
        pruned_add = g.nodes.get(add.name)
        if pruned_add is None or r not in {v.name for v in pruned_add.inputs if v is not None}:
            continue
        out[f.row.node] = (r, None if scale is None else np.asarray(scale, np.float64).reshape(-1))
    return out


def _per_channel(scale: np.ndarray, f: _Fit) -> bool:
    """``scale`` multiplies ``f``'s output channel by channel (or is one number)."""
    if scale.size == 1:
        return True
    if not np.issubdtype(scale.dtype, np.floating):
        return False
    shape = [int(d) for d in scale.shape]
    if f.kind == "conv":  # [C, 1, 1] or [1, C, 1, 1] against NCHW
        return len(shape) in (3, 4) and shape[-3] > 1 and all(d == 1 for i, d in enumerate(shape) if i != len(shape) - 3)
    return shape[-1] > 1 and all(d == 1 for d in shape[:-1])  # [C], [1, 1, C] against the last axis


def _conv_geometry(g: _Graph, node, w: np.ndarray) -> dict | str:
    if w.ndim != 4:
        return "only 2-D convolutions are re-fitted"
    auto = g.attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return dict(k=tuple(w.shape[2:]), s=list(g.attr(node, "strides", [1, 1])), d=list(g.attr(node, "dilations", [1, 1])),
                pads=list(g.attr(node, "pads", [0, 0, 0, 0])), auto=auto)


def _transposed_geometry(g: _Graph, node, w: np.ndarray) -> dict | str:
    """A ConvTranspose as the stride-1 Conv it equals on its input with ``s - 1``
    zeros between neighbours (``up``: the strides), the kernel flipped and its
    two channel axes swapped: ``pads`` of that Conv are ``k - 1 - pad`` (plus
    ``output_padding`` at the end)."""
    geo = _conv_geometry(g, node, w)
    if isinstance(geo, str):
        return geo
    if geo["auto"] != "NOTSET" or g.attr(node, "output_shape", None) is not None:
        return "ConvTranspose with auto_pad or output_shape is not re-fitted"
    if any(d != 1 for d in geo["d"]):
        return "dilated ConvTranspose is not re-fitted"
    (kh, kw), (pt, pl, pb, pr) = geo["k"], geo["pads"]
    oh, ow = list(g.attr(node, "output_padding", [0, 0]))
    pads = [kh - 1 - pt, kw - 1 - pl, kh - 1 - pb + oh, kw - 1 - pr + ow]
    if min(pads) < 0:
        return "ConvTranspose pads wider than its kernel are not re-fitted"
    return {**geo, "s": [1, 1], "pads": pads, "up": tuple(geo["s"])}


def _swap_flip(w: np.ndarray) -> np.ndarray:
    """A ConvTranspose kernel ``[inputs, outputs, kh, kw]`` as the Conv kernel
    ``[outputs, inputs, kh, kw]`` it equals (channel axes swapped, taps flipped),
    and back: the map is its own inverse."""
    return np.ascontiguousarray(np.flip(w.transpose(1, 0, 2, 3), (2, 3)))


def _plan_packed(g: _Graph, src: dict | None, node, row: LayerRow, outs, max_features: int) -> _Fit | LayerRow:
    """A packed-weight Attention as a linear layer: input 0 times the packed
    weight plus the bias, the target computed from the original's input."""
    w = g.const(node.inputs[1])
    b = g.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if src is None or w is None or b is None or w.ndim != 2 or w.dtype != np.float32:
        row.reason = "packed Attention without a constant float32 weight and bias"
        return row
    ko = [(k, wd) for s, a, k, wd, _ in outs.get(node.name, []) if s == 1 and a == 1]
    kept_out, width0 = ko[0] if ko else (np.arange(w.shape[1]), w.shape[1])
    if len(kept_out) != w.shape[1] or width0 != src["w"].shape[1]:
        row.reason = f"kept outputs ({len(kept_out)}) do not match the pruned weight ({w.shape[1]})"
        return row
    if w.shape[0] + 1 > max_features:
        row.reason = f"{w.shape[0]} features exceed max_features={max_features}"
        return row
    row.outputs_kept = f"{len(kept_out)}/{width0}"
    row.features = w.shape[0]
    w0 = [np.vstack([w, b.reshape(1, -1)]).astype(np.float64)]
    return _Fit(row=row, node=node, x_name=node.inputs[0].name, y_name=src["x"], kept_out=np.asarray(kept_out),
                groups=[(slice(None), slice(None))], w0=w0, kind="dense",
                dense=dict(packed=True, w=src["w"], b=src["b"], q=src["q"], heads=src["heads"]))


QUANTIZED = "prune and recover the float model, then quantize"  # the advice where a quantized layer cannot be written back


def _bias(g: _Graph, value, quant: dict) -> np.ndarray | str | None:
    """A bias input's float values: an initializer, or an int32 constant behind a
    DequantizeLinear (recorded in ``quant["b"]``); a reason when it is neither."""
    b = g.const(value)
    if b is not None:
        return b
    dq = dq_constant(value, g.const, BIAS_TYPES)
    if isinstance(dq, Dequantized):
        quant["b"] = dq
        return dq.value()
    return dq


def _plan_fit(g: _Graph, orig: dict[str, str], name: str, ins, outs, max_features: int, method: str,
              packed: dict | None = None) -> _Fit | LayerRow:
    node = g.nodes.get(name)
    op = node.op_type if node is not None else "?"
    row = LayerRow(node=name, op=op, status="skipped", method=method)
    if node is None:
        row.reason = "node not found in the pruned model"
        return row
    if name not in orig:
        row.reason = "node not found in the original model (unnamed or renamed)"
        return row
    io_in = ins[name]
    row.inputs_kept = ", ".join(f"{len(k)}/{w}" for _, _, k, w, _ in io_in)
    if is_packed_attention(node):
        return _plan_packed(g, (packed or {}).get(name), node, row, outs, max_features)
    if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        row.reason = f"{op} is not re-fitted (only Conv, ConvTranspose, Gemm, MatMul)"
        return row
    wslot = 1
    if any(s != 1 for s, *_ in io_in):
        row.reason = "the constant is the first operand"
        return row
    w = g.const(node.inputs[1]) if len(node.inputs) > 1 else None
    quant: dict = {}  # "w" / "b": a Dequantized constant (a QDQ model's), fitted in float, written back quantized
    if w is None and len(node.inputs) > 1 and g.const(node.inputs[0]) is None:
        dq = dq_constant(node.inputs[1], g.const)
        if isinstance(dq, str):
            row.reason = f"{dq}: {QUANTIZED}"
            return row
        if dq is not None:
            w, quant["w"] = dq.value(), dq
    if w is None or g.const(node.inputs[0]) is not None:
        row.reason = "weight is not a constant initializer (or the data input is)"
        return row
    if w.dtype != np.float32:
        row.reason = f"weight dtype {w.dtype} (only float32)"
        return row
    if "w" in quant:  # the analysis sees a quantized weight's channels at its DequantizeLinear's integer input
        name_w, wslot = quant["w"].node.name, 0
        row.inputs_kept = ", ".join(f"{len(k)}/{wd}" for s, _, k, wd, _ in ins.get(name_w, []) if s == 0)
    else:
        name_w = name
    # surviving output channels (indices of the original's output axis)
    out_axis = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0 if g.attr(node, "transB", 0) else 1, "MatMul": w.ndim - 1}[op]
    ko = [(k, wd) for s, a, k, wd, _ in outs.get(name_w, []) if s == wslot and a == out_axis]
    width_now = w.shape[out_axis]
    kept_out, width0 = ko[0] if ko else (np.arange(width_now), width_now)
    if len(kept_out) != width_now:
        row.reason = f"kept outputs ({len(kept_out)}) do not match the pruned weight ({width_now})"
        return row
    row.outputs_kept = f"{len(kept_out)}/{width0}"
    if "w" in quant and not quant["w"].per_tensor and quant["w"].axis != out_axis:
        row.reason = f"a quantized weight with scales per input channel: {QUANTIZED}"
        return row
    fit_kw = dict(row=row, node=node, x_name=node.inputs[0].name, y_name=orig[name], kept_out=np.asarray(kept_out),
                  quant=quant)
    if op in ("Conv", "ConvTranspose"):
        grp = int(g.attr(node, "group", 1))
        if op == "ConvTranspose" and grp != 1:
            row.reason = "grouped ConvTranspose is not re-fitted"
            return row
        geo = (_transposed_geometry if op == "ConvTranspose" else _conv_geometry)(g, node, w)
        if isinstance(geo, str):
            row.reason = geo
            return row
        if op == "ConvTranspose":  # fitted as the Conv it equals, written back transposed (_write_back)
            w = _swap_flip(w)
        m, cpg = w.shape[:2]
        if m % grp:
            row.reason = "group does not divide the output channels"
            return row
        b = _bias(g, node.inputs[2], quant) if len(node.inputs) > 2 and node.inputs[2] is not None \
            else np.zeros(m, np.float32)
        if not isinstance(b, np.ndarray):
            row.reason = f"{op} bias is not a constant" + (f" ({b})" if b else "")
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
        if method == "ridge" and max(geo.get("up", (1,))) > 1:  # the normal equations split by output phase
            geo["blocks"] = tap_blocks(cpg, geo)
        clamp = None if quant else clamp_after(g, node, w.ndim, 1, m)
        return _Fit(groups=groups, w0=w0, kind="conv", conv=geo, clamp=clamp, **fit_kw)
    if op == "Gemm":
        ta, tb = int(g.attr(node, "transA", 0)), int(g.attr(node, "transB", 0))
        alpha, beta = float(g.attr(node, "alpha", 1.0)), float(g.attr(node, "beta", 1.0))
        W = (w.T if tb else w) * alpha  # [K, N]
        n_out = W.shape[1]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = _bias(g, node.inputs[2], quant)
            if not isinstance(c, np.ndarray):
                row.reason = "Gemm C is not a constant" + (f" ({c})" if c else "")
                return row
            if c.size not in (1, n_out) or (c.ndim == 2 and c.shape[0] != 1) or ("b" in quant and c.size != n_out):
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
        clamp = None if quant else clamp_after(g, node, 2, -1, n_out)
        return _Fit(groups=[(slice(None), slice(None))], w0=w0, kind="dense", clamp=clamp,
                    dense=dict(transA=ta, transB=tb, alpha=alpha, beta=beta, src_dims=_source_dims(node.inputs[0])),
                    **fit_kw)
    # MatMul with a constant right operand
    if w.ndim != 2:
        row.reason = "MatMul weight with batch dimensions"
        return row
    bias_add, bias = None, np.zeros(w.shape[1])
    found = matmul_bias(node, w.shape[1], g.const)
    if found is not None and found[0].name and found[2].dtype == np.float32:
        bias_add, bias = found[0], found[2].reshape(-1)
    elif "w" in quant:
        got = _quantized_bias_add(g, node, w.shape[1])
        if got is not None:
            bias_add, quant["b"] = got
            bias = quant["b"].value().reshape(-1).astype(np.float64)
    if w.shape[0] + 1 > max_features:
        row.reason = f"{w.shape[0]} features exceed max_features={max_features}"
        return row
    row.features = w.shape[0]
    # the target is the original MatMul's own output (before its bias Add): the
    # fitted bias row is then added to the pruned bias
    w0 = [np.vstack([w, np.zeros((1, w.shape[1]))]).astype(np.float64)]
    fit = _Fit(groups=[(slice(None), slice(None))], w0=w0, kind="dense",
               dense=dict(matmul=True, bias=bias, src_dims=_source_dims(node.inputs[0])), **fit_kw)
    fit.bias_add = bias_add.name if bias_add is not None else None
    if not quant:  # its bias Add is one of the steps
        shape = node.outputs[0].shape
        fit.clamp = clamp_after(g, node, None if shape is None else len(shape), -1, w.shape[1])
    return fit


def _source_dims(value, hops: int = 6) -> list | None:
    """For a dense layer's 2-D input: the dims (None for a symbol) of the 3-D or
    wider tensor it was flattened from by a Reshape or Flatten (through
    Identity, Cast and QDQ pairs), which say where the batch was; else None."""
    if value is None or value.shape is None or len(value.shape) != 2:
        return None
    v = value
    for _ in range(hops):
        p = v.producer()
        if p is None or not p.inputs or p.inputs[0] is None:
            return None
        src = p.inputs[0]
        if p.op_type in ("Reshape", "Flatten"):
            if src.shape is not None and len(src.shape) >= 3:
                return [d if isinstance(d, int) else None for d in src.shape.dims]
        elif p.op_type not in ("Identity", "Cast", "QuantizeLinear", "DequantizeLinear"):
            return None
        v = src
    return None


AFFINE_HOPS = 4  # constant Mul / Div / Add / Sub and BatchNormalization nodes looked through on the way to a clamp


def _channel_vector(c: np.ndarray, rank: int | None, axis: int, width: int):
    """A constant that broadcasts against an output of ``rank`` dims as one
    value per channel along ``axis`` (``width`` channels): a float, or a
    ``[width]`` vector; None when it varies along another axis."""
    c = np.asarray(c, np.float64)
    if c.size == 1:
        return float(c.reshape(-1)[0])
    if rank is None:  # unknown: only the last axis can be told
        if axis != -1:
            return None
        rank = max(c.ndim, 1)
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    axis = axis % rank
    if shape[axis] != width or any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    return c.reshape(-1)


def clamp_after(g: _Graph, node, rank: int | None, axis: int, width: int) -> tuple | None:
    """``(lo, hi)`` when ``node``'s output reaches a ``Relu``, ``Clip`` with
    constant bounds, ``HardSwish`` or ``HardSigmoid`` through nothing but
    constant per-channel affine steps (``Mul``, ``Div``, ``Add``, ``Sub``,
    an inference ``BatchNormalization``; a MatMul's bias ``Add`` among them),
    each value read by the next step alone and none a graph output: beyond
    those bounds (in the node's own output values; floats, or one per channel
    of the ``width`` along ``axis`` of its ``rank``-dim output) every value
    gives the same output after the clamp. None otherwise."""
    a, b = 1.0, 0.0  # the clamp's input is a * y + b
    v = node.outputs[0]
    for _ in range(AFFINE_HOPS + 1):
        uses = list(v.uses())
        if len(uses) != 1 or v.is_graph_output() or uses[0].node.domain not in ("", "ai.onnx"):
            return None
        nxt, idx = uses[0].node, uses[0].idx
        op = nxt.op_type
        if op in ("Mul", "Div", "Add", "Sub") and len(nxt.inputs) == 2 and (idx == 0 or op in ("Mul", "Add")):
            c = g.const(nxt.inputs[1 - idx])
            c = None if c is None else _channel_vector(c, rank, axis, width)
            if c is None or (op == "Div" and np.any(np.asarray(c) == 0)):
                return None
            if op == "Mul":
                a, b = a * c, b * c
            elif op == "Div":
                a, b = a / c, b / c
            else:
                b = b + c if op == "Add" else b - c
            v = nxt.outputs[0]
            continue
        if op == "BatchNormalization" and idx == 0 and len(nxt.outputs) == 1 and rank is not None and axis % rank == 1:
            p = [g.const(x) if x is not None else None for x in nxt.inputs[1:5]]
            if len(p) != 4 or any(x is None or x.size != width for x in p) or int(g.attr(nxt, "training_mode", 0)):
                return None
            scale, bias, mean, var = (x.reshape(-1).astype(np.float64) for x in p)
            k = scale / np.sqrt(var + float(g.attr(nxt, "epsilon", 1e-5)))
            a, b = a * k, b * k + bias - mean * k
            v = nxt.outputs[0]
            continue
        if idx != 0:
            return None
        bounds = _clamp_bounds(g, nxt)
        if bounds is None:
            return None
        lo, hi = bounds
        if isinstance(a, float) and isinstance(b, float) and a == 1.0 and b == 0.0:
            return bounds
        a, b = np.broadcast_to(a, (width,)).astype(np.float64), np.broadcast_to(b, (width,)).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ylo, yhi = (lo - b) / a, (hi - b) / a
        flip = a < 0
        ylo, yhi = np.where(flip, yhi, ylo), np.where(flip, ylo, yhi)
        # a channel the steps multiply by 0 is constant after them: any value of its own is free
        ylo, yhi = np.where(a == 0, np.inf, ylo), np.where(a == 0, -np.inf, yhi)
        return ylo, yhi
    return None


def _clamp_bounds(g: _Graph, act) -> tuple | None:
    """The input bounds beyond which ``act`` (a Relu, Clip, HardSwish or HardSigmoid) is flat."""
    if act.op_type == "Relu":
        return (0.0, math.inf)
    if act.op_type == "HardSwish":  # x * max(0, min(1, x / 6 + 1 / 2)): 0 at and below -3, x itself above 3
        return (-3.0, math.inf)
    if act.op_type == "HardSigmoid":  # max(0, min(1, alpha x + beta))
        alpha, beta = float(g.attr(act, "alpha", 0.2)), float(g.attr(act, "beta", 0.5))
        return (-beta / alpha, (1 - beta) / alpha) if alpha > 0 else None
    if act.op_type != "Clip":
        return None
    bounds = []
    for i, (attr, default) in enumerate((("min", -math.inf), ("max", math.inf)), 1):
        if len(act.inputs) > i and act.inputs[i] is not None:
            c = g.const(act.inputs[i])
            if c is None or c.size != 1:
                return None
            bounds.append(float(c.reshape(-1)[0]))
        else:
            bounds.append(float(g.attr(act, attr, default)))
    return None if bounds == [-math.inf, math.inf] else tuple(bounds)


def _quantized_bias_add(g: _Graph, node, width: int):
    """A QDQ MatMul's bias: ``MatMul -> QuantizeLinear -> DequantizeLinear ->
    Add(DequantizeLinear of constants)``, each read once, the constant
    ``width`` wide along the last axis: ``(the Add, the constant as a
    Dequantized)``, else None."""
    v = node.outputs[0]
    for op in ("QuantizeLinear", "DequantizeLinear"):
        uses = list(v.uses())
        if len(uses) != 1 or v.is_graph_output() or uses[0].node.op_type != op or uses[0].idx != 0:
            return None
        v = uses[0].node.outputs[0]
    uses = list(v.uses())
    if len(uses) != 1 or v.is_graph_output() or uses[0].node.op_type != "Add" or not uses[0].node.name:
        return None
    add = uses[0].node
    dq = dq_constant(add.inputs[1 - uses[0].idx], g.const, WEIGHT_TYPES + BIAS_TYPES)
    if not isinstance(dq, Dequantized) or dq.q.size != width or dq.q.shape[-1] != width:
        return None
    return add, dq


def _put_weight(node, fit: _Fit, w: np.ndarray, journal: Journal) -> np.ndarray | None:
    """Write ``node``'s weight ``w`` (float, the stored layout); a quantized one
    on its own grid (:mod:`onnxprune.core.quant`), returning how its scales
    changed (new / old) for the bias to follow."""
    dq = fit.quant.get("w")
    if dq is None:
        set_input(node, 1, np.asarray(w, np.float32), "recovered_w", journal)
        return None
    scale = _requantize(dq, w, None, "recovered_w", journal)
    return scale.astype(np.float64) / np.where(dq.scale == 0, 1.0, dq.scale.astype(np.float64))


def _requantize(dq: Dequantized, values: np.ndarray, scale: np.ndarray | None, tag: str, journal: Journal) -> np.ndarray:
    """Hand ``values`` (floats, the constant's shape) to the rewriter on ``dq``'s grid
    (:meth:`Dequantized.quantize`: ``scale`` given, or chosen to hold them); returns the scales written."""
    q, scale = dq.quantize(np.asarray(values, np.float64).reshape(dq.q.shape), scale)
    set_input(dq.node, 0, q, tag + "q", journal)
    set_input(dq.node, 1, scale, tag + "s", journal)
    return scale


def _put_bias(node, slot: int, fit: _Fit, b: np.ndarray, ratio: np.ndarray | None, journal: Journal) -> None:
    """Write ``node``'s bias ``b``; a quantized bias keeps its scale times its
    weight's change of scale (``ratio``), so bias scale = input scale x weight
    scale holds where it held."""
    dq = fit.quant.get("b")
    if dq is None:
        set_input(node, slot, np.asarray(b, np.float32), "recovered_b", journal)
        return
    scale = dq.scale.astype(np.float64)
    if ratio is not None and (ratio.size == 1 or ratio.size == scale.size):
        scale = scale * (ratio.reshape(()) if ratio.size == 1 else ratio.reshape(scale.shape))
    _requantize(dq, b, scale, "recovered_b", journal)


def _write_back(g: _Graph, fit: _Fit, Ws: list, journal: Journal) -> None:
    """Hand the fitted weights of ``fit`` to the rewriter (undoable through ``journal``)."""
    node = g.nodes[fit.row.node]
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    if fit.kind == "conv":
        transposed = node.op_type == "ConvTranspose"  # fitted as the Conv it equals
        w = fit.quant["w"].value() if "w" in fit.quant else g.const(node.inputs[1])
        w = _swap_flip(w) if transposed else w
        m = w.shape[0]
        new_w = np.empty_like(w)
        new_b = np.empty(m, np.float64)
        for (isl, osl), W in zip(fit.groups, Ws):
            mg = new_w[osl].shape[0]
            new_w[osl] = W[:-1].T.reshape(mg, *w.shape[1:])
            new_b[osl] = W[-1]
        ratio = _put_weight(node, fit, _swap_flip(new_w) if transposed else new_w, journal)
        _put_bias(node, 2, fit, new_b, ratio, journal)
        return
    W = Ws[0]
    if fit.dense.get("packed"):
        set_input(node, 1, f32(W[:-1]), "recovered_w", journal)
        set_input(node, 2, f32(W[-1]), "recovered_b", journal)
        return
    if fit.dense.get("matmul"):
        _put_weight(node, fit, W[:-1], journal)
        bias = fit.dense["bias"] + W[-1]
        if fit.bias_add is not None and "b" in fit.quant:  # behind the MatMul's own Q -> DQ: on its grid
            _requantize(fit.quant["b"], bias, None, "recovered_b", journal)
        elif fit.bias_add is not None:
            add = g.nodes[fit.bias_add]
            slot = 1 if add.inputs[0] is node.outputs[0] else 0
            c = g.const(add.inputs[slot])
            set_input(add, slot, f32(bias.reshape(c.shape)), "recovered_b", journal)
        elif np.any(W[-1] != 0):
            add_bias_after(node, f32(W[-1]), journal)
        return
    tb, alpha, beta = fit.dense["transB"], fit.dense["alpha"], fit.dense["beta"]
    Wk = W[:-1] / alpha
    ratio = _put_weight(node, fit, Wk.T if tb else Wk, journal)
    bias = W[-1] / beta
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = fit.quant["b"].q if "b" in fit.quant else g.const(node.inputs[2])
        bias = bias.reshape(c.shape) if c.size == bias.size else bias.reshape(1, -1) if c.ndim == 2 else bias
    _put_bias(node, 2, fit, bias, ratio, journal)


# ops an attention operand passes through between its linear layer and the
# q.k^T MatMul (reshapes, head splits, a constant scale or bias): per-token affine
_PASS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather", "Identity", "Mul", "Div", "Add",
         "QuantizeLinear", "DequantizeLinear"}  # a QDQ model's activation quantizers: the identity they round to
# between the logits and their Softmax: scale, mask, casts
_TO_SOFTMAX = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Reshape", "QuantizeLinear", "DequantizeLinear"}


def _linear_behind(g: _Graph, value, fits: set[str], hops: int = 12) -> str | None:
    """The re-fitted linear layer an attention operand is a per-token affine
    function of (through :data:`_PASS` ops), or None."""
    while hops > 0:
        p = value.producer() if value is not None else None
        if p is None or p.op_type not in _PASS and p.name not in fits:
            return None
        if p.name in fits:
            return p.name
        hops -= p.op_type not in ("QuantizeLinear", "DequantizeLinear")  # a QDQ model's pairs do not count
        if p.op_type in ("Mul", "Div", "Add"):
            arrays = [g.constant(v) for v in p.inputs]  # a QDQ model's constants come dequantized
            consts = [a for a in arrays if a is not None]
            if len(consts) != 1 or len(p.inputs) != 2:
                return None
            if p.op_type != "Add" and consts[0].size != 1:
                return None  # a per-column scale would weigh the dims of q.k^T unevenly
            value = p.inputs[0] if arrays[1] is not None else p.inputs[1]
        else:
            value = p.inputs[0]
    return None


def _reaches_softmax(value, hops: int = 8) -> bool:  # 4 ops, each maybe followed by a QDQ pair
    frontier = [value]
    for _ in range(hops):
        nxt = []
        for v in frontier:
            for use in v.uses():
                n = use.node
                if n.op_type == "Softmax":
                    return True
                if n.op_type in _TO_SOFTMAX:
                    nxt.extend(n.outputs)
        frontier = nxt
    return False


def _einsum_logits(equation: str) -> str | None:
    """How an ``Einsum`` forms q.k^T, as a :func:`_logit_sites` kind: ``"matmul"`` for
    ``P id, P dj -> P ij`` (k^T on the right, as a MatMul), ``"einsum"`` for ``P id, P jd -> P ij``
    (MaxViT's ``bgpid,bgpjd->bgpij``: both operands ``[..., tokens, d]``), with the same batch
    letters ``P`` (or ``...``) in the same places everywhere; None for any other contraction."""
    eq = equation.replace(" ", "")
    if eq.count("->") != 1 or eq.count(",") != 1:
        return None
    lhs, out = eq.split("->")
    a, b = lhs.split(",")
    if not (len(a) == len(b) == len(out) >= 2) or not (a[:-2] == b[:-2] == out[:-2]):
        return None
    prefix, (i, d), (x, y), (oi, oj) = a[:-2], a[-2:], b[-2:], out[-2:]
    if len({i, d, oj}) != 3 or any(c in prefix or c == "." for c in (i, d, oj)) or oi != i:
        return None
    if (x, y) == (oj, d):
        return "einsum"
    if (x, y) == (d, oj):
        return "matmul"
    return None


def _logit_sites(g: _Graph):
    """Where attention logits are formed, as ``(node, q value, k value, kind)``:
    a q.k^T MatMul of two activations going to a Softmax (``kind`` "matmul",
    its right operand is k^T), an ``Einsum`` that contracts the same way ("matmul") or
    with k untransposed ("einsum", :func:`_einsum_logits`), the ONNX ``Attention`` op ("attention") and
    onnxruntime's ``MultiHeadAttention`` with separate 3-D q/k/v ("mha")."""
    for n in g.g:
        if n.op_type == "MatMul" and len(n.inputs) == 2 and all(v is not None and g.const(v) is None for v in n.inputs) \
                and _reaches_softmax(n.outputs[0]):
            yield n, n.inputs[0], n.inputs[1], "matmul"
        elif n.op_type == "Einsum" and n.domain in ("", "ai.onnx") and len(n.inputs) == 2 \
                and all(v is not None and g.const(v) is None for v in n.inputs) and _reaches_softmax(n.outputs[0]) \
                and (kind := _einsum_logits(str(g.attr(n, "equation", "")))) is not None:
            yield n, n.inputs[0], n.inputs[1], kind
        elif n.op_type == "Attention" and n.domain in ("", "ai.onnx") and len(n.inputs) >= 3 \
                and all(v is not None for v in n.inputs[:3]):
            yield n, n.inputs[0], n.inputs[1], "attention"
        elif n.op_type == "MultiHeadAttention" and n.domain == MS and len(n.inputs) >= 3 \
                and all(v is not None for v in n.inputs[:3]):
            yield n, n.inputs[0], n.inputs[1], "mha"


def _attention_linears(g: _Graph, names: set[str]) -> set[str]:
    """Of the linear layers ``names``, those whose output is a q or k of an attention's logits."""
    return {x for n, q, k, _ in _logit_sites(g) for x in (_linear_behind(g, v, names) for v in (q, k)) if x is not None}


def _attention_pairs(g: _Graph, fits: dict) -> list[dict]:
    """Self-attention logits whose q and k come from re-fitted linear layers
    reading the same input: ``{"node", "q_fit", "k_fit", "kind"}`` per site
    (:func:`_logit_sites`)."""
    names, out = set(fits), []
    for name, f in fits.items():  # packed Attention: q and k are both slices of its own projection
        if f.dense.get("packed") and f.dense.get("heads"):
            out.append({"node": name, "q_fit": name, "k_fit": name, "kind": "packed"})
    for n, qv, kv, kind in _logit_sites(g):
        q, k = (_linear_behind(g, v, names) for v in (qv, kv))
        if n.name and q is not None and k is not None and fits[q].x_name == fits[k].x_name and fits[q].kind == "dense":
            out.append({"node": n.name, "q_fit": q, "k_fit": k, "kind": kind})
    return out

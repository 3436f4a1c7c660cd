"""onnx2torch converters for what our exports use and onnx2torch 1.5 lacks:
opset 18+ versions of ops whose semantics did not
change, ``Reshape`` with ``allowzero``, ``Gelu``-20, ``ReduceMean``-18 (axes as
an input), ``Pad``-18+ (``axes`` input), ``Split``-18 (``num_outputs``), the
opset-23 ``Attention`` op, and ``Slice`` (onnx2torch's indexes with a list,
which torch deprecates).

:func:`register` is idempotent; :mod:`onnxprune.torchbridge.importer` calls it.
"""
from __future__ import annotations

import math

import onnx
import torch
import torch.nn.functional as F
from torch import nn

_DONE = False

# Ops whose newer versions only widened the accepted types (or added attributes
# we check below), so the newest onnx2torch converter applies unchanged.
SAME_SEMANTICS = [
    "Conv", "ConvTranspose", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Constant", "Shape",
    "Cast", "ConstantOfShape", "Equal", "MaxPool", "AveragePool", "GlobalAveragePool", "HardSigmoid", "HardSwish",
    "Gather", "Concat", "Expand", "Where", "Slice", "Softmax", "Erf", "Sqrt", "Mul", "Add", "Sub", "Div", "Pow",
    "Relu", "Sigmoid", "Tanh", "MatMul", "Gemm", "BatchNormalization", "LayerNormalization", "Range", "Mod",
    "Neg", "Abs", "Exp", "Log", "Clip", "Dropout", "Resize", "Less", "Greater", "Not", "And", "Or", "Min", "Max",
    "ReduceMax", "ReduceMin", "ReduceSum", "GlobalMaxPool", "Tile", "InstanceNormalization", "Mish", "Elu",
    "LeakyRelu", "PRelu", "Softplus", "Floor", "Ceil", "Round", "Einsum", "CumSum", "Selu",
]


def _versions(op: str) -> list[int]:
    return sorted({s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.name == op and s.domain == ""})


def _attr(node, name, default=None):
    return node.attributes.get(name, default)


def _const(graph, name):
    """A constant input as a python list, or None when it is computed at run time."""
    if not name:
        return None
    if name in graph.initializers:
        return graph.initializers[name].to_torch().tolist()
    try:
        node, _ = graph.value_as_node_output(name)
    except KeyError:
        return None
    if node.operation_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].to_torch().tolist()
    return None


def _mapping(node, inputs=None):
    from onnx2torch.utils.common import OnnxMapping

    return OnnxMapping(inputs=tuple(node.input_values if inputs is None else inputs), outputs=tuple(node.output_values))


def _result(module, node, inputs=None):
    from onnx2torch.utils.common import OperationConverterResult

    return OperationConverterResult(torch_module=module, onnx_mapping=_mapping(node, inputs))


# -- modules ------------------------------------------------------------------------------
class Reshape(nn.Module):
    """ONNX Reshape: ``0`` copies the input dim unless ``allowzero``; ``-1`` infers."""

    def __init__(self, allowzero: int = 0):
        super().__init__()
        self.allowzero = allowzero

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = [int(d) for d in shape.tolist()]
        if not self.allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return torch.reshape(x, dims)


class LayerNorm(nn.Module):
    """ONNX LayerNormalization over axes ``axis..`` taken from the input at run
    time (onnx2torch reads them from inferred shapes, which may be unknown)."""

    def __init__(self, axis: int = -1, eps: float = 1e-5):
        super().__init__()
        self.axis, self.eps = axis, eps

    def forward(self, x, scale=None, bias=None):
        shape = x.shape[self.axis % x.dim():]
        if scale is not None and tuple(scale.shape) == tuple(shape) and (bias is None or tuple(bias.shape) == tuple(shape)):
            return F.layer_norm(x, shape, scale, bias, self.eps)
        y = F.layer_norm(x, shape, None, None, self.eps)
        if scale is not None:
            y = y * scale
        return y if bias is None else y + bias


class Gelu(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, approximate=self.approximate)


class Reduce(nn.Module):
    """ReduceMean/Sum/Max/Min with axes from an input (opset 18+) or an attribute."""

    def __init__(self, op: str, axes, keepdims: int = 1, noop_with_empty_axes: int = 0):
        super().__init__()
        self.op, self.axes, self.keepdims, self.noop = op, axes, bool(keepdims), bool(noop_with_empty_axes)

    def forward(self, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        ax = self.axes if axes is None else [int(a) for a in axes.tolist()]
        if not ax:
            if self.noop:
                return x
            ax = list(range(x.dim()))
        ax = sorted(a % x.dim() for a in ax)
        if self.op == "ReduceMean":
            return torch.mean(x, dim=ax, keepdim=self.keepdims)
        if self.op == "ReduceSum":
            return torch.sum(x, dim=ax, keepdim=self.keepdims)
        out = x
        fn = torch.amax if self.op == "ReduceMax" else torch.amin
        return fn(out, dim=ax, keepdim=self.keepdims)


class Pad(nn.Module):
    """ONNX Pad (constant/reflect/edge/wrap) with optional ``axes``."""

    MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}

    def __init__(self, mode: str = "constant"):
        super().__init__()
        self.mode = self.MODES[mode]

    def forward(self, x, pads, value=None, axes=None):
        pads = [int(p) for p in pads.tolist()]
        rank = x.dim()
        ax = list(range(rank)) if axes is None else [int(a) % rank for a in axes.tolist()]
        n = len(ax)
        begin, end = dict(zip(ax, pads[:n])), dict(zip(ax, pads[n:]))
        torch_pads = []
        for a in reversed(range(rank)):  # torch: last axis first
            torch_pads += [begin.get(a, 0), end.get(a, 0)]
        while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
            torch_pads = torch_pads[:-2]
        if self.mode == "constant":
            v = 0.0 if value is None or value.numel() == 0 else float(value.reshape(-1)[0])
            return F.pad(x, torch_pads, mode="constant", value=v)
        return F.pad(x, torch_pads, mode=self.mode)


class Slice(nn.Module):
    """ONNX Slice-10+: starts/ends/axes/steps as constants (stored) or run-time
    inputs; out-of-range bounds clamp as in ONNX; negative steps gather. Indexes
    with a tuple (onnx2torch's list indexing is deprecated in torch)."""

    def __init__(self, starts=None, ends=None, axes=None, steps=None):
        super().__init__()
        self.starts, self.ends, self.axes, self.steps = starts, ends, axes, steps

    def forward(self, x, starts=None, ends=None, axes=None, steps=None):
        val = lambda given, stored: stored if given is None else [int(v) for v in given.reshape(-1).tolist()]
        starts, ends = val(starts, self.starts), val(ends, self.ends)
        axes = val(axes, self.axes) or list(range(len(starts)))
        steps = val(steps, self.steps) or [1] * len(starts)
        index = [slice(None)] * x.dim()
        gathers = []
        for a, b, e, st in zip(axes, starts, ends, steps):
            a = a % x.dim()
            if st > 0:
                n = x.shape[a]
                clamp = lambda v: max(-n, min(n, v))  # noqa: E731 (same slice; torch warns on INT64_MAX bounds)
                index[a] = slice(clamp(b), clamp(e), st)
            else:
                gathers.append((a, range(*slice(b, e, st).indices(x.shape[a]))))
        y = x[tuple(index)]
        for a, r in gathers:
            y = torch.index_select(y, a, torch.tensor(list(r), dtype=torch.long, device=y.device))
        return y


class Split(nn.Module):
    def __init__(self, axis: int, num_outputs: int | None, sizes=None):
        super().__init__()
        self.axis, self.num_outputs, self.sizes = axis, num_outputs, sizes

    def forward(self, x, split=None):
        if split is not None:
            sizes = [int(s) for s in split.tolist()]
        elif self.sizes is not None:
            sizes = self.sizes
        else:
            n = x.shape[self.axis]
            k = math.ceil(n / self.num_outputs)
            sizes = [k] * (n // k) + ([n % k] if n % k else [])
        return tuple(torch.split(x, sizes, dim=self.axis))


class Attention(nn.Module):
    """ONNX Attention-23 (4-D q/k/v, or 3-D with q_num_heads/kv_num_heads), optional
    mask (bool: True = attend; float: added), is_causal, scale, softcap; GQA by
    repeating k/v heads. The KV-cache inputs/outputs are not supported."""

    def __init__(self, scale=None, is_causal=0, q_heads=None, kv_heads=None, softcap=0.0):
        super().__init__()
        self.scale, self.is_causal, self.q_heads, self.kv_heads, self.softcap = scale, bool(is_causal), q_heads, kv_heads, softcap

    def forward(self, q, k, v, mask=None):
        three_d = q.dim() == 3
        if three_d:
            b, s, _ = q.shape
            q = q.reshape(b, s, self.q_heads, -1).transpose(1, 2)
            k = k.reshape(b, k.shape[1], self.kv_heads, -1).transpose(1, 2)
            v = v.reshape(b, v.shape[1], self.kv_heads, -1).transpose(1, 2)
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        att = torch.matmul(q, k.transpose(-1, -2)) * scale
        if self.is_causal:
            n, m = att.shape[-2:]
            causal = torch.ones(n, m, dtype=torch.bool, device=att.device).tril(m - n)
            att = att.masked_fill(~causal, float("-inf"))
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else att + mask
        if self.softcap:
            att = self.softcap * torch.tanh(att / self.softcap)
        y = torch.matmul(torch.softmax(att, -1), v)
        if three_d:
            y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
        return y


# -- registration -------------------------------------------------------------------------
def register() -> None:
    global _DONE
    if _DONE:
        return
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter, get_converter

    def have(op, v):
        return OperationDescription("", op, v) in _CONVERTER_REGISTRY

    def add(op, versions, fn):
        for v in versions:
            if not have(op, v):
                add_converter(operation_type=op, version=v)(fn)

    # newer versions of unchanged ops -> the newest converter onnx2torch has
    for op in SAME_SEMANTICS:
        known = [v for v in _versions(op) if have(op, v)]
        if not known:
            continue
        latest = get_converter(op, max(known))
        newer = [v for v in _versions(op) if v > max(known)]

        def delegate(node, graph, _latest=latest, _op=op):
            if _op == "AveragePool" and any(d != 1 for d in _attr(node, "dilations", [1])):
                raise NotImplementedError("AveragePool with dilations")
            if _op == "Cast" and _attr(node, "saturate", 1) != 1:
                pass  # saturate only affects float8 targets
            return _latest(node, graph)

        add(op, newer, delegate)

    def reshape(node, graph):
        return _result(Reshape(_attr(node, "allowzero", 0)), node)

    for v in _versions("Reshape"):
        key = OperationDescription("", "Reshape", v)
        _CONVERTER_REGISTRY[key] = reshape  # ours handles allowzero; replaces onnx2torch's

    def layer_norm(node, graph):
        if len(node.output_values) > 1 and any(node.output_values[1:]):
            raise NotImplementedError("LayerNormalization with Mean/InvStdDev outputs")
        return _result(LayerNorm(_attr(node, "axis", -1), _attr(node, "epsilon", 1e-5)), node)

    for v in _versions("LayerNormalization"):
        _CONVERTER_REGISTRY[OperationDescription("", "LayerNormalization", v)] = layer_norm

    add("Gelu", _versions("Gelu"), lambda node, graph: _result(Gelu(_attr(node, "approximate", "none")), node))

    for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
        def reduce(node, graph, _op=op):
            axes = _attr(node, "axes")
            inputs = list(node.input_values)
            if len(inputs) > 1 and inputs[1]:
                c = _const(graph, inputs[1])
                if c is not None:
                    axes, inputs = list(c), inputs[:1]
            return _result(Reduce(_op, axes, _attr(node, "keepdims", 1), _attr(node, "noop_with_empty_axes", 0)), node, inputs)

        add(op, [v for v in _versions(op) if v >= 18], reduce)

    add("Pad", [v for v in _versions("Pad") if v >= 18], lambda node, graph: _result(Pad(_attr(node, "mode", "constant")), node))

    def split(node, graph):
        inputs = list(node.input_values)
        sizes = None
        if len(inputs) > 1 and inputs[1]:
            c = _const(graph, inputs[1])
            if c is not None:
                sizes, inputs = [int(x) for x in c], inputs[:1]
        return _result(Split(_attr(node, "axis", 0), _attr(node, "num_outputs", len(node.output_values)), sizes), node, inputs)

    add("Split", [v for v in _versions("Split") if v >= 18], split)

    def slice_(node, graph):
        inputs = list(node.input_values)
        stored = {}
        for i, key in enumerate(("starts", "ends", "axes", "steps"), start=1):
            if i < len(inputs) and inputs[i]:
                c = _const(graph, inputs[i])
                if c is None:  # bounds computed at run time: every input goes through
                    return _result(Slice(), node)
                stored[key] = [int(v) for v in c]
        return _result(Slice(**stored), node, inputs[:1])

    for v in [v for v in _versions("Slice") if v >= 10]:
        _CONVERTER_REGISTRY[OperationDescription("", "Slice", v)] = slice_  # replaces onnx2torch's (list indexing)

    def attention(node, graph):
        if len(node.input_values) > 4 and any(node.input_values[4:]) or len(node.output_values) > 1 and any(node.output_values[1:]):
            raise NotImplementedError("Attention with a KV cache or extra outputs")
        if _attr(node, "qk_matmul_output_mode", 0):
            raise NotImplementedError("Attention qk_matmul_output_mode")
        m = Attention(_attr(node, "scale"), _attr(node, "is_causal", 0), _attr(node, "q_num_heads"),
                      _attr(node, "kv_num_heads"), _attr(node, "softcap", 0.0))
        return _result(m, node, [x for x in node.input_values[:4]])

    add("Attention", _versions("Attention"), attention)
    _DONE = True

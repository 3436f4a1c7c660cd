"""Quantized constants: a weight or bias that a QDQ model reads through
``DequantizeLinear`` of initializers. Readers see the dequantized (float)
values; new float values are quantized again on the constant's own grid kind
(its integer type, zero points and axis), with scales chosen so they fit, and
a quantized bias keeps the relation ONNX Runtime's and TensorRT's integer
kernels assume (bias scale = input scale x weight scale) by following its
weight's change of scale, or its own scale when only the bias moves. Plain
numpy on what :func:`dq_constant` read: recovery fits with it, and the
rewriter (the only code that edits a model) writes the integers back.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


def dq_node(v: ir.Value | None) -> ir.Node | None:
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


def dq_value(v: ir.Value | None) -> np.ndarray | None:
    """The float32 values of ``v`` when a DequantizeLinear of constants makes it (:func:`dq_node`), else None."""
    dq = dq_node(v)
    if dq is None:
        return None
    q, scale, zp, _ = dq_parts(dq)
    return ((q.astype(np.float32) - zp) * scale).astype(np.float32)


WEIGHT_TYPES = (np.int8, np.uint8, np.int16, np.uint16)
BIAS_TYPES = (np.int32,)


@dataclass
class Dequantized:
    """``DequantizeLinear(q, scale, zero_point)`` of initializers, read by one node only."""

    node: object  # the DequantizeLinear (an onnx_ir node)
    q: np.ndarray
    scale: np.ndarray  # a scalar, or one per entry of ``q`` along ``axis``
    zero: np.ndarray  # the same shape as ``scale``
    axis: int

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    def _along(self, a: np.ndarray) -> np.ndarray:
        """``a`` (shaped like the scale) broadcast against ``q``."""
        if self.per_tensor:
            return a.reshape(())
        shape = [1] * self.q.ndim
        shape[self.axis] = a.size
        return a.reshape(shape)

    def value(self) -> np.ndarray:
        """The float32 values the model computes with."""
        q = self.q.astype(np.float64) - self._along(self.zero.astype(np.float64))
        return (q * self._along(self.scale.astype(np.float64))).astype(np.float32)

    def quantize(self, w: np.ndarray, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``w`` (float, ``q``'s shape) on this constant's grid: the integers and
        their scales. ``scale`` given: those scales (a bias following its
        weight); else per scale entry the smallest that holds ``w`` within the
        integer type from the kept zero point (symmetric ``[-qmax, qmax]`` when
        a signed type has every zero point 0, as symmetric weight quantizers
        write), the old scale where ``w`` is all 0."""
        info = np.iinfo(self.q.dtype)
        w = np.asarray(w, np.float64)
        zero = self.zero.astype(np.float64)
        if scale is None:
            axes = tuple(range(w.ndim)) if self.per_tensor else tuple(i for i in range(w.ndim) if i != self.axis)
            hi = (w.max(axis=axes) if w.size else np.zeros(())).reshape(-1)
            lo = (w.min(axis=axes) if w.size else np.zeros(())).reshape(-1)
            zero = zero.reshape(-1)
            if info.min < 0 and not np.any(zero):
                need = np.maximum(np.abs(hi), np.abs(lo)) / info.max
            else:
                up = np.where(hi > 0, hi / np.maximum(info.max - zero, 1e-30), 0.0)
                down = np.where(lo < 0, lo / np.minimum(info.min - zero, -1e-30), 0.0)
                need = np.maximum(up, down)
            old = self.scale.astype(np.float64).reshape(-1)
            scale = np.where(need > 0, need, old)
        scale = np.asarray(scale, self.scale.dtype).reshape(self.scale.shape)
        q = np.rint(w / self._along(scale.astype(np.float64))) + self._along(self.zero.astype(np.float64))
        return np.clip(q, info.min, info.max).astype(self.q.dtype), scale


def dq_constant(value, const, types=WEIGHT_TYPES) -> Dequantized | str | None:
    """``value`` as a :class:`Dequantized` when a ``DequantizeLinear`` of
    initializers (read through ``const``) makes it for one reader; None when
    no DequantizeLinear makes it; a reason when one does but recovery cannot
    write it back (shared, blocked, another integer type, a computed input)."""
    p = value.producer() if value is not None else None
    if p is None or p.op_type != "DequantizeLinear" or p.domain not in ("", "ai.onnx", "com.microsoft"):
        return None
    if len(value.uses()) != 1 or value.is_graph_output():
        return "a quantized weight shared with other nodes"
    a = p.attributes.get("block_size")
    if a is not None and a.value:
        return "a block-quantized weight (DequantizeLinear block_size)"
    ins = list(p.inputs) + [None] * (3 - len(p.inputs))
    q, scale = const(ins[0]), const(ins[1])
    zero = const(ins[2]) if ins[2] is not None else None
    if q is None or scale is None or (ins[2] is not None and zero is None):
        return "a quantized weight whose DequantizeLinear inputs are not all initializers"
    if q.dtype.type not in types:
        return f"a {q.dtype} quantized constant (re-quantized: {', '.join(np.dtype(t).name for t in types)})"
    if scale.dtype != np.float32:
        return f"a quantized weight with {scale.dtype} scales (only float32)"
    zero = np.zeros(scale.shape, q.dtype) if zero is None else zero
    a = p.attributes.get("axis")
    axis = int(a.value) if a is not None else 1
    if zero.size != scale.size or scale.size > 1 and (scale.ndim != 1 or zero.ndim != 1):
        return "a quantized weight with scales of more than one axis"
    if scale.size > 1:
        axis = axis % max(q.ndim, 1)
        if q.ndim == 0 or q.shape[axis] != scale.size:
            return "a quantized weight whose scales do not match its axis"
    return Dequantized(p, q, scale, zero, axis)

"""Coupling rules, one module per op family. Each module declares its rules in its
own ``RULES`` registry; :func:`default_registry` merges them (a second rule for an
op at an overlapping opset raises). What a rule may read and declare, and how it
refuses, is the contract in :mod:`onnxprune.core.analysis`.

A new op: write ``@RULES.rule("MyOp", since=..)`` in the family's module (or a new
module listed below and in ``FAMILIES``), and a small ONNX-text test in
``tests/test_rules.py`` (a test fails when a rule has none).

| module          | ops |
|-----------------|-----|
| ``elementwise`` | activations, Add/Sub/Mul/Div/PRelu/Where..., Softmax |
| ``conv``        | Conv, ConvTranspose (regular, grouped, depthwise) |
| ``linear``      | Gemm, MatMul (initializer on either side, or activation x activation) |
| ``norm``        | BatchNormalization, InstanceNormalization, GroupNormalization, LayerNormalization |
| ``pool``        | pools, Reduce*, Resize, Pad |
| ``attention``   | Attention (opset 23) |
| ``ort_fused``   | onnxruntime's fused ops (com.microsoft): SkipLayerNorm, EmbedLayerNorm, Gelu family, Attention, MultiHeadAttention, GroupQueryAttention |
| ``quant``       | QuantizeLinear, DequantizeLinear (QDQ; quantized weights read as constants) |
| ``shape_ops``   | Transpose, Reshape, Flatten, (Un)Squeeze, Concat, Split, Slice, Gather, Shape, Expand |
"""
from __future__ import annotations

from functools import lru_cache

from onnxprune.core.registry import Registry
from onnxprune.rules import attention, conv, elementwise, linear, norm, ort_fused, pool, quant, shape_ops

FAMILIES = (elementwise, conv, linear, norm, pool, attention, ort_fused, quant, shape_ops)


@lru_cache(maxsize=None)
def _merged() -> Registry:
    return Registry().merge(*(m.RULES for m in FAMILIES))


def default_registry() -> Registry:
    """Every rule of this package, in a fresh registry (add your own to it freely)."""
    return Registry().merge(_merged())

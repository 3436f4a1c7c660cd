"""Coupling rules, one module per op family; importing this package registers them.

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
from . import attention, conv, elementwise, linear, norm, ort_fused, pool, quant, shape_ops  # noqa: F401

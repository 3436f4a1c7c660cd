"""Quantized constants (onnxprune.core.quant): float values put back on a
DequantizeLinear's own grid, a quantized bias moved by the rewriter, and the
layers behind a QDQ model's weights found where pruned channels end."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxprune.core.quant import Dequantized


def _dq(q, scale, zero, axis=0) -> Dequantized:
    return Dequantized(None, np.asarray(q), np.asarray(scale, np.float32), np.asarray(zero, np.asarray(q).dtype), axis)


def test_a_signed_symmetric_weight_goes_back_per_channel_within_half_a_step():
    rng = np.random.default_rng(0)
    old = _dq(np.zeros((6, 4, 3, 3), np.int8), np.full(6, 0.01), np.zeros(6, np.int8))
    w = rng.standard_normal((6, 4, 3, 3)) * np.array([0.1, 1, 10, 0.5, 2, 0])[:, None, None, None]
    q, scale = old.quantize(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (6,)
    assert q.min() >= -127 and q.max() <= 127  # symmetric: -128 is not used
    back = _dq(q, scale, np.zeros(6, np.int8)).value()
    step = scale[:, None, None, None].astype(np.float64)
    assert np.all(np.abs(back - w) <= 0.5 * step + 1e-7)
    big = np.abs(w).reshape(6, -1).max(1)
    assert np.allclose(scale[:5], big[:5] / 127, rtol=1e-6)  # each channel uses its whole range
    assert scale[5] == np.float32(0.01)  # an all-zero channel keeps its scale


def test_an_asymmetric_per_tensor_weight_keeps_its_zero_point_and_fits_the_range():
    rng = np.random.default_rng(1)
    old = _dq(np.full((5, 7), 128, np.uint8), 0.02, np.uint8(100), axis=1)
    w = rng.uniform(-3, 1, (5, 7))
    q, scale = old.quantize(w)
    assert q.dtype == np.uint8 and scale.shape == ()
    assert q.min() >= 0 and q.max() <= 255 and (q.min() == 0 or q.max() == 255)  # the range is used to one end
    back = _dq(q, scale, np.uint8(100), axis=1).value()
    assert np.all(np.abs(back - w) <= 0.5 * float(scale) + 1e-6)


def test_a_bias_follows_the_scale_it_is_given():
    old = _dq(np.array([10, -20, 30], np.int32), [0.5, 0.25, 0.125], np.zeros(3, np.int32))
    q, scale = old.quantize(np.array([1.0, -1.0, 2.0]), np.array([0.1, 0.2, 0.4]))
    assert np.array_equal(scale, np.float32([0.1, 0.2, 0.4])) and q.dtype == np.int32
    assert np.array_equal(q, [10, -5, 5])


def _qdq_conv(bias_q: np.ndarray, bias_scale: np.ndarray) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((3, 2, 1, 1), np.int8), "wq")
    inits = [w, numpy_helper.from_array(np.full(3, 0.1, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(3, np.int8), "wz"),
             numpy_helper.from_array(bias_q, "bq"), numpy_helper.from_array(bias_scale, "bs"),
             numpy_helper.from_array(np.zeros(3, np.int32), "bz")]
    nodes = [onnx.helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dqw", axis=0),
             onnx.helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"], name="dqb", axis=0),
             onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")]
    g = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_shift_output_moves_a_quantized_bias_on_its_own_grid():
    from onnxprune.rewrite import Journal, shift_output

    m = ir.from_proto(_qdq_conv(np.array([100, -40, 7], np.int32), np.float32([0.01, 0.02, 0.04])))
    conv = next(n for n in m.graph if n.name == "conv")
    j = Journal()
    assert shift_output(conv, np.array([0.5, -0.3, 0.2]), j)
    got = m.graph.initializers["bq"].const_value.numpy()
    assert got.dtype == np.int32 and np.array_equal(got, [150, -55, 12])  # + round(shift / scale)
    assert np.array_equal(m.graph.initializers["bs"].const_value.numpy(), np.float32([0.01, 0.02, 0.04]))
    j.undo()
    assert np.array_equal(m.graph.initializers["bq"].const_value.numpy(), [100, -40, 7])


def test_mean_compensation_finds_the_layer_behind_a_quantized_weight():
    """Scope damage folds removed channels' means into the consumer's bias: in
    a QDQ model the consumer is found behind its weight's DequantizeLinear
    (the analysis sees the channels on the integer weight) and reads the
    dequantized weight."""
    import tempfile
    from pathlib import Path

    from test_foreign import _qdq_pair

    from onnxprune.pipeline import Job
    from onnxprune.plan.importance.recon import consumers

    with tempfile.TemporaryDirectory() as d:
        f, q = _qdq_pair(Path(d))
    found = {}
    for name, m in (("float", f), ("quantized", q)):
        job = Job.open(m)
        found[name] = sorted((c.node.name, c.w.shape, round(float(np.abs(c.w).sum()), 1))
                             for g in job.groups if not g.frozen for c in consumers(job.ctx, g))
    assert [n for n, _, _ in found["quantized"]] == [n for n, _, _ in found["float"]] and found["float"]
    for (_, s0, a0), (_, s1, a1) in zip(found["float"], found["quantized"]):
        assert s0 == s1 and abs(a0 - a1) <= 0.02 * a0  # the same weights, up to int8 rounding

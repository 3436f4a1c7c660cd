"""The independent params/MACs counter (what ``bench`` prints) on files whose
layer shapes are computed at run time: they are folded first, so the count is
the one a hand count gives."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.core import metrics


def _padded_conv(computed: bool) -> onnx.ModelProto:
    """x [1,3,8,8] -> Pad (1 on each side of H, W) -> Conv 3->4, 3x3, no padding -> [1,4,8,8].
    With ``computed`` the pads are a Concat of Constant nodes, which shape inference does not evaluate."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    if computed:
        nodes = [helper.make_node("Constant", [], ["p0"], value=numpy_helper.from_array(np.array([0, 0, 1, 1], np.int64))),
                 helper.make_node("Constant", [], ["p1"], value=numpy_helper.from_array(np.array([0, 0, 1, 1], np.int64))),
                 helper.make_node("Concat", ["p0", "p1"], ["pads"], axis=0)]
        inits = [w]
    else:
        nodes, inits = [], [w, numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")]
    nodes += [helper.make_node("Pad", ["x", "pads"], ["xp"]), helper.make_node("Conv", ["xp", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_count_with_pads_computed_at_run_time_equals_the_hand_count():
    hand = {"params": 4 * 3 * 3 * 3, "macs": (4 * 8 * 8) * (3 * 3 * 3)}  # every output element: C_in x k x k
    assert metrics.count(_padded_conv(computed=False)) == hand
    assert metrics.count(_padded_conv(computed=True)) == hand

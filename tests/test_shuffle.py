"""Channel shuffle (ShuffleNet's Reshape-Transpose-Reshape over concatenated
branches) is frozen with a reason that names it, and the rest of the model
still prunes exactly."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.api import analyze
from onnxprune.plan import Ratios
from onnxprune.api import verify


def _model(perm=(0, 2, 1, 3, 4), c=8) -> onnx.ModelProto:
    """stem conv -> two branch convs (c each) -> Concat -> Reshape(1, 2, c, 4, 4)
    -> Transpose(perm) -> Reshape(1, 2c, 4, 4) -> conv -> output."""
    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("ws", w(6, 3, 3, 3)), ("wa", w(c, 6, 1, 1)), ("wb", w(c, 6, 3, 3)), ("wo", w(5, 2 * c, 1, 1)),
        ("s5", np.array([1, 2, c, 4, 4], np.int64)), ("s4", np.array([1, 2 * c, 4, 4], np.int64)))]
    nodes = [helper.make_node("Conv", ["x", "ws"], ["s"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["s"], ["sr"]),
             helper.make_node("Conv", ["sr", "wa"], ["a"]), helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["sr", "wb"], ["b"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Concat", ["ar", "br"], ["cat"], axis=1),
             helper.make_node("Reshape", ["cat", "s5"], ["r5"], name="split5"),
             helper.make_node("Transpose", ["r5"], ["t5"], perm=list(perm)),
             helper.make_node("Reshape", ["t5", "s4"], ["mix"]),
             helper.make_node("Conv", ["mix", "wo"], ["y"])]
    g = helper.make_graph(nodes, "shuffle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 4, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _frozen_reasons(proto) -> dict[int, list[str]]:
    return {g.width: g.frozen for g in analyze(proto).groups if g.frozen}


def test_shuffled_branches_are_frozen_as_a_channel_shuffle():
    reasons = _frozen_reasons(_model())
    assert 8 in reasons  # the two branch groups (width 8)
    assert any("channel shuffle of 2 concatenated branches" in r and "split5" in r for r in reasons[8]), reasons


def test_the_rest_of_a_shuffling_model_still_prunes_exactly():
    live = [g for g in analyze(_model()).groups if not g.frozen]
    assert [g.width for g in live] == [6]  # the stem
    rows = verify(_model(), Ratios.from_dict({"default": 0.5}))
    assert rows[-1].status == "PASS" and rows[-1].groups == 1 and rows[-1].removed == 3


@pytest.mark.parametrize("perm", [(0, 1, 2, 3, 4), (0, 1, 2, 4, 3)])
def test_a_reshape_round_trip_without_the_swap_is_not_called_a_shuffle(perm):
    reasons = _frozen_reasons(_model(perm=perm))
    text = " ".join(r for rs in reasons.values() for r in rs)
    assert "channel shuffle" not in text and "reshape of a concatenated axis" in text

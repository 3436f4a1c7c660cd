"""Weights stored computed, as older converters write them: a Conv weight made
by ConstantOfShape, a Conv weight transposed from an initializer, a Gemm
weight reshaped from a flat initializer. They are folded at load, so their
layers prune, and the oracle passes; a Cast of a weight is not folded (the
file keeps its stored precision)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.api import analyze, prune
from onnxprune.plan import Ratios
from onnxprune.api import verify


def _model(cast=False, c2=6):
    rng = np.random.default_rng(0)
    w2t = rng.standard_normal((8, c2, 1, 1)).astype(np.float16 if cast else np.float32)  # > 64 values: not a shape constant
    nodes = [helper.make_node("ConstantOfShape", ["shp"], ["w1"], value=numpy_helper.from_array(np.array([0.1], np.float32))),
             helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Cast", ["w2t"], ["w2c"], to=TensorProto.FLOAT) if cast else
             helper.make_node("Identity", ["w2t"], ["w2c"]),
             helper.make_node("Transpose", ["w2c"], ["w2"], perm=[1, 0, 2, 3]),
             helper.make_node("Conv", ["r", "w2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("Reshape", ["w3flat", "s3"], ["w3"]),
             helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
                          [numpy_helper.from_array(np.array([8, 3, 3, 3], np.int64), "shp"), numpy_helper.from_array(w2t, "w2t"),
                           numpy_helper.from_array(rng.standard_normal(5 * c2 * 16).astype(np.float32), "w3flat"),
                           numpy_helper.from_array(np.array([5, c2 * 16], np.int64), "s3")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_computed_weights_are_folded_and_prune_exactly():
    a = analyze(_model())
    live = sorted((g.kind, g.width) for g in a.groups if not g.frozen)
    assert live == [("channels", 6), ("channels", 8)], [(g.kind, g.frozen) for g in a.groups]
    rows = verify(_model(), Ratios.from_dict({"default": 0.5}))
    assert rows[-1].status == "PASS" and rows[-1].groups == 2 and rows[-1].max_rel_err <= 1e-4
    res = prune(_model(), {"default": 0.5})
    shapes = {t.name: list(t.dims) for t in res.proto.graph.initializer}
    assert sorted(list(d[:2]) for d in shapes.values() if len(d) == 4) == [[3, 4], [4, 3]]  # conv1 8->4 out; conv2 6->3 out, 8->4 in


def test_a_cast_weight_keeps_its_stored_precision():
    res = prune(_model(cast=True, c2=10), {"default": 0.5})
    dtypes = {t.name: t.data_type for t in res.proto.graph.initializer}
    assert TensorProto.FLOAT16 in dtypes.values()  # the fp16 weight stayed fp16
    assert any(n.op_type == "Cast" for n in res.proto.graph.node)


def test_each_load_pass_says_how_much_it_changed():
    import onnx_ir as ir

    from onnxprune.io import pin_attention_scale, weights_as_initializers

    m = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4] x) => (float[1,4] y) {
  c = Constant <value = float[4] {1, 2, 3, 4}> ()
  w2 = Identity (w)
  h = Add (x, c)
  y = Mul (h, w2)
}''')
    m.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "w"))
    model = ir.serde.deserialize_model(m)
    assert weights_as_initializers(model) == 2  # the Constant and the Identity of an initializer
    assert weights_as_initializers(model) == 0
    assert [n.op_type for n in model.graph] == ["Add", "Mul"]
    assert pin_attention_scale(model) == 0  # no attention op: nothing to pin

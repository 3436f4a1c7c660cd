"""Property test: random models built from the supported op vocabulary (convs, grouped and
depthwise convs, BatchNorm, activations, residual adds, concat/split, squeeze-excite gates,
LayerNorm, an attention block, pooling and a classifier). For every model the oracle must
pass on every group labelled exact, and must check something."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.pipeline import Job
from onnxprune.plan import Ratios
from onnxprune.validate.oracle import TOLERANCE, oracle


class Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0

    def name(self, p: str) -> str:
        self.k += 1
        return f"{p}{self.k}"

    def w(self, *shape, scale=0.5) -> str:
        n = self.name("w")
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), n))
        return n

    def const(self, arr) -> str:
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def op(self, op, ins, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, ins, [out], name=self.name("n"), **attrs))
        return out

    def conv(self, x, cin, cout, k=3, group=1) -> str:
        return self.op("Conv", [x, self.w(cout, cin // group, k, k, scale=1 / np.sqrt(cin // group * k * k)), self.w(cout, scale=0.1)],
                       pads=[k // 2] * 4, group=group)

    def act(self, x) -> str:
        kind = self.rng.choice(["Relu", "Sigmoid", "HardSwish", "swish", "Gelu"])
        if kind == "swish":
            return self.op("Mul", [x, self.op("Sigmoid", [x])])
        if kind == "Gelu":
            return self.op("Mul", [x, self.op("Sigmoid", [self.op("Mul", [x, self.const(np.float32(1.702))])])])
        return self.op(kind, [x])

    def bn(self, x, c) -> str:
        r = self.rng
        return self.op("BatchNormalization", [x, self.const((0.5 + r.random(c)).astype(np.float32)), self.const((0.1 * r.standard_normal(c)).astype(np.float32)),
                                              self.const((0.1 * r.standard_normal(c)).astype(np.float32)), self.const((0.5 + r.random(c)).astype(np.float32))])

    def block(self, x, c) -> tuple[str, int]:
        kind = self.rng.choice(["conv", "residual", "concat", "split", "grouped", "depthwise", "se", "layernorm", "attention"])
        if kind == "conv":
            c2 = int(self.rng.choice([4, 6, 8, 12]))
            return self.act(self.bn(self.conv(x, c, c2), c2)), c2
        if kind == "residual":
            h = self.act(self.conv(x, c, 2 * c, k=1))
            return self.op("Add", [x, self.conv(h, 2 * c, c)]), c
        if kind == "concat":
            a = self.act(self.conv(x, c, 4, k=1))
            return self.op("Concat", [a, self.act(self.conv(x, c, 6))], axis=1), 10
        if kind == "split" and c % 2 == 0:
            a, b = self.name("s"), self.name("s")
            self.nodes.append(helper.make_node("Split", [x, self.const(np.array([c // 2, c // 2], np.int64))], [a, b], name=self.name("n"), axis=1))
            return self.op("Concat", [self.act(self.conv(a, c // 2, c // 2)), b], axis=1), c
        if kind == "grouped" and c % 2 == 0:
            return self.act(self.conv(x, c, c, group=2)), c
        if kind == "depthwise":
            return self.act(self.conv(x, c, c, group=c)), c
        if kind == "se":
            p = self.op("GlobalAveragePool", [x])
            g = self.op("Sigmoid", [self.conv(self.op("Relu", [self.conv(p, c, 4, k=1)]), 4, c, k=1)])
            return self.op("Mul", [x, g]), c
        if kind == "layernorm":  # channels-last LayerNorm between Transposes (ConvNeXt): approximate
            t = self.op("Transpose", [x], perm=[0, 2, 3, 1])
            n = self.op("LayerNormalization", [t, self.const((0.5 + self.rng.random(c)).astype(np.float32)), self.w(c, scale=0.1)], axis=-1)
            return self.conv(self.op("Transpose", [n], perm=[0, 3, 1, 2]), c, c, k=1), c
        if kind == "attention":  # tokens = positions, heads of 2 dims, separate q/k/v
            h = 2
            t = self.op("Transpose", [self.op("Reshape", [x, self.const(np.array([1, c, 64], np.int64))])], perm=[0, 2, 1])
            q, kk, v = (self.op("MatMul", [t, self.w(c, 2 * h, scale=1 / np.sqrt(c))]) for _ in range(3))
            s4 = self.const(np.array([1, 64, h, 2], np.int64))
            qh = self.op("Transpose", [self.op("Reshape", [q, s4])], perm=[0, 2, 1, 3])
            kh = self.op("Transpose", [self.op("Reshape", [kk, s4])], perm=[0, 2, 3, 1])
            vh = self.op("Transpose", [self.op("Reshape", [v, s4])], perm=[0, 2, 1, 3])
            a = self.op("Softmax", [self.op("Mul", [self.op("MatMul", [qh, kh]), self.const(np.float32(0.7))])], axis=-1)
            o = self.op("Reshape", [self.op("Transpose", [self.op("MatMul", [a, vh])], perm=[0, 2, 1, 3]), self.const(np.array([1, 64, 2 * h], np.int64))])
            p = self.op("MatMul", [o, self.w(2 * h, c, scale=0.5)])
            back = self.op("Reshape", [self.op("Transpose", [p], perm=[0, 2, 1]), self.const(np.array([1, c, 8, 8], np.int64))])
            return self.op("Add", [x, back]), c
        return self.act(x), c

    def model(self) -> onnx.ModelProto:
        c = int(self.rng.choice([6, 8]))
        x = self.act(self.conv("x", 3, c))
        for _ in range(int(self.rng.integers(2, 6))):
            x, c = self.block(x, c)
        f = self.op("Flatten", [self.op("GlobalAveragePool", [x])])
        self.nodes.append(helper.make_node("Gemm", [f, self.w(5, c), self.w(5)], ["y"], name="head", transB=1))
        g = helper.make_graph(self.nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(m, full_check=True)
        return m


@pytest.mark.parametrize("seed", range(24))
def test_random_models_verify_on_every_exact_group(seed):
    m = Builder(seed).model()
    ratio = float(np.random.default_rng(100 + seed).choice([0.25, 0.4, 0.5]))
    job = Job.open(m)
    plan = job.plan(Ratios.from_dict({"default": ratio, "scope": "local"}))
    assert plan.keep, "nothing pruned"
    rows = oracle(job, plan=plan)
    tested = [r for r in rows if r.max_rel_err is not None]
    assert tested, [(r.scope, r.status) for r in rows]
    bad = [(r.scope, r.max_rel_err) for r in tested if not r.max_rel_err <= TOLERANCE]
    assert not bad, bad

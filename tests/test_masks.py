"""Attention masks as today's ``transformers`` exports build them (legacy
exporter): ``Where(Expand(And(...), shape), 0, -inf)`` with ``shape`` computed
at run time, ``Where(Equal(s, -1), 1, s)`` with
``s = Concat(Gather(Shape(x), 0), [1], Gather(Shape(x), 1), Gather(Shape(mask), 1))``,
and the batch size read from the stream's shape into a ``Range``. The head
axis of the mask is 1 only if the values of the shape tensors are followed;
reading the stream's batch size is not reading its channel count. A look-alike
built by hand: heads, head dims, the MLP and the stream must be prunable, and
the oracle must pass."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.api import analyze
from onnxprune.plan import Ratios
from onnxprune.api import verify

TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,6,4] x_in, int64[N,6] mask) => (float[N,3] y) {
  x = MatMul(x_in, we)
  q0 = MatMul(x, wq)
  k0 = MatMul(x, wk)
  v0 = MatMul(x, wv)
  q1 = Reshape(q0, s4)
  k1 = Reshape(k0, s4)
  v1 = Reshape(v0, s4)
  q2 = Transpose <perm=[0,2,1,3]> (q1)
  k2 = Transpose <perm=[0,2,3,1]> (k1)
  v2 = Transpose <perm=[0,2,1,3]> (v1)
  s0 = MatMul(q2, k2)
  s1 = Mul(s0, scale)
  sx = Shape(x)
  b = Gather <axis=0> (sx, i0)
  t = Gather <axis=0> (sx, i1)
  sm = Shape(mask)
  mt = Gather <axis=0> (sm, i1)
  bu = Unsqueeze(b, ax0)
  tu = Unsqueeze(t, ax0)
  mu = Unsqueeze(mt, ax0)
  sh = Concat <axis=0> (bu, one1, tu, mu)
  eq = Equal(sh, minus1)
  shp = Where(eq, ones4, sh)
  mb = Cast <to=9> (mask)
  mb1 = Unsqueeze(mb, ax12)
  ok = And(mb1, true1)
  e = Expand(ok, shp)
  am = Where(e, zero, neginf)
  s2 = Add(s1, am)
  p = Softmax <axis=-1> (s2)
  o0 = MatMul(p, v2)
  o1 = Transpose <perm=[0,2,1,3]> (o0)
  o2 = Reshape(o1, s3)
  a = MatMul(o2, wo)
  h = Add(x, a)
  f1 = MatMul(h, w1)
  f2 = Relu(f1)
  f3 = MatMul(f2, w2)
  h2 = Add(h, f3)
  pooled = ReduceMean <keepdims=0, axes=[1]> (h2)
  logits = MatMul(pooled, wh)
  bf = Cast <to=1> (b)
  pos = Range(zerof, bf, onef)
  ps = ReduceSum <keepdims=0> (pos)
  z = Mul(ps, zero)
  y = Add(logits, z)
}"""


def _model(seed=0):
    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    m = onnx.parser.parse_model(TEXT)
    consts = {"we": w(4, 8), "wq": w(8, 8), "wk": w(8, 8), "wv": w(8, 8), "wo": w(8, 8), "w1": w(8, 16), "w2": w(16, 8),
              "wh": w(8, 3), "s4": i64(0, 6, 2, 4), "s3": i64(0, 6, 8), "scale": np.array(0.5, np.float32),
              "i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "ax0": i64(0), "ax12": i64(1, 2),
              "one1": i64(1), "minus1": np.array(-1, np.int64), "ones4": i64(1, 1, 1, 1), "true1": np.array(True),
              "zero": np.array(0.0, np.float32), "neginf": np.array(-np.inf, np.float32),
              "zerof": np.array(0.0, np.float32), "onef": np.array(1.0, np.float32)}
    m.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in consts.items())
    onnx.checker.check_model(m, full_check=True)
    return m


def test_computed_mask_shape_leaves_heads_and_stream_prunable():
    a = analyze(_model())
    live = {}
    for g in a.groups:
        if not g.frozen:
            live.setdefault(g.kind, []).append(g.width)
    frozen = [(g.kind, g.frozen) for g in a.groups if g.frozen]
    assert live == {"heads": [2], "head_dim": [4, 4], "mlp": [16], "embed": [8]}, frozen  # q.k dims, v dims


@pytest.mark.parametrize("kind", ["heads", "head_dim", "mlp"])
def test_computed_mask_shape_oracle(kind):
    rows = verify(_model(), Ratios.from_dict({"kinds": {kind: 0.5}}), batch=3)
    assert rows[-1].status == "PASS" and rows[-1].max_rel_err <= 1e-4, rows

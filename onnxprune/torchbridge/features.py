"""Feature matching for label-free distillation.

The logits say little per image about *where* a pruned network went wrong;
the intermediate values the student and its teacher both compute say much
more. A pruned ONNX model keeps the original's value names, so the values to
match are found by name: the outputs of the layers that lost input channels
(a projection after a pruned expansion, the second linear of a pruned MLP,
the output projection after pruned heads) whose own width did not change.
Their shapes equal the teacher's, so the loss is a plain normalised MSE per
value. Both graphs get these values as extra outputs for training only; the
written model is the student's own graph with the trained weights.
"""
from __future__ import annotations

import onnx
from onnx import helper

from onnxprune import io

MAX_TAPS = 16  # values matched at most (evenly spaced along the graph)


def _shapes(proto: onnx.ModelProto) -> dict[str, tuple]:
    """name -> (elem_type, dims) for every value whose type shape inference knows
    (a symbolic dim is kept as its name)."""
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    try:
        inferred = io.infer(work)
    except Exception:  # a graph shape inference cannot read: no taps
        return {}
    out = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        out[vi.name] = (t.elem_type, tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or None
                                           for d in t.shape.dim))
    return out


def _init_shapes(proto: onnx.ModelProto) -> dict[str, tuple]:
    return {i.name: tuple(i.dims) for i in proto.graph.initializer}


def _out_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The axis of a linear layer's weight that indexes its output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "MatMul":
        return rank - 1
    if node.op_type == "Gemm":
        trans = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans else 1
    return None


def _compatible(a: tuple | None, b: tuple | None) -> bool:
    """Same element type and rank, and every dim both know is equal."""
    if a is None or b is None or a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    return all(x == y for x, y in zip(a[1], b[1]) if isinstance(x, int) and isinstance(y, int))


def taps(student: onnx.ModelProto, teacher: onnx.ModelProto, limit: int = MAX_TAPS) -> dict[str, int]:
    """The values to match, name -> ONNX element type, in graph order: outputs
    of linear layers (Conv, Gemm, MatMul) whose weight lost input channels but
    kept every output channel, so the value has the teacher's width. Graph
    outputs are left to the output loss. At most ``limit``, evenly spaced."""
    s_init, t_init = _init_shapes(student), _init_shapes(teacher)
    t_made = {o for n in teacher.graph.node for o in n.output}
    outputs = {o.name for o in student.graph.output}
    s_shape, t_shape = _shapes(student), _shapes(teacher)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    found: list[tuple[str, int]] = []
    for node in student.graph.node:
        if len(node.input) < 2 or not node.output or node.output[0] in outputs or node.output[0] not in t_made:
            continue
        w = node.input[1]
        if w not in s_init or w not in t_init or s_init[w] == t_init[w] or len(s_init[w]) != len(t_init[w]):
            continue
        ax = _out_axis(node, len(s_init[w]))
        if ax is None or s_init[w][ax] != t_init[w][ax]:
            continue  # not a linear layer, or its output width changed
        v = node.output[0]
        a = s_shape.get(v)
        if a is not None and a[0] in floats and _compatible(a, t_shape.get(v)):
            found.append((v, a[0]))
    if len(found) > limit:
        step = len(found) / limit
        found = [found[int(i * step + step / 2)] for i in range(limit)]
    return dict(found)


def with_outputs(proto: onnx.ModelProto, values: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``proto`` that also outputs ``values`` (name -> element type, as
    :func:`taps` gives them), after its own outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for name, elem in values.items():
        out.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return out


def feature_loss(feats: list, t_feats: list):
    """Mean over the matched values of ``MSE / var(teacher)`` (None when no
    pair has one shape)."""
    import torch

    terms = []
    for s, t in zip(feats, t_feats):
        if not torch.is_floating_point(s) or s.shape != t.shape:
            continue
        s, t = s.float(), t.float()
        terms.append(((s - t) ** 2).mean() / (t.var() + 1e-8))
    return torch.stack(terms).mean() if terms else None


__all__ = ["taps", "with_outputs", "feature_loss", "MAX_TAPS"]

"""How long each node of a model takes alone, on the runtime it will run on.

:func:`node_times` runs the model once with every intermediate value exposed,
then builds a one-node model for each node (its weights as initializers, the
values it read as inputs) and times it in its own ORT session: the median of
``runs`` runs after ``warmup``. Timing one node at a time keeps the rest of
the model's noise out of the reading, so the difference a width makes to one
layer is measurable on a shared machine, where a whole-model timing moves by
as much as pruning one layer saves. The sum over nodes is not the model's
latency (ORT fuses some nodes, overlaps none on one stream), which is why
:mod:`onnxprune.plan.latency` only uses these times to decide *where* a
latency budget is spent and still measures the whole model to meet it.
"""
from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import helper

from onnxprune.runtime import session
from onnxprune.runtime.capture import exposed

_SUBGRAPH = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _one_node(proto: onnx.ModelProto, node: onnx.NodeProto, values: dict, inits: dict):
    """A model of ``node`` alone, and its feed; None when it cannot stand alone."""
    if any(a.type in _SUBGRAPH for a in node.attribute):
        return None
    graph_inputs, feed, weights = [], {}, []
    for name in node.input:
        if not name or name in feed or any(w.name == name for w in weights):
            continue
        if name in inits:
            weights.append(inits[name])
        elif name in values:
            a = values[name]
            graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape))
            feed[name] = a
        else:
            return None
    if not all(o in values for o in node.output if o):
        return None
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    g = helper.make_graph([node], "node", graph_inputs, outputs, initializer=weights)
    m = helper.make_model(g, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    return m, feed


def node_times(proto: onnx.ModelProto, feed: dict, provider: str = "cpu", threads: int | None = 1, runs: int = 10,
               warmup: int = 2, progress=None) -> list[float | None]:
    """Milliseconds each node of ``proto`` (graph order) takes alone on the
    values it reads when ``proto`` runs on ``feed``: the median of ``runs``.
    None for a node that cannot run alone (a control-flow node, a value that
    is not a tensor)."""
    inits = {i.name: i for i in proto.graph.initializer}
    names = [o for n in proto.graph.node for o in n.output if o and o not in inits]
    sess = exposed(proto, names, threads=threads)
    got = sess.run(names, feed)
    del sess
    values = {k: v for k, v in zip(names, got) if isinstance(v, np.ndarray)}
    values.update({k: v for k, v in feed.items()})
    out: list[float | None] = []
    nodes = list(proto.graph.node)
    for j, node in enumerate(nodes):
        built = _one_node(proto, node, values, inits)
        t = None
        if built is not None:
            m, fd = built
            try:
                s = session(m, threads, provider)
                for _ in range(warmup):
                    s.run(None, fd)
                ts = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    s.run(None, fd)
                    ts.append(time.perf_counter() - t0)
                t = float(np.median(ts)) * 1e3
            except Exception:  # noqa: BLE001 - a node ORT will not run alone is not timed (its time counts as fixed)
                t = None
        out.append(t)
        if progress and (j + 1) % 25 == 0:
            progress(f"timing nodes: {j + 1}/{len(nodes)}")
    return out


__all__ = ["node_times"]

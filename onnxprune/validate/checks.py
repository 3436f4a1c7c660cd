"""Validation of a pruned model: ``onnx.checker`` with full_check and an ORT run
per batch size (:func:`validate`). The zero-contribution oracle is :mod:`.oracle`."""
from __future__ import annotations

import onnx

from onnxprune import io, runtime


def validate(model: str | onnx.ModelProto, batches=(1, 2), feed_model: onnx.ModelProto | None = None) -> dict:
    """onnx.checker with full_check (strict shape inference, type checks) and an
    ORT run per batch size; a path is checked from the file (weights are not
    loaded by the checker). Feeds follow ``feed_model``'s input shapes when given
    (the shapes the analysis used), else the model's own."""
    from onnxprune.io.protowire import read_skeleton

    out: dict = {}
    skel = read_skeleton(model) if isinstance(model, str) else model
    fixed = _checkable(skel)
    if fixed is not None and isinstance(model, str):
        fixed = _checkable(io.read_proto(model))
    onnx.checker.check_model(fixed if fixed is not None else model, full_check=True)
    io.STATS["shape_inference"] += 1
    out["checker"] = "ok"
    out["shape_inference"] = "ok"
    sess = runtime.session(model)
    feed = feed_model if feed_model is not None else skel
    dynamic = any(not d.HasField("dim_value") or d.dim_value <= 0 for i in feed.graph.input for d in i.type.tensor_type.shape.dim)
    for b in batches if dynamic else batches[:1]:
        sess.run(None, runtime.random_inputs(feed, batch=b))
    out["ort_batches"] = list(batches if dynamic else batches[:1])
    return out


def run_failure(model, feed_model: onnx.ModelProto) -> str | None:
    """Why onnxruntime cannot run ``model`` on a random input shaped like
    ``feed_model``'s (one line), or None when it runs."""
    try:
        runtime.session(model).run(None, runtime.random_inputs(feed_model, batch=1))
        return None
    except Exception as e:  # noqa: BLE001 - any refusal is the answer
        return _one_line(e)


def _one_line(e: Exception) -> str:
    """onnxruntime's refusal as one line of at most 300 characters."""
    return " ".join(str(e).split())[:300] or type(e).__name__


def run_error(path: str, input_shapes: dict | None = None) -> str | None:
    """Why onnxruntime cannot run the file at ``path`` on a random input (one line),
    or None when it runs or when its inputs' dims are not all known (``input_shapes``
    as :func:`io.parse_input_shapes` returns; a symbolic batch becomes 1)."""
    from onnxprune.io.protowire import read_skeleton

    feed = read_skeleton(path)  # refuses external data outside the model's folder first
    for i in io.data_inputs(feed):
        given = (input_shapes or {}).get(i.name)
        dims = i.type.tensor_type.shape.dim
        for k, d in enumerate(dims):
            v = given[k] if given and k < len(given) else d.dim_value if d.HasField("dim_value") else 0
            if not isinstance(v, int) or v <= 0:
                if k:
                    return None
                v = 1
            d.dim_value = v
    try:
        runtime.session(path).run(None, runtime.random_inputs(feed, batch=1))
    except Exception as e:
        return _one_line(e)
    return None


def feed_text(feed_model: onnx.ModelProto) -> str:
    shapes = [f"{i.name}:" + ",".join(str(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else "1"
                                      for d in i.type.tensor_type.shape.dim) for i in feed_model.graph.input]
    return " ".join(shapes)


def _checkable(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime registers a few contrib ops in the ONNX domain (its optimizer
    emits ``SimplifiedLayerNormalization`` there), which the checker rejects: check
    a copy with those nodes moved to com.microsoft (onnxruntime runs the real one).
    None when the model has no such node."""
    from onnxprune.io.ort_shapes import DEFAULT_DOMAIN_CONTRIB, MS

    if not any(n.op_type in DEFAULT_DOMAIN_CONTRIB and n.domain in ("", "ai.onnx") for n in proto.graph.node):
        return None
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    for n in p.graph.node:
        if n.op_type in DEFAULT_DOMAIN_CONTRIB and n.domain in ("", "ai.onnx"):
            n.domain = MS
    if not any(o.domain == MS for o in p.opset_import):
        p.opset_import.append(onnx.helper.make_opsetid(MS, 1))
    return p

"""Load, normalise, infer shapes and save ONNX models (onnx-ir is the core IR)."""
from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import onnx_ir as ir

from .errors import UserError

log = logging.getLogger(__name__)


def read_proto(path: str) -> onnx.ModelProto:
    if not os.path.exists(path):
        raise UserError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"model path is a directory: {path}")
    try:
        proto = onnx.load(path)
    except Exception as e:  # protobuf raises many types
        raise UserError(f"not an ONNX model: {path} ({type(e).__name__})") from None
    if not proto.graph.node:
        raise UserError(f"not an ONNX model (no graph nodes): {path}")
    return proto


def infer(proto: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    del proto.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(proto, strict_mode=strict, data_prop=True)


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    model = ir.serde.deserialize_model(infer(proto))
    normalize(model)
    return model


def load(path: str) -> ir.Model:
    """Read a model, infer shapes and normalise it for analysis."""
    return to_ir(read_proto(path))


def normalize(model: ir.Model) -> None:
    """Turn ``Constant`` nodes into initializers and drop ``Identity`` nodes that
    only re-name an initializer (the legacy exporter's deduplication), so every
    constant a rule sees is an initializer with ``const_value``."""
    g = model.graph
    for node in list(g):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.outputs[0].is_graph_output():
            a = next(iter(node.attributes.values()))
            val = _constant_value(a)
            if val is None:
                continue
            out = node.outputs[0]
            tensor = ir.Tensor(val, name=out.name)
            new = ir.Value(name=out.name, shape=ir.Shape(val.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
            out.replace_all_uses_with(new)
            g.remove(node, safe=True)
            g.register_initializer(new)
    for node in list(g):
        if node.op_type == "Identity" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            out = node.outputs[0]
            if out.is_graph_output():
                continue
            out.replace_all_uses_with(node.inputs[0])
            g.remove(node, safe=True)


def _constant_value(attr) -> np.ndarray | None:
    name, v = attr.name, attr.value
    if name == "value":
        return v.numpy()
    if name == "value_float":
        return np.array(v, dtype=np.float32)
    if name == "value_floats":
        return np.array(list(v), dtype=np.float32)
    if name == "value_int":
        return np.array(v, dtype=np.int64)
    if name == "value_ints":
        return np.array(list(v), dtype=np.int64)
    return None


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def save(proto: onnx.ModelProto, path: str) -> None:
    size = proto.ByteSize() if proto.ByteSize() < 2**31 - 1 else 2**31
    if size >= 2**31 - 1:
        onnx.save(proto, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
    else:
        onnx.save(proto, path)


def random_inputs(proto: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every graph input; symbolic dims become ``batch``."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in proto.graph.initializer}
    feeds = {}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def session(proto_or_path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    data = proto_or_path if isinstance(proto_or_path, str) else proto_or_path.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])

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


PROBES = (7, 11)


def probe_batch_dims(proto: onnx.ModelProto) -> dict[str, list]:
    """For a model with one symbolic input dim (the batch), infer shapes with it
    set to 7 and to 11: a dim that comes out as 7k and 11k is ``k * batch``.
    Returns ``{value name: [(k, ("batch",)) | (n, ()) | None, ...]}``."""
    syms = {d.dim_param for i in proto.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param or not d.HasField("dim_value")}
    if len(syms) != 1:
        return {}
    probes = []
    for n in PROBES:
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        for i in p.graph.input:
            for d in i.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.dim_value = n
        try:
            p = infer(p)
        except Exception:
            return {}
        probes.append({vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                       for vi in list(p.graph.value_info) + list(p.graph.output)})
    out: dict[str, list] = {}
    (a, b), (pa, pb) = probes, PROBES
    for name, da in a.items():
        db = b.get(name)
        if db is None or len(db) != len(da):
            continue
        toks = []
        for x, y in zip(da, db):
            if x is None or y is None:
                toks.append(None)
            elif x == y:
                toks.append((x, ()))
            elif x % pa == 0 and y % pb == 0 and x // pa == y // pb:
                toks.append((x // pa, ("batch",)))
            else:
                toks.append(None)
        out[name] = toks
    return out


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    model = ir.serde.deserialize_model(infer(proto))
    for _ in range(12):  # folding can make shapes static, which lets more fold
        if not normalize(model):
            break
        model = ir.serde.deserialize_model(infer(ir.serde.serialize_model(model)))
    model.graph.meta["dim_tokens"] = probe_batch_dims(ir.serde.serialize_model(model))
    return model


def load(path: str) -> ir.Model:
    """Read a model, infer shapes and normalise it for analysis."""
    return to_ir(read_proto(path))


FOLDABLE = set(
    "Cast Sqrt Div Mul Add Sub Reciprocal Pow Neg Abs Floor Ceil Unsqueeze Squeeze Concat Gather Slice "
    "Reshape Equal Where Range Max Min Mod ReduceProd Identity Expand ConstantOfShape Transpose Less Greater Not And Or".split()
)
FOLD_MAX = 64  # elements: only shape-sized values are folded, never weights


def _const_value(out: ir.Value, arr: np.ndarray) -> ir.Value:
    tensor = ir.Tensor(np.asarray(arr), name=out.name)
    return ir.Value(name=out.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def fold_static_shapes(model: ir.Model) -> int:
    """Evaluate shape arithmetic whose inputs are known: ``Shape`` elements of
    static dims and small ops on constants. The legacy exporter's run-time
    attention scale (Shape -> Slice -> Cast -> Sqrt -> Div) becomes the original
    constant, and Reshape targets built from shapes become constants that the
    analysis can rewrite."""
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    folded = 0
    for node in list(g):
        if node.graph is None or node.domain not in ("", "ai.onnx") or any(o.is_graph_output() for o in node.outputs):
            continue
        val = None
        if node.op_type == "Shape":
            dims = node.inputs[0].shape
            if dims is None:
                continue
            start = node.attributes.get("start")
            end = node.attributes.get("end")
            sel = list(dims.dims)[slice(start.value if start else 0, end.value if end else None)]
            if sel and all(isinstance(d, int) for d in sel):
                val = [np.array(sel, dtype=np.int64)]
            elif node.outputs[0].uses():
                _fold_shape_selects(g, node, sel)
                continue
        elif node.op_type in FOLDABLE and all(v is None or v.const_value is not None for v in node.inputs):
            ins = [v.const_value.numpy() if v is not None else None for v in node.inputs]
            if not ins or any(a is not None and a.size > FOLD_MAX for a in ins):
                continue
            try:
                proto = ir.serde.serialize_node(node)
                names = [i for i in proto.input]
                val = ReferenceEvaluator(proto).run(None, {n: a for n, a in zip(names, ins) if n})
            except Exception:  # leave anything the reference evaluator cannot do
                continue
            if any(np.asarray(v).size > FOLD_MAX for v in val):
                continue
        if val is None:
            continue
        _replace_with_constants(g, node, val)
        folded += 1
    for node in list(g):  # Shape nodes whose every reader was folded
        if node.op_type == "Shape" and not node.outputs[0].uses() and not node.outputs[0].is_graph_output():
            g.remove(node, safe=True)
    return folded


def _replace_with_constants(g: ir.Graph, node: ir.Node, vals) -> None:
    for out, arr in zip(node.outputs, vals):
        new = _const_value(out, np.asarray(arr))
        out.replace_all_uses_with(new)
        g.register_initializer(new)
    g.remove(node, safe=True)


def _fold_shape_selects(g: ir.Graph, shape_node: ir.Node, dims) -> None:
    """``Gather``/``Slice`` picking only static elements out of a partly dynamic Shape."""
    for use in list(shape_node.outputs[0].uses()):
        user = use.node
        if use.idx != 0 or user.outputs[0].is_graph_output():
            continue
        picked = None
        if user.op_type == "Gather" and user.inputs[1].const_value is not None:
            idx = user.inputs[1].const_value.numpy()
            flat = [dims[int(i)] for i in idx.reshape(-1)]
            if all(isinstance(d, int) for d in flat):
                picked = np.array(flat, dtype=np.int64).reshape(idx.shape)
        elif user.op_type == "Slice" and len(user.inputs) in (3, 4, 5) and all(v is None or v.const_value is not None for v in user.inputs[1:]):
            st, en = (int(user.inputs[i].const_value.numpy().reshape(-1)[0]) for i in (1, 2))
            steps = user.inputs[4].const_value.numpy().reshape(-1)[0] if len(user.inputs) > 4 and user.inputs[4] is not None else 1
            flat = list(dims)[slice(st, min(en, len(dims) + 1), int(steps))]
            if flat and all(isinstance(d, int) for d in flat):
                picked = np.array(flat, dtype=np.int64)
        if picked is not None:
            _replace_with_constants(g, user, [picked])


def normalize(model: ir.Model) -> int:
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
    pin_attention_scale(model)
    return fold_static_shapes(model)


def pin_attention_scale(model: ir.Model) -> None:
    """Give every ``Attention`` without a ``scale`` its default 1/sqrt(head dim)
    explicitly, so that removing head dims keeps the trained scale."""
    for node in model.graph:
        if node.op_type != "Attention" or "scale" in node.attributes:
            continue
        q = node.inputs[0]
        dims = list(q.shape.dims) if q.shape is not None else []
        d = dims[-1] if dims else None
        if len(dims) == 3 and isinstance(d, int):
            nh = node.attributes.get("q_num_heads")
            d = d // nh.value if nh is not None and nh.value else None
        if isinstance(d, int) and d > 0:
            node.attributes["scale"] = ir.AttrFloat32("scale", float(1.0 / np.sqrt(d)))


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

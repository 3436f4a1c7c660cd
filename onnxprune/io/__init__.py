"""Load, normalise, infer shapes and save ONNX models (onnx-ir is the core IR)."""
from __future__ import annotations

import logging
import os
import zipfile

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.errors import UserError

log = logging.getLogger(__name__)


def read_proto(path: str) -> onnx.ModelProto:
    """The whole model in memory (weights included), checked as :func:`read_model` checks it."""
    from onnx.external_data_helper import load_external_data_for_model

    from onnxprune.io.protowire import check_external

    if not os.path.exists(path):
        raise UserError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"model path is a directory: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf raises many types
        raise UserError(f"not an ONNX model: {path} ({type(e).__name__})") from None
    if not proto.graph.node:
        raise UserError(f"not an ONNX model (no graph nodes): {path}")
    check_external(proto, path)
    check_graph(proto)
    load_external_data_for_model(proto, os.path.dirname(os.path.abspath(path)))
    return proto


def read_array(path: str):
    """A .npy array or .npz archive of arrays (no pickled objects), with one-line errors."""
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            data = {k: data[k] for k in data.files}  # read now: a damaged member fails here, not later
        return data
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        kind = "an .npz archive" if path.endswith(".npz") else "a .npy array"
        why = "it holds pickled Python objects, which are never loaded" if "pickle" in str(e) else str(e).splitlines()[0][:80]
        raise UserError(f"{path}: not {kind} of numbers ({why})") from None


PROBES = (7, 11)


def probe_batch_dims(proto: onnx.ModelProto) -> dict[str, list]:
    """For a model with one symbolic input dim (the batch), infer shapes with it
    set to 7 and to 11: a dim that comes out as 7k and 11k is ``k * batch``.
    ``proto`` is a skeleton (weights external), so each probe is cheap.
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


# -- reading, skeletons and shape inference ---------------------------------------------
#
# Weights never travel through shape inference: every inference runs on a
# *skeleton* (large tensors as data-less external references), and its result
# is copied onto the IR values by name. Counters record how often it ran.

STATS = {"shape_inference": 0}


def read_model(path: str) -> ir.Model:
    """Read ``path`` into onnx-ir with every large tensor memory-mapped (embedded
    weights are mapped in place, see :mod:`onnxprune.protowire`)."""
    from onnx_ir import external_data

    from onnxprune.io.protowire import read_skeleton

    if not os.path.exists(path):
        raise UserError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"model path is a directory: {path}")
    try:
        proto = read_skeleton(path)
    except UserError:
        raise
    except Exception as e:  # protobuf and the wire walker raise many types
        raise UserError(f"not an ONNX model: {path} ({type(e).__name__})") from None
    if not proto.graph.node:
        raise UserError(f"not an ONNX model (no graph nodes): {path}")
    check_graph(proto)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise UserError(f"not an ONNX model: {path} ({type(e).__name__}: {_one_line(e)})") from None
    base = os.path.dirname(os.path.abspath(path))
    external_data.set_base_dir(model.graph, base)
    _share_maps(model, os.path.basename(path))
    return model


# -- what a file must be before anything else reads it -------------------------------------

# elements per entry of the typed data fields, by field; the dtypes each field holds
_TYPED = {
    "float_data": {1: 1, 14: 2}, "double_data": {11: 1, 15: 2}, "int64_data": {7: 1}, "uint64_data": {12: 1, 13: 1},
    "string_data": {8: 1}, "int32_data": {t: 1 for t in (2, 3, 4, 5, 6, 9, 10, 16, 17, 18, 19, 20)} | {21: 2, 22: 2, 23: 2},
}


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def check_graph(proto: onnx.ModelProto) -> None:
    """Refuse, in one line, a model whose tensors or names cannot be right: data
    lengths that disagree with dims and dtype, a name defined twice, a declared
    type that contradicts an initializer, a cycle."""
    from onnxprune.io.protowire import all_tensors

    for t in all_tensors(proto):
        _check_tensor(t)
    g = proto.graph
    seen: dict[str, str] = {}
    for what, names in (("graph input", [i.name for i in g.input]), ("initializer", [t.name for t in g.initializer]),
                        ("node output", [o for n in g.node for o in n.output if o])):
        for name in names:
            if name in seen and not (what == "initializer" and seen[name] == "graph input"):
                raise UserError(f"the name {name!r} is defined twice (as {seen[name]} and as {what})")
            seen[name] = what
    inits = {t.name: t for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = inits.get(vi.name)
        tt = vi.type.tensor_type
        if t is None or not vi.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if (tt.elem_type and tt.elem_type != t.data_type) or (tt.HasField("shape") and (
                len(dims) != len(t.dims) or any(d is not None and d != e for d, e in zip(dims, t.dims)))):
            raise UserError(f"initializer {t.name!r} is {_type_text(t.data_type, list(t.dims))} but declared "
                            f"{_type_text(tt.elem_type, ['?' if d is None else d for d in dims])}")
    _check_acyclic(g)
    _check_nodes(proto, set(seen))


def _check_nodes(proto: onnx.ModelProto, defined: set[str]) -> None:
    """Every input of a top-level node is defined in the graph, and every standard
    node (without subgraphs) passes onnx's own node check (attributes, arity)."""
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = proto.ir_version
    ctx.opset_imports = {o.domain: o.version for o in proto.opset_import}
    g = proto.graph
    types = {i.name: i.type.tensor_type.elem_type for i in g.input if i.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        what = f"node {n.name or n.op_type!r} ({n.op_type})"
        missing = [x for x in n.input if x and x not in defined]
        if missing:
            raise UserError(f"{what} reads {missing[0]!r}, which the graph does not define")
        if n.domain not in ("", "ai.onnx") or not onnx.defs.has(n.op_type) or any(a.g.node or a.graphs for a in n.attribute):
            continue
        try:
            onnx.checker.check_node(n, ctx)
        except onnx.checker.ValidationError as e:
            raise UserError(f"{what}: {str(e).splitlines()[0].split('==>')[0].strip()}") from None
        _check_input_types(n, what, types, ctx.opset_imports.get("", ctx.opset_imports.get("ai.onnx", 1)))


def _check_input_types(node: onnx.NodeProto, what: str, types: dict, opset: int) -> None:
    """The dtypes of a node's inputs whose type the file states (graph inputs,
    initializers) against the op's type constraints."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
    except Exception:
        return
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    bound: dict[str, str] = {}
    for i, x in enumerate(node.input):
        if not x or not types.get(x) or not schema.inputs:
            continue
        param = schema.inputs[min(i, len(schema.inputs) - 1)].type_str
        got = f"tensor({onnx.helper.tensor_dtype_to_string(types[x]).split('.')[-1].lower()})"
        if got not in allowed.get(param, {param}) or bound.setdefault(param, got) != got:
            raise UserError(f"{what}: input {x!r} is {got}, which the op does not take there")


def _type_text(dtype: int, dims: list) -> str:
    name = onnx.TensorProto.DataType.Name(dtype) if dtype in onnx.TensorProto.DataType.values() else str(dtype)
    return f"{name}[{','.join(map(str, dims))}]"


def _check_tensor(t: onnx.TensorProto) -> None:
    what = f"tensor {t.name!r}"
    if any(d < 0 for d in t.dims):
        raise UserError(f"{what} has a negative dim: {list(t.dims)}")
    try:
        bits = ir.DataType(t.data_type).bitwidth if t.data_type != onnx.TensorProto.STRING else None
    except Exception:
        bits = None
    if t.data_type == onnx.TensorProto.UNDEFINED or (bits is None and t.data_type != onnx.TensorProto.STRING):
        raise UserError(f"{what} has an unknown data type ({t.data_type})")
    n = int(np.prod(t.dims, dtype=object)) if t.dims else 1
    text = _type_text(t.data_type, list(t.dims))
    if t.data_location == onnx.TensorProto.EXTERNAL or t.HasField("raw_data"):
        info = {e.key: e.value for e in t.external_data}
        have = len(t.raw_data) if t.HasField("raw_data") else int(info["length"]) if "length" in info else None
        need = (n * bits + 7) // 8 if bits else None
        if need is not None and have is not None and have != need:
            raise UserError(f"{what}: {text} needs {need} bytes, its data has {have}")
        return
    for field, per in _TYPED.items():
        count = len(getattr(t, field))
        k = per.get(t.data_type)
        if count and k is None:
            raise UserError(f"{what}: {text} cannot keep its data in {field}")
        if k is not None:
            need = 2 * n if k == 2 and t.data_type in (14, 15) else -(-n // 2) if k == 2 else n
            if count != need:
                raise UserError(f"{what}: {text} has {need} elements, its data has {count}")


def _check_acyclic(g: onnx.GraphProto) -> None:
    """Kahn's algorithm over the top-level nodes; any node left is on a cycle."""
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    deps = [{producer[x] for x in n.input if x in producer} for n in g.node]
    users: dict[int, list[int]] = {}
    for i, ds in enumerate(deps):
        for d in ds:
            users.setdefault(d, []).append(i)
    left = [len(ds) for ds in deps]
    ready = [i for i, k in enumerate(left) if k == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for u in users.get(i, ()):
            left[u] -= 1
            if left[u] == 0:
                ready.append(u)
    if done < len(g.node):
        n = g.node[next(i for i, k in enumerate(left) if k)]
        raise UserError(f"the graph has a cycle (through node {n.name or n.op_type!r}); an ONNX graph must be acyclic")


def _share_maps(model: ir.Model, own_name: str) -> None:
    """Back every memory-mapped tensor by one read-only map per file (onnx-ir
    maps the whole file once per tensor, which makes touched pages count many
    times). Records the maps (for :func:`release`) and whether the weights live
    in a separate file (``external_input``)."""
    import mmap

    maps: dict[str, mmap.mmap] = {}
    external = False
    for v in model.graph.initializers.values():
        t = v.const_value
        if not isinstance(t, ir.ExternalTensor) or t.dtype.bitwidth < 8 or not t.size:
            continue
        external = external or os.path.basename(str(t.location)) != own_name
        path = t.path
        mm = maps.get(path)
        if mm is None:
            try:
                with open(path, "rb") as f:
                    mm = maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise UserError(f"external data of {v.name} cannot be read: {path} ({e.strerror})") from None
        if (t.offset or 0) + t.nbytes > len(mm):
            raise UserError(f"external data of {v.name} lies beyond the end of {path}")
        arr = np.frombuffer(mm, dtype=t.dtype.numpy(), count=t.size, offset=t.offset or 0).reshape(t.shape.numpy())
        v.const_value = ir.Tensor(arr, name=v.name)
    model.graph.meta["maps"] = list(maps.values())
    model.graph.meta["external_input"] = external


def _big(t) -> bool:
    from onnxprune.io.protowire import BIG

    return t is not None and not isinstance(t, ir.StringTensor) and t.nbytes > BIG


def _serialized(model: ir.Model, swap) -> onnx.ModelProto:
    """Serialise ``model`` with initializer tensors temporarily replaced by
    ``swap(value, tensor)`` (None: keep the tensor); the model is left as it was."""
    saved = {}
    for v in model.graph.initializers.values():
        new = swap(v, v.const_value)
        if new is not None:
            saved[v] = v.const_value
            v.const_value = new
    try:
        return ir.serde.serialize_model(model)
    finally:
        for v, t in saved.items():
            v.const_value = t


def _placeholder(v: ir.Value, t) -> ir.ExternalTensor:
    from onnxprune.io.protowire import PLACEHOLDER

    return ir.ExternalTensor(PLACEHOLDER, 0, t.nbytes, t.dtype, shape=t.shape, name=v.name)


def skeleton(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto whose large tensors are data-less external
    references (for shape inference, the checker, and cost counting)."""
    return _serialized(model, lambda v, t: _placeholder(v, t) if _big(t) and not isinstance(t, ir.ExternalTensor) else None)


def full_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a self-contained proto with every tensor's bytes (for an ORT
    session in memory or the torch import): one copy of the weights."""
    return _serialized(model, lambda v, t: ir.Tensor(t.numpy(), name=v.name) if isinstance(t, ir.ExternalTensor) else None)


def infer_into(model: ir.Model) -> onnx.ModelProto:
    """Shape inference (with data propagation) on a skeleton; the inferred types
    and shapes replace those of every intermediate value. Returns the inferred
    skeleton."""
    skel = skeleton(model)
    for o in skel.graph.output:  # inferred afresh; the declared shape is merged back below
        o.type.tensor_type.ClearField("shape")
    inferred = infer(skel)
    g = model.graph
    found = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for node in g:
        for o in node.outputs:
            vi = found.get(o.name)
            if vi is not None:
                declared = o.shape if o.is_graph_output() else None
                ir.serde.deserialize_value_info_proto(vi, o)
                if declared is not None:
                    o.shape = _kept_output_shape(declared, o.shape)
            elif not o.is_graph_output():
                o.shape = None
    return inferred


def _kept_output_shape(declared: ir.Shape, inferred: ir.Shape | None) -> ir.Shape | None:
    """A graph output's shape after inference: its declared names and sizes where
    they agree with the inferred ones (the file's interface), the inferred dim
    where the declared one is stale (-1, 0, unknown, or another size)."""
    if inferred is None:
        return ir.Shape([d if not isinstance(d, int) or d > 0 else ir.SymbolicDim(None) for d in declared.dims])
    if len(inferred) != len(declared):
        return inferred
    out = []
    for d, i in zip(declared.dims, inferred.dims):
        named = not isinstance(d, int) and getattr(d, "value", None)
        out.append(d if (isinstance(d, int) and d > 0 and d == i) or (named and not isinstance(i, int)) else i)
    return ir.Shape(out)


def infer(proto: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    """ONNX shape inference with data propagation; graphs with onnxruntime's fused
    ops get their outputs' shapes from :mod:`onnxprune.ort_shapes` (a few rounds)."""
    from onnxprune.io.ort_shapes import infer_contrib

    STATS["shape_inference"] += 1
    del proto.graph.value_info[:]
    return infer_contrib(proto, lambda p: onnx.shape_inference.infer_shapes(p, strict_mode=strict, data_prop=True))


def to_ir(proto: onnx.ModelProto, input_shapes: dict | None = None) -> ir.Model:
    """An in-memory proto (copied) as a normalised IR model."""
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    m = ir.serde.deserialize_model(p)
    set_input_shapes(m, input_shapes or {})
    return normalised(m)


def normalised(model: ir.Model) -> ir.Model:
    """Normalise and fold until nothing changes, inferring shapes after each round;
    then probe symbolic batch dims. Works in place; returns ``model``."""
    inferred = infer_into(model)
    for _ in range(12):  # folding can make shapes static, which lets more fold
        if not normalize(model):
            break
        inferred = infer_into(model)
    fill_unknown_dims(model)
    model.graph.meta["dim_tokens"] = probe_batch_dims(inferred)
    return model


BUILT_SHAPES = {"Expand", "Where", "Tile", "ConstantOfShape", "Range"}


def _unknown(d) -> bool:
    return not isinstance(d, int) and (d.value is None or str(d.value).startswith("unk__"))


def fill_unknown_dims(model: ir.Model) -> int:
    """Dims that ONNX shape inference left unknown, taken from onnxruntime's
    symbolic shape inference where it proves them: it propagates the *values*
    of shape tensors through Where/Equal/Expand/Range (the attention masks of
    today's ``transformers`` exports), which ONNX's data propagation does not.
    Only sizes and the inputs' own dim names are taken. Returns how many dims
    were filled (0 when nothing was unknown or the inference failed)."""
    todo = [v for node in model.graph for v in node.outputs
            if v.shape is not None and any(_unknown(d) for d in v.shape.dims)]
    # only where shapes are built from run-time values (masks, tiled or expanded
    # tensors); elsewhere ONNX's inference is as good and the import costs seconds
    if not any(v.producer().op_type in BUILT_SHAPES for v in todo):
        return 0
    names = {str(d.value) for i in model.graph.inputs if i.shape is not None
             for d in i.shape.dims if not isinstance(d, int) and d.value}
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        out = SymbolicShapeInference.infer_shapes(skeleton(model), auto_merge=True)
    except Exception:  # an op it does not know, a skeleton it cannot read: keep ONNX's shapes
        return 0
    if out is None:
        return 0
    found = {vi.name: vi.type.tensor_type.shape for vi in list(out.graph.value_info) + list(out.graph.output)}
    filled = 0
    for v in todo:
        sh = found.get(v.name)
        if sh is None or len(sh.dim) != len(v.shape):
            continue
        dims = list(v.shape.dims)
        for k, (ours, theirs) in enumerate(zip(dims, sh.dim)):
            if not _unknown(ours):
                continue
            if theirs.HasField("dim_value") and theirs.dim_value > 0:
                dims[k] = theirs.dim_value
            elif theirs.dim_param in names:
                dims[k] = ir.SymbolicDim(theirs.dim_param)
            else:
                continue
            filled += 1
        v.shape = ir.Shape(dims)
    return filled


def load(path: str, input_shapes: dict | None = None) -> ir.Model:
    """Read a model (weights memory-mapped), fix its input shapes, infer shapes and
    normalise it for analysis."""
    m = read_model(path)
    set_input_shapes(m, input_shapes or {})
    return normalised(m)


FOLDABLE = set(
    "Cast Sqrt Div Mul Add Sub Reciprocal Pow Neg Abs Floor Ceil Unsqueeze Squeeze Concat Gather Slice "
    "Reshape Equal Where Range Max Min Mod ReduceProd Identity Expand ConstantOfShape Transpose Less Greater Not And Or".split()
)
FOLD_MAX = 64  # elements: only shape-sized values are folded, never weights


# weights stored computed (older converters): a layout op or ConstantOfShape on
# constants, read only as a layer's weight or bias, is folded whatever its size
# (never a Cast: that would change the file's stored precision)
WEIGHT_FOLDABLE = {"ConstantOfShape", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}
WEIGHT_READERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Add"}


def _feeds_weights(node: ir.Node) -> bool:
    uses = list(node.outputs[0].uses()) if len(node.outputs) == 1 else []
    return node.op_type in WEIGHT_FOLDABLE and bool(uses) and all(u.node.op_type in WEIGHT_READERS for u in uses)


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
            weight = _feeds_weights(node)
            if not ins or (not weight and any(a is not None and a.size > FOLD_MAX for a in ins)):
                continue
            try:
                proto = ir.serde.serialize_node(node)
                names = [i for i in proto.input]
                val = ReferenceEvaluator(proto).run(None, {n: a for n, a in zip(names, ins) if n})
            except Exception:  # leave anything the reference evaluator cannot do
                continue
            if not weight and any(np.asarray(v).size > FOLD_MAX for v in val):
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
    """:func:`weights_as_initializers`, the attention scale pinned, static shapes folded."""
    weights_as_initializers(model)
    pin_attention_scale(model)
    return fold_static_shapes(model)


def weights_as_initializers(model: ir.Model, constants: bool = True) -> None:
    """Turn ``Constant`` nodes into initializers (unless ``constants`` is false)
    and drop ``Identity`` nodes that only re-name an initializer (the legacy
    exporter's deduplication), so every constant a rule sees is an initializer
    with ``const_value``."""
    g = model.graph
    for node in list(g) if constants else ():
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


def pin_attention_scale(model: ir.Model) -> None:
    """Give every attention op without a ``scale`` its default 1/sqrt(head dim)
    explicitly, so that removing head dims keeps the trained scale: ONNX
    ``Attention`` and onnxruntime's ``Attention`` / ``MultiHeadAttention`` /
    ``GroupQueryAttention`` (where a scale of 0 also means the default).
    onnxruntime's packed ``Attention`` also gets its ``qkv_hidden_sizes``
    written out, so the v head dim can be pruned apart from q/k."""
    for node in model.graph:
        if node.domain == "com.microsoft":
            _pin_ms_attention(node)
            continue
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


def _pin_ms_attention(node: ir.Node) -> None:
    op = node.op_type
    if op not in ("Attention", "MultiHeadAttention", "GroupQueryAttention"):
        return
    nh = node.attributes.get("num_heads")
    nh = nh.value if nh is not None else 0
    hidden = None
    if op == "Attention":
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if w is None or w.const_value is None or len(w.const_value.shape) != 2:
            return
        sizes = node.attributes.get("qkv_hidden_sizes")
        if sizes is None and w.const_value.shape[1] % 3 == 0:
            sizes = ir.AttrInt64s("qkv_hidden_sizes", [w.const_value.shape[1] // 3] * 3)
            node.attributes["qkv_hidden_sizes"] = sizes
        hidden = list(sizes.value)[0] if sizes is not None else None
    else:
        q = node.inputs[0]
        dims = list(q.shape.dims) if q is not None and q.shape is not None else []
        if len(dims) == 3 and isinstance(dims[2], int):
            hidden = dims[2]
            has_kv = len(node.inputs) > 1 and node.inputs[1] is not None
            if op == "GroupQueryAttention" and not has_kv:  # packed q, k, v
                kv = node.attributes.get("kv_num_heads")
                hidden = hidden * nh // (nh + 2 * kv.value) if kv is not None else None
            if op == "MultiHeadAttention" and not has_kv:
                hidden = None  # packed layouts: frozen by the rule
    scale = node.attributes.get("scale")
    if scale is not None and scale.value != 0.0:
        return
    if hidden and nh and hidden % nh == 0:
        node.attributes["scale"] = ir.AttrFloat32("scale", float(1.0 / np.sqrt(hidden // nh)))


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
    """A self-contained proto (weights included); see :func:`full_proto`."""
    return full_proto(model)


def save(proto: onnx.ModelProto, path: str) -> None:
    """Save an in-memory proto (external data above protobuf's 2 GB limit)."""
    size = proto.ByteSize() if proto.ByteSize() < 2**31 - 1 else 2**31
    if size >= 2**31 - 1:
        onnx.save(proto, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
    else:
        onnx.save(proto, path)


def release(model: ir.Model) -> None:
    """Drop the pages of the memory-mapped weights from this process (they are
    read again from the page cache when touched): weights that were read once
    stop counting against memory."""
    _drop(model.graph.meta.get("maps") or [])


def save_model(model: ir.Model, path: str, external: bool | None = None, data_name: str | None = None) -> str | None:
    """Stream ``model`` to ``path`` one tensor at a time (embedded, or external
    data in ``data_name`` when ``external`` or above 2 GB). Returns the data
    file's name when one was written."""
    from onnxprune.io.protowire import write_model

    maps = model.graph.meta.get("maps") or []
    tensors, written = {}, [0]

    def swap(v, t):
        if not _big(t):
            return None
        tensors[v.name] = (t.nbytes, _producer(t, maps, written))
        return _placeholder(v, t)

    proto = _serialized(model, swap)
    out = write_model(proto, tensors, path, external=external, data_name=data_name)
    _drop(maps)
    return out


def _producer(t, maps, count: list):
    def produce() -> bytes:
        data = t.tobytes()
        count[0] += len(data)
        if count[0] > 64 << 20:  # every 64 MB written: drop the source pages read so far
            count[0] = 0
            _drop(maps)
        return data

    return produce


def _drop(maps) -> None:
    """madvise(DONTNEED) on each read-only map: its touched pages leave this process."""
    import mmap

    for mm in maps:
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError, AttributeError):
            pass


# -- input shapes -------------------------------------------------------------------------

def parse_input_shapes(specs) -> dict[str, list]:
    """``["x:1,3,640,640", "ids:N,128"]`` or ``{"x": [1, 3, 640, 640]}`` -> ``{name: dims}``;
    a dim is a positive int or a name (kept symbolic, e.g. the batch)."""
    if not specs:
        return {}
    items = specs.items() if isinstance(specs, dict) else []
    if not isinstance(specs, dict):
        parsed = []
        for spec in specs:
            name, sep, dims = str(spec).rpartition(":")
            if not sep or not name or not dims:
                raise UserError(f"--input-shape {spec!r}: expected NAME:d1,d2,... (e.g. images:1,3,640,640)")
            parsed.append((name, dims.split(",")))
        items = parsed
    out = {}
    for name, dims in items:
        if not isinstance(dims, (list, tuple)) or not dims:
            raise UserError(f"input shape of {name!r} must be a list of dims")
        row = []
        for d in dims:
            d = d.strip() if isinstance(d, str) else d
            if isinstance(d, str) and d.lstrip("-").isdigit():
                d = int(d)
            if isinstance(d, bool) or not (isinstance(d, int) and d > 0 or isinstance(d, str) and d.isidentifier() or d == -1):
                raise UserError(f"input shape of {name!r}: dim {d!r} must be a positive integer or a name (symbolic)")
            row.append("batch" if d == -1 else d)
        out[str(name)] = row
    return out


def set_input_shapes(model: ir.Model, shapes: dict[str, list]) -> None:
    """Fix the graph inputs' dims (given ``shapes``); unknown dims stored as -1 or 0
    (Paddle2ONNX) become symbolic; a symbolic batch (axis 0) gets one name for all
    inputs. Refuses, naming the flag, when a dim other than the batch stays unknown."""
    g = model.graph
    inputs = {v.name: v for v in g.inputs if v.const_value is None}
    batch = _batch_name(inputs.values())
    unknown = set(shapes) - set(inputs)
    if unknown:
        raise UserError(f"--input-shape names no input of this model: {', '.join(sorted(unknown))} "
                        f"(inputs: {', '.join(inputs) or 'none'})")
    for name, v in inputs.items():
        dims = list(v.shape.dims) if v.shape is not None else None
        if name in shapes:
            want = shapes[name]
            if dims is not None and len(dims) != len(want):
                raise UserError(f"--input-shape {name}: {len(want)} dims given, the input has {len(dims)}")
            for i, (old, new) in enumerate(zip(dims or want, want)):
                if isinstance(old, int) and old > 0 and isinstance(new, int) and old != new:
                    raise UserError(f"--input-shape {name}: dim {i} is {old} in the model, {new} given")
            dims = want
        if dims is None:
            raise UserError(f"input '{name}' has no shape; give --input-shape {name}:d1,d2,...")
        fixed = []
        for i, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                fixed.append(d)
            elif i == 0:
                fixed.append(ir.SymbolicDim(batch))  # the batch: one symbol for every input
            elif isinstance(d, str) and name in shapes:
                fixed.append(ir.SymbolicDim(d))
            else:
                shown = ",".join(str(x) if isinstance(x, int) and x > 0 else ("N" if k == 0 else "?") for k, x in enumerate(dims))
                raise UserError(f"input '{name}' has a dynamic dim {i} ({_dim_text(d)}): give its shape with "
                                f"--input-shape {name}:{shown.replace('?', '<size>')}")
        v.shape = ir.Shape(fixed)


def _batch_name(inputs) -> str:
    """The batch dim's name: the first input's own (kept, so the pruned file's
    interface is unchanged), else ``batch``."""
    for v in inputs:
        dims = list(v.shape.dims) if v.shape is not None else []
        name = getattr(dims[0], "value", None) if dims and not isinstance(dims[0], int) else None
        if isinstance(name, str) and name and name != "?":
            return name
    return "batch"


def _dim_text(d) -> str:
    if isinstance(d, int):
        return str(d)
    return getattr(d, "value", None) or str(d) or "unknown"


def refuse_overwrite(output: str, *inputs: str | None) -> None:
    """onnxprune never overwrites its input: refuse an output path that is one of ``inputs``."""
    if os.path.abspath(output) in {os.path.abspath(p) for p in inputs if p}:
        raise UserError("output path equals an input path; onnxprune never overwrites its input")


# -- graph inputs ----------------------------------------------------------------------------

def data_inputs(proto: onnx.ModelProto) -> list:
    """The graph inputs a caller feeds (old exporters also list initializers as inputs)."""
    inits = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def input_names(proto: onnx.ModelProto) -> list[str]:
    return [i.name for i in data_inputs(proto)]


def input_dims(vi) -> list[int | None]:
    """Dims of a graph input; None where symbolic or unknown."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in vi.type.tensor_type.shape.dim]


def static_batch(proto: onnx.ModelProto) -> int | None:
    """The first data input's batch dim when it is fixed, else None."""
    ins = data_inputs(proto)
    dims = input_dims(ins[0]) if ins else []
    return dims[0] if dims else None

"""Reading: a model file, checked (external data inside its folder, malformed
tensors, cycles) and loaded; data arrays (.npy / .npz)."""
from __future__ import annotations

import os
import zipfile

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.errors import UserError
from onnxprune.io.inputs import set_input_shapes
from onnxprune.io.passes import normalised


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


def array_shapes(path: str) -> dict[str, tuple]:
    """The shape of each array in a .npy (key ``""``) or .npz file, read from
    the headers alone; ``{}`` when the file is not one (its reader says why)."""
    try:
        if path.endswith(".npy"):
            return {"": tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)}
        out = {}
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith(".npy"):
                    with z.open(name) as f:
                        version = np.lib.format.read_magic(f)
                        shape, _, _ = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0)(f)
                    out[name[:-4]] = tuple(shape)
        return out
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile):
        return {}


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

    if proto.ir_version < 3 and len(proto.opset_import):
        raise UserError(f"IR version {proto.ir_version} with opset imports is not a valid model (IR 3 and later "
                        "name their opsets): save it again with a current onnx")
    if proto.ir_version < 4:
        declared = {i.name for i in proto.graph.input}
        loose = [t.name for t in proto.graph.initializer if t.name not in declared]
        if loose:
            raise UserError(f"IR version {proto.ir_version} needs every initializer among the graph inputs; "
                            f"{loose[0]!r} is not: save it again with a current onnx")
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


def load(path: str, input_shapes: dict | None = None) -> ir.Model:
    """Read a model (weights memory-mapped), fix its input shapes, infer shapes and
    normalise it for analysis."""
    m = read_model(path)
    set_input_shapes(m, input_shapes or {})
    return normalised(m)

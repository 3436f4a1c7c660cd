"""Graph passes on a loaded model: shape inference, normalisation (constants as
initializers, the attention scale pinned, static shapes and computed weights
folded; the folding passes return how many values they changed), unknown dims
filled in, symbolic batch dims probed."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.io.inputs import set_input_shapes
from onnxprune.io.write import skeleton


PROBES = (7, 11)


def probe_batch_dims(proto: onnx.ModelProto) -> dict[str, list]:
    """For a model with one symbolic input dim (the batch), infer shapes with it
    set to 7 and to 11: a dim that comes out as 7k and 11k is ``k * batch``
    (the graph inputs too, so a shape read from the input names the same batch).
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
                       for vi in list(p.graph.input) + list(p.graph.value_info) + list(p.graph.output)})
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
    weights_not_inputs(model)
    inferred = _fold_rounds(model, infer_into(model), refill=False)
    if fill_unknown_dims(model):  # sizes it proved can fold more shape arithmetic (Paddle2ONNX's Reshape targets)
        inferred = _fold_rounds(model, inferred, refill=True)
    model.graph.meta["dim_tokens"] = probe_batch_dims(inferred)
    return model


def _fold_rounds(model: ir.Model, inferred: onnx.ModelProto, refill: bool) -> onnx.ModelProto:
    """Normalise and fold until nothing changes (folding can make shapes static,
    which lets more fold), inferring shapes after each round; with ``refill``,
    the sizes only onnxruntime's symbolic inference proves are taken again after
    each (ONNX's inference drops them). Returns the last inferred skeleton."""
    for _ in range(12):
        if not normalize(model):
            break
        inferred = infer_into(model)
        if refill:
            fill_unknown_dims(model)
    return inferred


BUILT_SHAPES = {"Expand", "Where", "Tile", "ConstantOfShape", "Range", "Reshape"}


def _unknown(d) -> bool:
    return not isinstance(d, int) and (d.value is None or str(d.value).startswith("unk__"))


def _symbolic_shape_inference():
    """onnxruntime's ``SymbolicShapeInference``, loaded from its file: importing
    it as ``onnxruntime.tools.symbolic_shape_infer`` runs that package's
    ``__init__``, which imports torch when torch is installed (4-5 s a run)."""
    import importlib.util
    import sys

    name = "onnxprune._ort_symbolic_shape_infer"
    if name not in sys.modules:
        import onnxruntime

        path = os.path.join(os.path.dirname(onnxruntime.__file__), "tools", "symbolic_shape_infer.py")
        if not os.path.exists(path):  # laid out otherwise: the package import
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            return SymbolicShapeInference
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name].SymbolicShapeInference


def _symbolic_shapes(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference of ``proto``, as far as it gets.
    Its ``infer_shapes`` saves ``sym_shape_infer_temp.onnx`` (and a weights
    file) into the working directory whenever some shape stays unknown, then
    raises; the same steps are run here without that, keeping what was
    inferred. A version laid out otherwise runs ``infer_shapes`` in a
    temporary directory."""
    S = _symbolic_shape_inference()
    if not all(hasattr(S, m) for m in ("_preprocess", "_infer_impl", "_update_output_from_vi")):
        here = os.getcwd()
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            try:
                return S.infer_shapes(proto, auto_merge=True)
            finally:
                os.chdir(here)
    sym = S(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
    sym._preprocess(proto)
    while sym.run_:
        sym._infer_impl()
    sym._update_output_from_vi()
    return sym.out_mp_


def _data_free(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with its data-less (external) initializers turned into graph
    inputs of the same type and shape: onnxruntime's symbolic inference reads
    an initializer's values wherever it can compute on them (a bias added to a
    shape-derived value), and a placeholder has none to read."""
    keep, moved = [], []
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            moved.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    if moved:
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        proto.graph.input.extend(moved)
    return proto


def fill_unknown_dims(model: ir.Model) -> int:
    """Dims that ONNX shape inference left unknown, taken from onnxruntime's
    symbolic shape inference where it proves them: it propagates the *values*
    of shape tensors through Where/Equal/Expand/Range (the attention masks of
    today's ``transformers`` exports), which ONNX's data propagation does not.
    Only sizes and the inputs' own dim names are taken. Returns how many dims
    were filled (0 when nothing was unknown or the inference failed)."""
    todo = [v for node in model.graph for v in node.outputs
            if v.shape is None or any(_unknown(d) for d in v.shape.dims)]
    # only where shapes are built from run-time values (masks, tiled or expanded
    # tensors); elsewhere ONNX's inference is as good and the import costs seconds
    if not any(v.producer().op_type in BUILT_SHAPES for v in todo):
        return 0
    names = {str(d.value) for i in model.graph.inputs if i.shape is not None
             for d in i.shape.dims if not isinstance(d, int) and d.value}
    try:
        out = _symbolic_shapes(_data_free(skeleton(model)))
    except Exception:  # an op it does not know, a skeleton it cannot read: keep ONNX's shapes
        return 0
    if out is None:
        return 0
    found = {vi.name: vi.type.tensor_type.shape for vi in list(out.graph.value_info) + list(out.graph.output)}
    filled = 0
    for v in todo:
        sh = found.get(v.name)
        if sh is None or (v.shape is not None and len(sh.dim) != len(v.shape)) or (
                v.shape is None and not any(d.HasField("dim_value") or d.dim_param for d in sh.dim)):
            continue
        dims = list(v.shape.dims) if v.shape is not None else [ir.SymbolicDim(None)] * len(sh.dim)
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
                folded += _fold_selects(g, node.outputs[0], sel, np.dtype(np.int64))
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


def _fold_selects(g: ir.Graph, value: ir.Value, dims, dtype) -> int:
    """``Gather``/``Slice`` picking only static elements out of ``value``, a
    partly dynamic shape ``dims`` (a Shape's output), also behind integer
    ``Cast``s of it (Paddle2ONNX casts shapes to int32 and back); ``dtype``:
    ``value``'s. Returns how many nodes were folded."""
    folded = 0
    for use in list(value.uses()):
        user = use.node
        if use.idx != 0 or user.outputs[0].is_graph_output():
            continue
        picked = None
        if user.op_type == "Cast":
            to = user.attributes.get("to")
            try:
                t = ir.DataType(to.value).numpy() if to is not None else None
            except Exception:
                t = None
            if t is not None and np.issubdtype(t, np.integer):
                folded += _fold_selects(g, user.outputs[0], dims, np.dtype(t))
            continue
        if user.op_type == "Gather" and user.inputs[1].const_value is not None:
            idx = user.inputs[1].const_value.numpy()
            flat = [dims[int(i)] for i in idx.reshape(-1)]
            if all(isinstance(d, int) for d in flat):
                picked = np.array(flat, dtype=dtype).reshape(idx.shape)
        elif user.op_type == "Slice" and len(user.inputs) in (3, 4, 5) and all(v is None or v.const_value is not None for v in user.inputs[1:]):
            st, en = (int(user.inputs[i].const_value.numpy().reshape(-1)[0]) for i in (1, 2))
            axes = user.inputs[3] if len(user.inputs) > 3 else None
            if axes is not None and int(axes.const_value.numpy().reshape(-1)[0]) not in (0, -1):
                continue  # a shape is 1-D: any other axis is not a valid Slice
            steps = user.inputs[4].const_value.numpy().reshape(-1)[0] if len(user.inputs) > 4 and user.inputs[4] is not None else 1
            flat = list(dims)[slice(st, min(en, len(dims) + 1), int(steps))]
            if flat and all(isinstance(d, int) for d in flat):
                picked = np.array(flat, dtype=dtype)
        if picked is not None:
            _replace_with_constants(g, user, [picked])
            folded += 1
    return folded


def normalize(model: ir.Model) -> int:
    """:func:`weights_as_initializers`, the attention scale pinned, equal Splits
    given their sizes, static shapes folded. Returns the number of folds: the one
    change that can make more shapes static (the other passes have nothing left
    to do on a second round)."""
    weights_as_initializers(model)
    pin_attention_scale(model)
    explicit_splits(model)
    return fold_static_shapes(model)


def explicit_splits(model: ir.Model) -> int:
    """Give every equal ``Split`` (no sizes: ``num_outputs`` from opset 18, or
    nothing before) its sizes as a constant input, where its outputs' extents
    on the split axis are static: a packed q/k/v split in three whose parts are
    pruned to different widths needs them (dynamo's MaxViT). Returns how many."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    if opset < 13:  # sizes were an attribute then: left as they are
        return 0
    changed = 0
    for node in model.graph:
        if node.op_type != "Split" or node.domain not in ("", "ai.onnx") or "split" in node.attributes:
            continue
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            continue
        x = node.inputs[0]
        axis = node.attributes.get("axis")
        rank = len(x.shape) if x is not None and x.shape is not None else None
        if rank is None:
            continue
        a = (axis.value if axis is not None else 0) % rank
        sizes = []
        for o in node.outputs:
            d = o.shape.dims[a] if o.shape is not None and len(o.shape) == rank else None
            sizes.append(d if isinstance(d, int) else None)
        if None in sizes:
            continue
        t = ir.Tensor(np.array(sizes, np.int64), name=f"{node.name or x.name}__split_sizes")
        v = ir.Value(name=t.name, shape=ir.Shape([len(sizes)]), type=ir.TensorType(ir.DataType.INT64), const_value=t)
        if v.name in model.graph.initializers:
            continue
        model.graph.register_initializer(v)
        if len(node.inputs) < 2:
            node.resize_inputs(2)
        node.replace_input_with(1, v)
        node.attributes.pop("num_outputs", None)
        changed += 1
    return changed


def weights_not_inputs(model: ir.Model) -> int:
    """Initializers that are graph inputs too (IR 3 wanted every initializer
    there; torch's ``keep_initializers_as_inputs``) stop being inputs: a weight
    a caller could override is not a constant a rule may read, and a pruned
    model would keep every original weight as an unused input beside its
    pruned copy. Such a model is then IR 4 at least (the version that let
    initializers be constants only). Returns how many inputs went."""
    g = model.graph
    inits = g.initializers
    keep = [v for v in g.inputs if inits.get(v.name) is not v]
    gone = len(g.inputs) - len(keep)
    if gone:
        g.inputs.clear()
        g.inputs.extend(keep)
    if model.ir_version is not None and model.ir_version < 4:
        model.ir_version = 4
    return gone


def weights_as_initializers(model: ir.Model, constants: bool = True) -> int:
    """Turn ``Constant`` nodes into initializers (unless ``constants`` is false)
    and drop ``Identity`` nodes that only re-name an initializer (the legacy
    exporter's deduplication), so every constant a rule sees is an initializer
    with ``const_value``. Returns the number of nodes it replaced."""
    g = model.graph
    changed = 0
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
            changed += 1
    for node in list(g):
        if node.op_type == "Identity" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            out = node.outputs[0]
            if out.is_graph_output():
                continue
            out.replace_all_uses_with(node.inputs[0])
            g.remove(node, safe=True)
            changed += 1
    return changed


def pin_attention_scale(model: ir.Model) -> int:
    """Give every attention op without a ``scale`` its default 1/sqrt(head dim)
    explicitly, so that removing head dims keeps the trained scale: ONNX
    ``Attention`` and onnxruntime's ``Attention`` / ``MultiHeadAttention`` /
    ``GroupQueryAttention`` (where a scale of 0 also means the default).
    onnxruntime's packed ``Attention`` also gets its ``qkv_hidden_sizes``
    written out, so the v head dim can be pruned apart from q/k. Returns the
    number of nodes it changed."""
    changed = 0
    for node in model.graph:
        if node.domain == "com.microsoft":
            changed += _pin_ms_attention(node)
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
            changed += 1
    return changed


def _pin_ms_attention(node: ir.Node) -> int:
    op = node.op_type
    if op not in ("Attention", "MultiHeadAttention", "GroupQueryAttention"):
        return 0
    changed = 0
    nh = node.attributes.get("num_heads")
    nh = nh.value if nh is not None else 0
    hidden = None
    if op == "Attention":
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if w is None or w.const_value is None or len(w.const_value.shape) != 2:
            return 0
        sizes = node.attributes.get("qkv_hidden_sizes")
        if sizes is None and w.const_value.shape[1] % 3 == 0:
            sizes = ir.AttrInt64s("qkv_hidden_sizes", [w.const_value.shape[1] // 3] * 3)
            node.attributes["qkv_hidden_sizes"] = sizes
            changed = 1
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
        return changed
    if hidden and nh and hidden % nh == 0:
        node.attributes["scale"] = ir.AttrFloat32("scale", float(1.0 / np.sqrt(hidden // nh)))
        return 1
    return changed


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

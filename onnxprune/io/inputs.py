"""Graph inputs: input shapes (``--input-shape``) parsed and set, data inputs,
their dims, the static batch."""
from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

from onnxprune.errors import UserError

log = logging.getLogger(__name__)


# -- input shapes -------------------------------------------------------------------------

class Hint(list):
    """Dims read from the calibration data, not given by the user: they fill an
    input's unknown dims (the batch stays symbolic) and are dropped where they
    contradict its known ones. Keyed by the input's name, or ``""`` for a model
    with one data input."""


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
        out[str(name)] = Hint(row) if isinstance(dims, Hint) else row
    return out


def set_input_shapes(model: ir.Model, shapes: dict[str, list]) -> None:
    """Fix the graph inputs' dims (given ``shapes``); unknown dims stored as -1 or 0
    (Paddle2ONNX) become symbolic; a symbolic batch (axis 0) gets one name for all
    inputs. Refuses, naming the flag, when a dim other than the batch stays unknown."""
    g = model.graph
    inputs = {v.name: v for v in g.inputs if v.const_value is None}
    batch = _batch_name(inputs.values())
    shapes = _with_hints(inputs, shapes)
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


def _with_hints(inputs: dict, shapes: dict) -> dict:
    """``shapes`` with each :class:`Hint` resolved: kept (as the input's dims,
    its known ones and the batch untouched) for an input the user gave no shape
    and that has unknown dims, where it agrees with the known ones; else dropped."""
    out = {k: v for k, v in shapes.items() if not isinstance(v, Hint)}
    for name, want in hints_by_input(list(inputs), shapes).items():
        v = inputs[name]
        if name in out or v.shape is None or len(v.shape) != len(want):
            continue
        dims = list(v.shape.dims)
        known = lambda d: isinstance(d, int) and d > 0  # noqa: E731
        if all(known(d) for d in dims[1:]) or any(known(d) and d != w for d, w in zip(dims[1:], want[1:])):
            continue
        fixed = [dims[0] if known(dims[0]) else _dim_text(dims[0])] + [d if known(d) else int(w) for d, w in zip(dims[1:], want[1:])]
        out[name] = fixed
        log.info("input '%s': dims %s taken from the calibration data (--input-shape chooses others)", name,
                 ",".join(str(d) for d in fixed))
    return out


def hints_by_input(names: list[str], shapes: dict) -> dict[str, Hint]:
    """The :class:`Hint` entries of ``shapes`` by the input they are for (the
    one keyed ``""`` is the only input's)."""
    hints = {k: v for k, v in shapes.items() if isinstance(v, Hint)}
    if "" in hints and len(names) == 1:
        hints.setdefault(names[0], hints[""])
    return {k: v for k, v in hints.items() if k in names}


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

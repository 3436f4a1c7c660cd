"""Writing: weight-less skeletons, full protos, streamed saving (external data
above 2 GB), and the rule that the input is never overwritten."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.errors import UserError


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


# numpy dtypes an ORT value can be made from without a copy (others stay inline in the proto)
_ORT_DTYPES = frozenset("float32 float64 float16 int8 uint8 int16 uint16 int32 uint32 int64 uint64 bool".split())


def session_parts(model: ir.Model, fed=frozenset()) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model for an ORT session without serialising its weights: a proto
    whose large tensors are data-less external references, and those tensors
    as arrays (``{name: array}``), handed to ORT by
    :func:`onnxprune.runtime.session` (``externals``) as they are. Serialising
    a ViT-S's 88 MB of weights for every candidate of the damage search cost
    as much as creating its session. ``fed``: initializers that become graph
    inputs instead (neither in the proto nor in the arrays; every run feeds them)."""
    arrays: dict[str, np.ndarray] = {}

    def swap(v: ir.Value, t):
        if t is not None and v.name in fed:
            return _placeholder(v, t)  # dropped below: no bytes serialised
        if t is None or isinstance(t, ir.StringTensor) or not (isinstance(t, ir.ExternalTensor) or _big(t)):
            return None
        a = t.numpy()
        if a.dtype.name not in _ORT_DTYPES:  # bfloat16, float8, 4-bit: inline, with their bytes
            return ir.Tensor(a, name=v.name) if isinstance(t, ir.ExternalTensor) else None
        arrays[v.name] = np.ascontiguousarray(a)
        return _placeholder(v, t)

    proto = _serialized(model, swap)
    if fed:
        _as_inputs(proto.graph, fed)
    return proto, arrays


def _as_inputs(graph: onnx.GraphProto, names) -> None:
    """Initializers ``names`` of ``graph`` become graph inputs of their type and shape."""
    kept = []
    for t in graph.initializer:
        if t.name in names:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            kept.append(t)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    infos = [vi for vi in graph.value_info if vi.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def tensor_proto(value: ir.Value) -> onnx.TensorProto:
    """An initializer's tensor as a self-contained proto named like the value
    (external or memory-mapped data read in, a lazy tensor computed)."""
    t = value.const_value
    if isinstance(t, ir.ExternalTensor):
        t = ir.Tensor(t.numpy(), name=value.name)
    tp = ir.serde.serialize_tensor(t)
    tp.name = value.name
    return tp


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


def refuse_overwrite(output: str, *inputs: str | None) -> None:
    """onnxprune never overwrites its input: refuse an output path that is one of ``inputs``."""
    if os.path.abspath(output) in {os.path.abspath(p) for p in inputs if p}:
        raise UserError("output path equals an input path; onnxprune never overwrites its input")

"""ONNX files in and out without holding the weights in memory twice.

Protobuf needs a whole message in memory to parse or serialise it, so
``onnx.load`` + ``SerializeToString`` of a 1 GB model costs several GB. This
module walks the wire format itself, only along the path
``ModelProto.graph (7) -> GraphProto.initializer (5) -> TensorProto.raw_data (9)``:

* :func:`read_skeleton` parses a file into a ``ModelProto`` whose large
  initializers are *external data pointing into the .onnx file itself*
  (offset and length of their ``raw_data``), so onnx-ir memory-maps them
  instead of copying them. Files that already use external data are read as
  they are.
* :func:`write_model` streams a model out one tensor at a time: the graph is
  serialised with large tensors as placeholders, and their bytes are written
  in place of the placeholders (embedded ``raw_data``) or to a ``.data`` file
  (external data, required above 2 GB).
"""
from __future__ import annotations

import mmap
import os
from typing import Callable, Iterator

import onnx

BIG = 4096  # bytes: tensors above this are mapped / streamed; smaller ones (shape constants) stay inline
PROTOBUF_LIMIT = 2**31 - 1
PLACEHOLDER = "__onnxprune_stream__"

# field numbers (onnx.proto)
_MODEL_GRAPH, _GRAPH_INIT = 7, 5
_T_RAW, _T_EXTERNAL, _T_LOCATION = 9, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_LEN = 2  # wire type: length-delimited


def _varint(buf, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _enc_varint((field << 3) | wire)


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield ``(field, wire, field_start, payload_start, field_end)`` of a message."""
    pos = start
    while pos < end:
        f0 = pos
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            yield field, wire, f0, pos, pos
            continue
        if wire == 1:
            p0, pos = pos, pos + 8
        elif wire == 5:
            p0, pos = pos, pos + 4
        elif wire == _LEN:
            n, p0 = _varint(buf, pos)
            pos = p0 + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, f0, p0, pos


def _entry(key: str, value: str) -> bytes:
    body = _key(1, _LEN) + _enc_varint(len(key)) + key.encode() + _key(2, _LEN) + _enc_varint(len(value)) + value.encode()
    return _key(_T_EXTERNAL, _LEN) + _enc_varint(len(body)) + body


def _mapped_tensor(buf, start: int, end: int, location: str) -> bytes | None:
    """A TensorProto's bytes with its large ``raw_data`` replaced by an external
    reference into the file; None when it stays as it is."""
    raw = None
    for field, wire, f0, p0, f1 in _fields(buf, start, end):
        if field == _T_LOCATION or field == _T_EXTERNAL:
            return None  # already external
        if field == _T_RAW and wire == _LEN:
            raw = (f0, p0, f1)
    if raw is None or raw[2] - raw[1] <= BIG:
        return None
    f0, p0, f1 = raw
    head = bytes(buf[start:f0]) + bytes(buf[f1:end])
    return (head + _entry("location", location) + _entry("offset", str(p0)) + _entry("length", str(f1 - p0))
            + _key(_T_LOCATION, 0) + _enc_varint(_EXTERNAL))


def _with_len(field: int, body: bytes) -> bytes:
    return _key(field, _LEN) + _enc_varint(len(body)) + body


def read_skeleton(path: str) -> onnx.ModelProto:
    """The model at ``path`` with every large embedded initializer turned into
    external data that points into ``path`` itself (nothing is copied).
    Relative external locations resolve against ``os.path.dirname(path)``."""
    location = os.path.basename(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return onnx.ModelProto()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            out = bytearray()
            for field, wire, f0, p0, f1 in _fields(buf, 0, size):
                if field != _MODEL_GRAPH or wire != _LEN:
                    out += buf[f0:f1]
                    continue
                graph = bytearray()
                for gf, gw, g0, gp, g1 in _fields(buf, p0, f1):
                    new = _mapped_tensor(buf, gp, g1, location) if gf == _GRAPH_INIT and gw == _LEN else None
                    graph += buf[g0:g1] if new is None else _with_len(_GRAPH_INIT, new)
                out += _with_len(_MODEL_GRAPH, bytes(graph))
    proto = onnx.ModelProto()
    proto.ParseFromString(bytes(out))
    return proto


# -- writing ----------------------------------------------------------------------------

Chunk = bytes | Callable[[], bytes]


def write_model(proto: onnx.ModelProto, tensors: dict[str, tuple[int, Callable[[], bytes]]], path: str,
                external: bool | None = None, data_name: str | None = None) -> str | None:
    """Write ``proto`` to ``path``. Initializers whose external location is
    :data:`PLACEHOLDER` get their bytes from ``tensors[name] = (nbytes, produce)``,
    produced one at a time. Embedded unless ``external`` is True or the file
    would pass protobuf's 2 GB limit; then the bytes go to ``path + '.data'``,
    (or ``data_name`` beside it), whose name is returned."""
    total = sum(n for n, _ in tensors.values())
    if external is None:
        external = proto.ByteSize() + total + 1024 * len(tensors) >= PROTOBUF_LIMIT
    inits = {t.name: t for t in proto.graph.initializer if t.name in tensors}
    if external:
        data_name = data_name or os.path.basename(path) + ".data"
        offset = 0
        with open(os.path.join(os.path.dirname(path) or ".", data_name), "wb") as f:
            for name, t in inits.items():
                nbytes, produce = tensors[name]
                pad = (-offset) % 64
                f.write(b"\0" * pad)
                offset += pad
                data = produce()
                if len(data) != nbytes:
                    raise RuntimeError(f"tensor {name}: {len(data)} bytes, expected {nbytes}")
                f.write(data)
                _set_external(t, data_name, offset, nbytes)
                offset += nbytes
                del data
        with open(path, "wb") as f:
            f.write(proto.SerializeToString())
        return data_name
    chunks = _embedded_chunks(proto, tensors)
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c if isinstance(c, bytes) else c())
    return None


def _set_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = onnx.TensorProto.EXTERNAL


def _embedded_chunks(proto: onnx.ModelProto, tensors) -> list[Chunk]:
    """The file as a list of byte strings and producers, with every placeholder
    tensor rewritten to carry ``raw_data`` (lengths are known up front)."""
    buf = proto.SerializeToString()
    chunks: list[Chunk] = []
    for field, wire, f0, p0, f1 in _fields(buf, 0, len(buf)):
        if field != _MODEL_GRAPH or wire != _LEN:
            chunks.append(buf[f0:f1])
            continue
        body: list[Chunk] = []
        blen = 0
        for gf, gw, g0, gp, g1 in _fields(buf, p0, f1):
            part = _placeholder_chunks(buf, gp, g1, tensors) if gf == _GRAPH_INIT and gw == _LEN else None
            if part is None:
                body.append(buf[g0:g1])
                blen += g1 - g0
                continue
            head, nbytes, produce = part
            raw_key = _key(_T_RAW, _LEN) + _enc_varint(nbytes)
            tlen = len(head) + len(raw_key) + nbytes
            prefix = _key(_GRAPH_INIT, _LEN) + _enc_varint(tlen) + head + raw_key
            body += [prefix, _checked(produce, nbytes)]
            blen += len(prefix) + nbytes
        chunks.append(_key(_MODEL_GRAPH, _LEN) + _enc_varint(blen))
        chunks.extend(body)
    return chunks


def _checked(produce, nbytes: int) -> Callable[[], bytes]:
    def run() -> bytes:
        data = produce()
        if len(data) != nbytes:
            raise RuntimeError(f"streamed tensor has {len(data)} bytes, expected {nbytes}")
        return data

    return run


def _placeholder_chunks(buf, start: int, end: int, tensors):
    """For a placeholder TensorProto: (its fields without the external
    reference, nbytes, producer); None for any other tensor."""
    keep = bytearray()
    name = None
    is_placeholder = False
    for field, wire, f0, p0, f1 in _fields(buf, start, end):
        if field == _T_EXTERNAL:
            entry = onnx.StringStringEntryProto.FromString(bytes(buf[p0:f1]))
            if entry.key == "location" and entry.value == PLACEHOLDER:
                is_placeholder = True
            continue
        if field == _T_LOCATION:
            continue
        if field == 8 and wire == _LEN:  # name
            name = bytes(buf[p0:f1]).decode()
        keep += buf[f0:f1]
    if not is_placeholder or name not in tensors:
        return None
    nbytes, produce = tensors[name]
    return bytes(keep), nbytes, produce

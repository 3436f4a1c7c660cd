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

from onnxprune.errors import UserError

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
    check_external(proto, path)
    return proto


# -- the file boundary ------------------------------------------------------------------

def all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a model: initializers, sparse initializers and node
    attributes, subgraphs included."""
    def graph(g: onnx.GraphProto):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield from (s.values, s.indices)
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for s in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                    yield from (s.values, s.indices)
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from graph(sub)

    yield from graph(proto.graph)


def check_external(proto: onnx.ModelProto, path: str) -> None:
    """Refuse external data that lies outside the model's folder, before any of it
    is read: a location that is absolute, has a ``..`` part, or resolves (symlinks
    followed) outside ``dirname(path)``; also a negative offset or a range past the
    end of its file. onnx's own loader refuses the same locations."""
    base = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for t in all_tensors(proto):
        if t.data_location != _EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        what = f"external data of tensor {t.name!r} ({loc!r})"
        parts = loc.replace("\\", "/").split("/")
        if not loc or "\0" in loc:
            raise UserError(f"{what}: no usable location")
        if os.path.isabs(loc) or loc[:1] in "/\\" or (len(loc) > 1 and loc[1] == ":"):
            raise UserError(f"{what}: an absolute path; external data must lie in the model's folder")
        if ".." in parts:
            raise UserError(f"{what}: contains '..'; external data must lie in the model's folder")
        real = os.path.realpath(os.path.join(base, loc))
        if os.path.commonpath([base, real]) != base or real == base:
            raise UserError(f"{what}: resolves outside the model's folder ({real})")
        if not os.path.isfile(real):
            raise UserError(f"{what}: no such file in the model's folder")
        try:
            offset, length = int(info.get("offset", 0)), int(info["length"]) if "length" in info else None
        except ValueError:
            raise UserError(f"{what}: offset and length must be integers") from None
        size = os.path.getsize(real)
        if offset < 0 or (length is not None and length < 0) or offset + (length or 0) > size:
            raise UserError(f"{what}: offset {offset} and length {length} lie outside its {size}-byte file")


# -- writing ----------------------------------------------------------------------------

Chunk = bytes | Callable[[], bytes]


def write_model(proto: onnx.ModelProto, tensors: dict[str, tuple[int, Callable[[], bytes]]], path: str,
                external: bool | None = None, data_name: str | None = None) -> str | None:
    """Write ``proto`` to ``path``. Initializers whose external location is
    :data:`PLACEHOLDER` get their bytes from ``tensors[name] = (nbytes, produce)``,
    produced one at a time. Embedded unless ``external`` is True or the file
    would pass protobuf's 2 GB limit; then the bytes go to ``path + '.data'``,
    (or ``data_name`` beside it), whose name is returned (none is written when no
    tensor is streamed). Files get the mode the process umask gives."""
    total = sum(n for n, _ in tensors.values())
    if external is None:
        external = proto.ByteSize() + total + 1024 * len(tensors) >= PROTOBUF_LIMIT
    inits = {t.name: t for t in proto.graph.initializer if t.name in tensors}
    if external and inits:
        data_name = data_name or os.path.basename(path) + ".data"
        data_path = os.path.join(os.path.dirname(path) or ".", data_name)
        try:
            _write_data(inits, tensors, data_path, data_name)
            with open(path, "wb") as f:
                f.write(proto.SerializeToString())
        except BaseException:
            if os.path.exists(data_path):
                os.remove(data_path)
            raise
        _umask_mode(path, data_path)
        return data_name
    chunks = _embedded_chunks(proto, tensors)
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c if isinstance(c, bytes) else c())
    _umask_mode(path)
    return None


def _write_data(inits: dict, tensors: dict, data_path: str, data_name: str) -> None:
    offset = 0
    with open(data_path, "wb") as f:
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


def _umask_mode(*paths: str) -> None:
    """Give written files the mode a new file gets under the process umask (the
    caller may have created ``path`` with ``tempfile.mkstemp``, which makes it 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in paths:
        os.chmod(p, 0o666 & ~mask)


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

"""Import an ONNX model into PyTorch with onnx2torch, make its weights
trainable, and write trained tensors back into the ONNX file by initializer name.

Which torch tensor holds which ONNX initializer is found by **fingerprinting**,
not by relying on onnx2torch internals: a copy of the model whose candidate
weights are replaced by distinct random values is converted too, and every
torch parameter or buffer is matched to the initializer whose values it holds
(as is, transposed, or reshaped, which is how converters such as Gemm -> Linear
store them). The real model, converted the same way, has the same module tree,
so the mapping carries over. Initializers onnx2torch copies into several
buffers (one per use) are tied back into one Parameter.

Trainable: floating-point initializers with more than one element that feed a
data input of a layer (Conv/Gemm/MatMul/norm weights, biases, Add/Mul constants
such as pos_embed or layer scale, a Concat'ed cls token, a Gather'ed bias
table). Not trainable: scalars, BatchNorm running statistics (updated in train
mode and written back), attention masks (only 0 and a large negative value),
and anything the converter does not hold verbatim; the import report lists
them with the reason.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxprune import io
from onnxprune.errors import UserError

log = logging.getLogger(__name__)

# op -> input slots that carry learnable data (a weight, a bias, a table)
DATA_SLOTS = {
    "Conv": {1, 2}, "ConvTranspose": {1, 2}, "Gemm": {0, 1, 2}, "MatMul": {0, 1},
    "Add": {0, 1}, "Sub": {0, 1}, "Mul": {0, 1}, "Div": {0},
    "LayerNormalization": {1, 2}, "BatchNormalization": {1, 2, 3, 4}, "InstanceNormalization": {1, 2},
    "GroupNormalization": {1, 2}, "Concat": set(range(64)), "Expand": {0}, "Gather": {0}, "PRelu": {1},
    "Where": {1, 2}, "Reshape": {0}, "Transpose": {0}, "Unsqueeze": {0}, "Squeeze": {0}, "Tile": {0}, "Slice": {0},
}
STATS = {("BatchNormalization", 3), ("BatchNormalization", 4)}  # written back, never trained
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclass
class Link:
    path: str  # dotted path of a parameter or buffer in the torch module
    transform: str  # "same" | "T" | "reshape"


@dataclass
class Imported:
    module: "object"  # torch.fx.GraphModule
    proto: onnx.ModelProto
    links: dict = field(default_factory=dict)  # initializer name -> [Link]
    trainable: list = field(default_factory=list)  # initializer names
    stats: list = field(default_factory=list)  # initializer names written back but not trained
    frozen: dict = field(default_factory=dict)  # initializer name -> why it is not trained
    static_batch: int | None = None

    def report(self) -> dict:
        n = lambda names: int(sum(np.prod(self._init[x].dims) for x in names))
        return {
            "trainable_tensors": len(self.trainable), "trainable_params": n(self.trainable),
            "stat_tensors": len(self.stats), "frozen": dict(self.frozen), "static_batch": self.static_batch,
        }

    @property
    def _init(self):
        return {i.name: i for i in self.proto.graph.initializer}


def _consumers(proto: onnx.ModelProto) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for n in proto.graph.node:
        for k, i in enumerate(n.input):
            if i:
                out.setdefault(i, []).append((n.op_type, k))
    return out


def _mask_like(arr: np.ndarray) -> bool:
    vals = np.unique(arr)
    return len(vals) <= 2 and 0 in vals and vals.min() <= -100


def classify(proto: onnx.ModelProto) -> tuple[list[str], list[str], dict[str, str]]:
    """(trainable, statistics, frozen-with-reason) initializer names."""
    cons = _consumers(proto)
    train, stats, frozen = [], [], {}
    for init in proto.graph.initializer:
        if init.data_type not in FLOATS:
            continue
        if int(np.prod(init.dims)) <= 1:
            continue  # scalars: eps, scales, exponents
        uses = cons.get(init.name, [])
        if not uses:
            continue
        if all(u in STATS for u in uses):
            stats.append(init.name)
            continue
        bad = [f"{op} input {k}" for op, k in uses if k not in DATA_SLOTS.get(op, ()) or (op, k) in STATS]
        if bad:
            frozen[init.name] = "not a learnable input: " + ", ".join(sorted(set(bad)))
            continue
        if _mask_like(numpy_helper.to_array(init)):
            frozen[init.name] = "attention mask (only 0 and a large negative value)"
            continue
        train.append(init.name)
    return train, stats, frozen


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def _convert(proto: onnx.ModelProto):
    from onnx2torch import convert

    from onnxprune.torchbridge.converters import register

    register()
    try:
        return convert(proto)
    except NotImplementedError as e:
        raise UserError(f"onnx2torch cannot import this model: {e}") from None


def import_onnx(model: str | onnx.ModelProto, seed: int = 0) -> Imported:
    """Convert an ONNX model to a trainable torch module with a write-back map."""
    import torch

    proto = io.read_proto(model) if isinstance(model, str) else model
    inits = {i.name for i in proto.graph.initializer}
    if any(n.op_type == "Identity" and n.input[0] in inits for n in proto.graph.node):  # onnx2torch: weights are initializers
        m = ir.serde.deserialize_model(proto)
        io.weights_as_initializers(m, constants=False)
        proto = ir.serde.serialize_model(m)
    train, stats, frozen = classify(proto)
    # fingerprint copy: every candidate gets distinct random values
    rng = np.random.default_rng(seed)
    fp = onnx.ModelProto()
    fp.CopyFrom(proto)
    prints: dict[str, str] = {}
    by_digest: dict[str, tuple[str, str]] = {}
    inits = {i.name: i for i in fp.graph.initializer}
    for name in train + stats:
        init = inits[name]
        arr = numpy_helper.to_array(init)
        new = (rng.standard_normal(arr.shape) + 3.0).astype(arr.dtype)  # positive-ish: valid variances too
        if name in stats:
            new = np.abs(new) + 0.5
        init.CopyFrom(numpy_helper.from_array(new, name))
        prints[name] = _digest(new)
        by_digest.setdefault(_digest(new), (name, "same"))
        if new.ndim == 2:
            by_digest.setdefault(_digest(new.T), (name, "T"))
    fp_mod = _convert(fp)
    real = _convert(proto)
    links: dict[str, list[Link]] = {}
    fp_tensors = dict(fp_mod.named_parameters(remove_duplicate=False))
    fp_tensors.update(dict(fp_mod.named_buffers(remove_duplicate=False)))
    real_names = set(dict(real.named_parameters(remove_duplicate=False))) | set(dict(real.named_buffers(remove_duplicate=False)))
    if set(fp_tensors) != real_names:
        raise RuntimeError("onnx2torch built different modules for the fingerprint copy")
    for path, t in fp_tensors.items():
        if not torch.is_floating_point(t):
            continue
        hit = by_digest.get(_digest(t.detach().cpu().numpy()))
        if hit is None:
            continue
        name, how = hit
        shape = tuple(inits[name].dims)
        if how == "same" and tuple(t.shape) != shape:
            how = "reshape"
        links.setdefault(name, []).append(Link(path, how))
    imp = Imported(real, proto, static_batch=io.static_batch(proto))
    for name in train + stats:
        if name not in links:
            frozen[name] = "onnx2torch does not hold this tensor verbatim (folded or transformed by its converter)"
    imp.links = links
    imp.trainable = [n for n in train if n in links]
    imp.stats = [n for n in stats if n in links]
    imp.frozen = frozen
    _make_trainable(imp)
    return imp


def _locate(module, path: str):
    *parents, leaf = path.split(".")
    m = module
    for p in parents:
        m = getattr(m, p)
    return m, leaf


def _make_trainable(imp: Imported) -> None:
    """Promote linked buffers to Parameters; one Parameter per initializer
    where onnx2torch made several copies with the same layout."""
    import torch

    mod = imp.module
    for p in mod.parameters():
        p.requires_grad_(False)
    for name in imp.trainable:
        shared = None
        for link in imp.links[name]:
            owner, leaf = _locate(mod, link.path)
            t = getattr(owner, leaf)
            if link.transform == "same" and shared is not None and tuple(shared.shape) == tuple(t.shape):
                param = shared  # tie the copies
            else:
                param = t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t.detach().clone())
                if shared is None and link.transform == "same":
                    shared = param
            param.requires_grad_(True)
            if leaf in owner._buffers:
                del owner._buffers[leaf]
            owner._parameters[leaf] = param
    untied = [n for n in imp.trainable if len({id(tensor_at(mod, ln.path)) for ln in imp.links[n]}) > 1]
    for n in untied:
        log.warning("initializer %s has %d differently laid out copies in torch; the first is written back", n, len(imp.links[n]))


def tensor_at(mod, path):
    """The torch tensor (parameter or buffer) at ``path`` in ``mod``: where an
    ONNX initializer lives after the import (``Imported.links[name][i].path``)."""
    owner, leaf = _locate(mod, path)
    return getattr(owner, leaf)


def write_back(imp: Imported, proto: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A copy of ``proto`` (default: the imported model) whose linked
    initializers hold the torch module's current values. Graph untouched."""
    src = proto or imp.proto
    out = onnx.ModelProto()
    out.CopyFrom(src)
    inits = {i.name: i for i in out.graph.initializer}
    for name in imp.trainable + imp.stats:
        link = imp.links[name][0]
        t = tensor_at(imp.module, link.path).detach().cpu().numpy()
        init = inits[name]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        if link.transform == "T":
            t = t.T
        arr = np.ascontiguousarray(t.reshape(tuple(init.dims))).astype(dtype)
        init.CopyFrom(numpy_helper.from_array(arr, name))
    return out

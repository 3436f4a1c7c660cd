"""onnxruntime: sessions, random feeds, the latency benchmark (:mod:`.bench`).

Every ORT session in onnxprune is made by :func:`session`.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxprune.errors import UserError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def session(model: str | onnx.ModelProto, threads: int | None = 1, provider: str = "cpu",
            externals: dict[str, np.ndarray] | None = None, mem_pattern: bool = True, arena: bool = True,
            extended: bool = False):
    """An ORT session on ``model`` (a path or a proto): ``threads`` intra-op threads
    (None: ORT's default), one inter-op thread, errors as exceptions only. A
    provider other than the CPU must be available and actually used.
    ``externals``: the arrays of initializers that ``model`` holds as data-less
    external references (:func:`onnxprune.io.session_parts`); ORT takes them
    as they are, and the session keeps them alive. ``mem_pattern`` False:
    no memory pattern planned from the first run; a graph whose intermediate
    values are also outputs (a ViT-S with its 12 GELU outputs read) ran twice
    as slow with one. ``arena`` False: no CPU memory arena, which a session
    keeps at its largest run's size while it lives (the damage search's ~20
    partial-run sessions of a ViT-S held 1.6 GB more with one). ``extended``:
    ORT's extended optimisation level instead of its full one (no layout
    transformations; see below)."""
    import onnxruntime as ort

    wanted = PROVIDERS[provider]
    have = ort.get_available_providers()
    if wanted[0] not in have:
        raise UserError(f"provider '{provider}' ({wanted[0]}) is not available in this onnxruntime; available: {', '.join(have)}")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # errors come back as exceptions; ORT would also print them
    so.enable_mem_pattern = mem_pattern
    so.enable_cpu_mem_arena = arena
    if extended:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    values = []
    if externals:
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in externals.values()]
        so.add_external_initializers(list(externals), values)
    data = model if isinstance(model, str) else model.SerializeToString()
    providers = [p for p in wanted if p in have]
    # no fallback: on an error ORT would print a banner on stdout and retry on the same CPU provider.
    # (Its full optimisation level refuses some graphs whose intermediate values are exposed: a Conv
    # output read by an Add whose two Convs take their weights as graph inputs, as the damage search's
    # partial runs of a ResNet or of dynamo's MaxViT do; runtime.capture.Resume then makes its pieces at
    # the extended level, and the search keeps them only where a candidate at mid depth runs faster
    # so than the whole model does at the full level.)
    sess = ort.InferenceSession(data, so, providers=providers, enable_fallback=0)
    sess._onnxprune_externals = (externals, values)  # ORT may read them until the session goes
    used = sess.get_providers()[0]
    if used != wanted[0]:
        raise UserError(f"onnxruntime fell back from {wanted[0]} to {used}")
    return sess


def random_inputs(proto: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every graph input; symbolic dims become ``batch``.
    Integer inputs get values the graph can take: indices within the table a
    ``Gather`` reads them from (token ids, token types, positions), else 0/1 (masks)."""
    rng = np.random.default_rng(seed)
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    feeds = {}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else batch for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[inp.name] = rng.integers(0, _int_bound(proto, inp.name, inits), shape).astype(dtype)
    return feeds


def _int_bound(proto: onnx.ModelProto, name: str, inits: dict) -> int:
    """Exclusive upper bound for an integer input: the smallest table a Gather
    indexes with it (through Cast/Reshape/Unsqueeze/Squeeze/Flatten), else 2."""
    bound, frontier, seen = None, {name}, set()
    passthrough = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}
    while frontier:
        v = frontier.pop()
        seen.add(v)
        for n in proto.graph.node:
            if v not in n.input:
                continue
            if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == v and n.input[0] in inits:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                dims = inits[n.input[0]]
                if dims:
                    size = dims[axis % len(dims)]
                    bound = size if bound is None else min(bound, size)
            elif n.op_type in passthrough and n.input[0] == v:
                frontier.update(o for o in n.output if o not in seen)
    return max(1, bound) if bound is not None else 2

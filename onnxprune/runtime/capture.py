"""Intermediate values of a model, computed in ONNX Runtime.

:func:`capture` runs a model once and returns the values asked for (the
nodes nothing asked for are not run). :class:`Frontier` does the same for a
sequence of requests over a fixed set of input batches, running every node
of the model **once** in all: each request runs only the part of the graph
between the values already held (the frontier) and the values asked for, and
the frontier keeps exactly the values that nodes not yet run will read.
Between requests the model may be edited (new weights for nodes not yet run,
a new node after one): each request reads the model as it is then. That is
what sequential, layer-by-layer calibration needs (re-fit a layer, then
compute what comes after it with the new weights) at the cost of one forward
pass instead of one per layer. Held values that exceed a memory budget spill
to memory-mapped files in a temporary folder that :meth:`Frontier.close`
removes.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from onnxprune.runtime import session

log = logging.getLogger(__name__)


def _subgraph_reads(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph (If/Loop/Scan body) reads from the enclosing scope."""
    local = {i.name for i in g.input} | {t.name for t in g.initializer}
    reads: set[str] = set()
    for n in g.node:
        for v in _node_reads(n):
            if v not in local:
                reads.add(v)
        local.update(n.output)
    return reads


def _node_reads(n: onnx.NodeProto) -> list[str]:
    out = [v for v in n.input if v]
    for a in n.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out += sorted(_subgraph_reads(a.g))
        elif a.type == onnx.AttributeProto.GRAPHS:
            for sg in a.graphs:
                out += sorted(_subgraph_reads(sg))
    return out


def _reads(n: ir.Node, outer: dict | None = None) -> list[str]:
    """Names ``n`` reads: its inputs (read afresh: an edit may give it a new
    initializer) and, for an If/Loop/Scan, what its bodies read from outside
    (cached in ``outer`` by node: bodies are never edited)."""
    out = [v.name for v in n.inputs if v is not None and v.name]
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in n.attributes.values()):
        key = id(n)
        if outer is None or key not in outer:
            body = sorted({v for a in n.attributes.values() if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                           for g in ([a.value] if a.type == ir.AttributeType.GRAPH else a.value)
                           for v in _subgraph_reads(ir.serde.serialize_graph(g))})
            if outer is None:
                return out + [v for v in body if v not in out]
            outer[key] = body
        out += [v for v in outer[key] if v not in out]
    return out


def _piece(model: ir.Model, nodes: list[ir.Node], inputs: dict[str, np.ndarray], outputs: list[str]) -> onnx.ModelProto:
    """A model of ``nodes`` (in order) reading ``inputs`` (name -> an example
    array, for the type) and the initializers they use, writing ``outputs``."""
    from onnxprune.io import tensor_proto

    inits = model.graph.initializers
    reads = {v for n in nodes for v in _reads(n)}
    graph = helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "piece",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim)
         for k, a in inputs.items()],
        [onnx.ValueInfoProto(name=o) for o in outputs],
        [tensor_proto(inits[k]) for k in sorted(reads) if k in inits and k not in inputs])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
                          ir_version=model.ir_version)
    m.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return m


class Frontier:
    """Values of ``model`` (an IR model, edited in place between requests, or a
    proto) over ``feeds`` (one feed dict per batch), asked for in any order;
    every node runs once (see the module doc). The model is read anew at each
    request: edit it between requests, but only nodes that have not run yet.
    ``budget`` bytes of held values live in memory, the rest in memory-mapped files."""

    def __init__(self, model: ir.Model | onnx.ModelProto, feeds: list[dict], threads: int = 0, budget: int = 2 << 30):
        if isinstance(model, onnx.ModelProto):
            model = ir.serde.deserialize_model(model)
        self.model, self.threads, self.budget = model, threads or (os.cpu_count() or 1), budget
        self.n = len(feeds)
        self.held: dict[str, list[np.ndarray]] = {}
        for fd in feeds:
            for k, v in fd.items():
                self.held.setdefault(k, []).append(np.asarray(v))
        self.inputs = set(self.held)
        self.ran: set[str] = set()  # output names of the nodes that have run
        self.bytes = sum(a.nbytes for v in self.held.values() for a in v)
        self.spill: str | None = None
        self.passes = 0  # ORT sessions built (one per request that had to run something)
        self.nodes_run = 0
        self._outer: dict = {}  # node id -> what its subgraphs read from the enclosing scope

    def _keep(self, name: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        size = sum(a.nbytes for a in arrays)
        if self.bytes + size <= self.budget:
            self.bytes += size
            return arrays
        if self.spill is None:
            self.spill = tempfile.mkdtemp(prefix="onnxprune-frontier-")
        out = []
        for i, a in enumerate(arrays):
            path = os.path.join(self.spill, f"{len(os.listdir(self.spill))}_{i}.npy")
            m = np.lib.format.open_memmap(path, mode="w+", dtype=a.dtype, shape=a.shape)
            m[...] = a
            out.append(m)
        return out

    def get(self, names: list[str]) -> dict[str, list[np.ndarray]]:
        """``{name: [array per batch]}`` for ``names``: values of the model as it is now."""
        g = self.model.graph
        inits = g.initializers
        producer = {o.name: n for n in g for o in n.outputs if o.name}
        chosen: dict[int, ir.Node] = {}
        stack = [v for v in names if v not in self.held and v not in inits]
        seen: set[str] = set()
        while stack:
            v = stack.pop()
            if not v or v in seen or v in self.held or v in inits:
                continue
            seen.add(v)
            n = producer.get(v)
            if n is None:
                raise KeyError(f"no node produces '{v}'")
            if id(n) not in chosen:
                chosen[id(n)] = n
                stack.extend(_reads(n, self._outer))
        if chosen:
            self._run([n for n in g if id(n) in chosen], set(names))
        missing = [v for v in names if v not in self.held and v not in inits]
        if missing:
            raise KeyError(f"values not computed: {missing[:3]}")
        out = {}
        for v in names:
            out[v] = self.held[v] if v in self.held else [inits[v].const_value.numpy()] * self.n
        self._evict()
        return out

    def _run(self, nodes: list[ir.Node], wanted: set[str]) -> None:
        inits = self.model.graph.initializers
        mine = {id(n) for n in nodes}
        later_reads = self._pending_reads(skip=mine)  # read by nodes that have not run and are not run now
        produced = [o.name for n in nodes for o in n.outputs if o.name]
        outputs = [o for o in produced if o in wanted or o in later_reads]
        reads = {v for n in nodes for v in _reads(n, self._outer)}
        ins = {k: self.held[k][0] for k in sorted(reads) if k in self.held and k not in inits}
        piece = _piece(self.model, nodes, ins, outputs)
        sess = session(piece, self.threads, mem_pattern=False)  # see runtime.session: exposed values
        del piece
        self.passes += 1
        self.nodes_run += len(nodes)
        got: dict[str, list] = {o: [] for o in outputs}
        for b in range(self.n):
            res = sess.run(outputs, {k: self.held[k][b] for k in ins}) if outputs else []
            for o, a in zip(outputs, res):
                got[o].append(a)
        for o in outputs:
            self.held[o] = self._keep(o, got[o])
        self.ran.update(produced)

    def _pending_reads(self, skip: set[int] = frozenset()) -> set[str]:
        """Values read by the nodes that have not run (except those in ``skip``, by id)."""
        reads: set[str] = set()
        for n in self.model.graph:
            if id(n) not in skip and not (n.outputs and all(o.name in self.ran for o in n.outputs if o.name)):
                reads.update(_reads(n, self._outer))
        return reads

    def _evict(self) -> None:
        """Drop held values that no node still to run reads, except the graph's
        outputs (asked for at the end: recovery's whole-model check)."""
        live = self._pending_reads() | {o.name for o in self.model.graph.outputs}
        for k in list(self.held):
            if k not in live:
                arrays = self.held.pop(k)
                if not isinstance(arrays[0], np.memmap):
                    self.bytes -= sum(a.nbytes for a in arrays)

    def close(self) -> None:
        self.held.clear()
        if self.spill:
            shutil.rmtree(self.spill, ignore_errors=True)
            self.spill = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _trim(proto: onnx.ModelProto, outputs: list[str], externals: dict | None = None) -> dict | None:
    """Make ``proto`` (in place) compute only ``outputs``: its outputs become
    them, and the nodes and initializers nothing among them needs go (ORT runs
    every node of a graph whatever is fetched: a ViT's dense decoder, 40% of
    its MACs, ran for values read in its encoder). ``externals``: arrays held
    apart from ``proto`` (:func:`onnxprune.io.session_parts`); returned
    without those it no longer reads."""
    g = proto.graph
    need = set(outputs)
    kept = []
    for n in reversed(g.node):
        if any(o in need for o in n.output if o):
            kept.append(n)
            need.update(_node_reads(n))
    kept.reverse()
    if len(kept) < len(g.node):
        del g.node[:]
        g.node.extend(kept)
    inits = [t for t in g.initializer if t.name in need]
    if len(inits) < len(g.initializer):
        # an initializer listed as a graph input too (IR < 4 exporters) goes with it, or ORT would ask for it
        gone = {t.name for t in g.initializer} - need
        del g.initializer[:]
        g.initializer.extend(inits)
        ins = [i for i in g.input if i.name not in gone]
        if len(ins) < len(g.input):
            del g.input[:]
            g.input.extend(ins)
    have = {o.name: o for o in g.output}
    del g.output[:]
    g.output.extend(have.get(o) or helper.make_empty_tensor_value_info(o) for o in dict.fromkeys(outputs))
    return None if externals is None else {k: v for k, v in externals.items() if k in need}


def exposed(proto: onnx.ModelProto, names: list[str], threads: int | None = 1, copy: bool = True):
    """An ORT session of ``proto`` (a copy unless ``copy`` is false: then ``proto``
    itself is cut down) whose outputs are the values ``names``, any
    intermediate value: ``session.run(names, feed)`` returns them. Only what
    they need is computed."""
    if copy:
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        proto = p
    _trim(proto, list(names))
    return session(proto, threads=threads)


def channel_sums(model: ir.Model, axes: dict[str, tuple[int, int]], feeds, threads: int | None = 1
                 ) -> dict[str, tuple[np.ndarray, int]]:
    """Per value of ``model`` named in ``axes`` (name -> (channel axis, rank)):
    the sum of its entries per channel over every feed (float64) and how many
    entries each channel summed. The sums are taken inside the graph (a Cast to
    double and a ReduceSum over every other axis, a Shape for the count), so
    the activations themselves never leave ORT (on a ViT-S, holding them as
    outputs made the pass 6x slower than a forward; read inside the graph, 2x
    with ORT's memory pattern, 1x without)."""
    from onnxprune.io import session_parts

    proto, weights = session_parts(model)
    opset = next((v for d, v in model.opset_imports.items() if d in ("", "ai.onnx")), 13)
    taken = {v.name for v in proto.graph.input} | {o.name for o in proto.graph.output} | {
        o for n in proto.graph.node for o in n.output} | {t.name for t in proto.graph.initializer}
    asked = {}
    added: dict[str, list] = {}  # value name -> the nodes reading it, placed right after its producer
    for k, (name, (axis, rank)) in enumerate(sorted(axes.items())):
        others = [a for a in range(rank) if a != axis % rank]
        total, shape = (f"onnxprune_sum{k}_{s}" for s in ("sum", "shape"))
        if {total, shape} & taken:
            raise ValueError(f"names already in the model: {total}")
        if not others:
            total = name
        elif opset >= 13:
            ax = f"onnxprune_sum{k}_axes"
            proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(others, np.int64), ax))
            added.setdefault(name, []).append(helper.make_node("ReduceSum", [name, ax], [total], keepdims=0))
        else:
            added.setdefault(name, []).append(helper.make_node("ReduceSum", [name], [total], axes=others, keepdims=0))
        added.setdefault(name, []).append(helper.make_node("Shape", [name], [shape]))
        proto.graph.output.extend([onnx.ValueInfoProto(name=total), onnx.ValueInfoProto(name=shape)])
        asked[name] = (total, shape, axis % rank)
    nodes = [m for n in proto.graph.node for m in [n] + [a for o in n.output for a in added.pop(o, [])]]
    nodes = [a for v in added.values() for a in v] + nodes  # values no node produces (graph inputs)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)  # each read as soon as it is made: ORT frees it early, not at the end
    outs = [o for t, sh, _ in asked.values() for o in (t, sh)]
    weights = _trim(proto, outs, weights)
    sess = session(proto, threads, externals=weights, mem_pattern=False)
    ins = [i.name for i in sess.get_inputs()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for fd in feeds:
        got = dict(zip(outs, sess.run(outs, {k: fd[k] for k in ins})))
        for name, (t, sh, axis) in asked.items():
            dims = got[sh].astype(np.int64)
            sums[name] = sums.get(name, 0) + got[t].astype(np.float64)
            counts[name] = counts.get(name, 0) + int(np.prod(dims)) // max(int(dims[axis]), 1)
    return {n: (sums[n], counts[n]) for n in asked}


def capture(proto: onnx.ModelProto | ir.Model, names: list[str], feeds: list[dict], threads: int = 0) -> dict[str, list[np.ndarray]]:
    """``{name: [array per batch]}``: the values ``names`` of ``proto`` on each feed."""
    with Frontier(proto, feeds, threads, budget=1 << 62) as f:
        return {k: list(v) for k, v in f.get(list(names)).items()}


class Resume:
    """Runs of a model whose initializers ``watched`` are graph inputs, fed per
    run (the damage search's zeroed candidates), that start at the first node
    reading an input that differs from the unedited one, from the values the
    unedited model left there: a candidate that edits a ViT's eighth block
    runs blocks 8 to 12 and the decoder, not the whole model. ``proto`` (with
    ``externals``, :func:`onnxprune.io.session_parts`) is the model as fed,
    ``base`` the unedited arrays of ``watched``, ``feeds`` the data (one dict
    per batch). At most ``cuts`` starting points (the first readers of the
    watched inputs, evenly picked), each a session made on first use; the
    unedited values crossing them are computed once and held when they take
    at most ``budget`` bytes (else :attr:`ok` is False and every run is the
    caller's). Outputs are the graph's, in order. A run given a ``key`` (the
    caller's name for its arrays) also returns the values it made that cross
    the later starting points, and keeps them (the latest runs', up to
    ``recent_budget`` bytes): when the base then moves to those arrays
    (:meth:`rebase` with the same key, the damage search taking the step it
    just measured), they are the new held values and nothing runs again."""

    def __init__(self, proto: onnx.ModelProto, externals: dict, base: dict[str, np.ndarray], feeds: list[dict],
                 threads: int, cuts: int = 16, budget: int = 512 << 20, recent_budget: int = 256 << 20):
        g = proto.graph
        self.proto, self.externals, self.threads, self.feeds = proto, externals, threads, feeds
        self.outputs = [o.name for o in g.output]
        nodes = list(g.node)
        reads = [_node_reads(n) for n in nodes]
        self.first: dict[str, int] = {}
        last: dict[str, int] = {}
        for i, r in enumerate(reads):
            for v in r:
                self.first.setdefault(v, i)
                last[v] = i
        for o in self.outputs:
            last[o] = len(nodes)
        made = self.made = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        starts = sorted({self.first[w] for w in base if w in self.first})
        pick = sorted({starts[int(round(k))] for k in np.linspace(0, len(starts) - 1, min(cuts, len(starts)))}) \
            if starts else []
        # the values made before a starting point and read at or after it (what a run from there is fed)
        self.cross = {c: vs for c in pick for vs in [sorted(v for v, i in made.items() if i < c and last.get(v, -1) >= c)]
                      if vs}  # none: the start of the model
        self.held: dict[int, list[dict]] = {}
        self.sessions: dict[int, tuple] = {}
        self.base = base
        self.ok = False
        self.checked = False  # the caller's: a first run compared with the whole model's
        self.runs = self.rebased = self.reused = 0
        self.recent: dict = {}  # key -> (start, per feed {crossing value: array}) of the latest keyed runs
        self.recent_budget = recent_budget
        self.last_start: int | None = None  # where the last run started
        self.extended = False  # sessions at ORT's extended optimisation level (see _made)
        if not self.cross:
            return
        # the crossing values' sizes from one sample first (a dynamic batch), so the held values stay
        # within the budget: the starting points whose values weigh most go first
        samples = sum(len(next(iter(fd.values()))) for fd in feeds)
        one = self._values({v for vs in self.cross.values() for v in vs}, [{k: a[:1] for k, a in feeds[0].items()}])
        size = {v: a.nbytes * samples for v, a in one[0].items()} if one else None
        if size is not None:
            while self.cross and sum(size[v] for v in {v for vs in self.cross.values() for v in vs}) > budget:
                del self.cross[max(self.cross, key=lambda c: sum(size[v] for v in self.cross[c]))]
        wanted = {v for vs in self.cross.values() for v in vs}
        got = self._values(wanted, feeds) if wanted else None
        if not got or sum(a.nbytes for d in got for a in d.values()) > budget:
            return
        for c, vs in self.cross.items():
            self.held[c] = [{v: d[v] for v in vs} for d in got]
        self.ok = True

    def _values(self, wanted: set[str], feeds: list[dict]) -> list[dict] | None:
        """The unedited model's values ``wanted`` on each of ``feeds`` (None when it cannot run them:
        a static batch fed one sample)."""
        names = sorted(wanted)
        sess, ins = self._whole(names)
        try:
            out = []
            for fd in feeds:
                every = {**fd, **self.base}
                out.append(dict(zip(names, sess.run(names, {k: every[k] for k in ins}))))
            return out
        except Exception:  # noqa: BLE001 - e.g. a static batch: the caller decides without sizes
            return None

    def rebase(self, arrays: dict[str, np.ndarray], key=None) -> None:
        """Make ``arrays`` the base runs start from (the damage search's current
        plan): the held values after the first node reading a changed array are
        the ones the run keyed ``key`` made, when it was one of the latest and
        started where these arrays start; else computed anew by one run from
        the starting point before it."""
        kept, self.recent = self.recent.pop(key, None) if key is not None else None, {}
        diff = self.changed(arrays)
        first = min((self.first[c] for c in diff if c in self.first), default=None)
        if first is None:
            self.base = dict(arrays)
            return
        c0 = self.start(diff)
        later = [c for c in self.cross if c > first]
        wanted = sorted({v for c in later for v in self.cross[c] if self.made[v] >= (c0 or 0)})
        if wanted and kept is not None and kept[0] == c0 and c0 is not None and set(wanted) <= set(kept[1][0]):
            self.reused += 1
            for c in later:
                self.held[c] = [{v: g.get(v, h[v]) for v in h} for g, h in zip(kept[1], self.held[c])]
        elif wanted:
            at = ("values", c0)
            if at not in self.sessions:
                self.sessions[at] = self._session(c0, wanted) if c0 is not None else self._whole(wanted)
            sess, ins = self.sessions[at]
            got = []
            for b, fd in enumerate(self.feeds):
                every = {**fd, **arrays, **(self.held[c0][b] if c0 is not None else {})}
                got.append(dict(zip(wanted, sess.run(wanted, {k: every[k] for k in ins}))))
            self.rebased += 1
            for c in later:
                self.held[c] = [{v: g.get(v, h[v]) for v in h} for g, h in zip(got, self.held[c])]
        self.base = dict(arrays)

    def _whole(self, names: list[str]):
        """A session of the whole model computing only ``names`` (exposed values)."""
        full = onnx.ModelProto()
        full.CopyFrom(self.proto)
        ext = _trim(full, names, self.externals)
        sess = self._made(full, ext, mem_pattern=False)
        return sess, [i.name for i in sess.get_inputs()]

    def _made(self, proto: onnx.ModelProto, externals: dict | None, **kw):
        """A session of ``proto``; where ORT's full optimisation level refuses it
        (an exposed Conv output that its layout transformation fused away:
        dynamo's MaxViT), at the extended level, from then on for every piece."""
        if not self.extended:
            try:
                return session(proto, self.threads, externals=externals, **kw)
            except Exception as e:  # noqa: BLE001 - ORT's refusal of this graph at its full level
                log.debug("partial runs at ORT's extended optimisation level (%s)", e)
                self.extended = True
        return session(proto, self.threads, externals=externals, extended=True, **kw)

    def changed(self, arrays: dict[str, np.ndarray]) -> list[str]:
        """The names of ``arrays`` whose values differ from the base's (at first the unedited ones)."""
        b = self.base
        return [k for k, a in arrays.items()
                if not (a is b[k] or a.shape == b[k].shape and a.dtype == b[k].dtype and np.array_equal(a, b[k]))]

    def start(self, changed) -> int | None:
        """The starting point for a run whose inputs ``changed`` differ from
        the unedited ones: the last one at or before the first node reading
        any of them (None: none, the whole model runs)."""
        first = min((self.first[c] for c in changed if c in self.first), default=None)
        if not self.ok or first is None:
            return None
        at = [c for c in self.cross if c <= first]
        return max(at) if at else None

    def after(self, c: int) -> list[str]:
        """The values a run from starting point ``c`` makes that cross a later one."""
        return sorted({v for c2, vs in self.cross.items() if c2 > c for v in vs if self.made[v] >= c})

    def run(self, c: int, arrays: dict[str, np.ndarray], key=None) -> list[list[np.ndarray]]:
        """The outputs on every feed of the model fed ``arrays`` (the watched
        inputs), run from starting point ``c``; with a ``key``, the values it
        makes that cross later starting points are kept under it (see :meth:`rebase`)."""
        extra = self.after(c) if key is not None else []
        names = self.outputs + [v for v in extra if v not in self.outputs]  # a graph output may cross too
        if (c, bool(extra)) not in self.sessions:
            self.sessions[(c, bool(extra))] = self._session(c, names if extra else None)
        sess, ins = self.sessions[(c, bool(extra))]
        self.runs += 1
        self.last_start = c
        out, made = [], []
        for fd, held in zip(self.feeds, self.held[c]):
            every = {**fd, **arrays, **held}
            got = dict(zip(names, sess.run(names, {k: every[k] for k in ins})))
            out.append([got[o] for o in self.outputs])
            made.append({v: got[v] for v in extra})
        if extra:
            self.recent.pop(key, None)
            self.recent[key] = (c, made)
            size = lambda e: sum(a.nbytes for d in e[1] for a in d.values())  # noqa: E731
            while sum(size(e) for e in self.recent.values()) > self.recent_budget:
                del self.recent[next(iter(self.recent))]  # the oldest first
        return out

    def _session(self, c: int, outputs: list[str] | None = None):
        """A session of the nodes from ``c`` on (those ``outputs``, default the
        graph's, need), fed the values crossing ``c``."""
        src = self.proto.graph
        p = onnx.ModelProto()
        p.CopyFrom(self.proto)
        g = p.graph
        del g.node[:]
        g.node.extend(src.node[c:])
        example = self.held[c][0]
        g.input.extend(helper.make_tensor_value_info(v, helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim)
                       for v, a in example.items())
        run = outputs is None or outputs[: len(self.outputs)] == self.outputs
        outputs = self.outputs if outputs is None else outputs
        ext = _trim(p, outputs, self.externals)
        need = {v for n in g.node for v in _node_reads(n)} | set(outputs)
        ins = [i for i in g.input if i.name in need]
        del g.input[:]
        g.input.extend(ins)
        # many sessions live at once, each run now and then: no arena kept at its largest run's size
        sess = self._made(p, ext, mem_pattern=run, arena=False)
        return sess, [i.name for i in sess.get_inputs()]


__all__ = ["Frontier", "Resume", "capture", "channel_sums", "exposed"]

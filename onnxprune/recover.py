"""Closed-form recovery after pruning, without labels.

Every *consumer of pruned channels* (a Conv, Gemm or MatMul with a constant
weight whose input axis lost channels) is re-fitted, layer by layer in graph
order, so that from its **kept** inputs it reproduces what the **original**
layer produced on its surviving outputs:

* ``bias``: keep the weights, move the bias to the least-squares optimum
  ``b' = b + mean(Y_orig - Y_pruned)``. When the layer's inputs are unchanged
  this is exactly the mean contribution of the removed channels (``W_R E[x_R]``)
  folded into the bias; it also absorbs the mean drift of upstream layers.
* ``stats``: per output channel, rescale weights and bias so the pruned
  layer's output has the original's mean and standard deviation (what
  re-estimating a BatchNorm does; exporters fold BatchNorm into the Conv).
* ``ridge``: a full least-squares re-fit of weights and bias, the next-layer
  reconstruction of He et al., *Channel Pruning for Accelerating Very Deep
  Neural Networks* (ICCV 2017) and Luo et al., *ThiNet* (ICCV 2017), in closed
  form: ``min ||[X 1] W - Y||^2 + lam ||W - W0||^2`` (the bias row unpenalised),
  ``lam = ridge * trace(X^T X) / d``. Shrinking towards the pruned weights
  ``W0`` (not towards zero) means the re-fit never does worse than ``W0`` on
  the calibration data and stays close to it where the data say little.

A Conv is a linear regression over sampled output positions: the rows are
im2col patches of the kept input channels (per group for grouped convs), the
columns the layer's output channels. Gemm (``transA``/``transB``, ``alpha``/
``beta``) and MatMul are regressions on their input rows; a 3-D MatMul input
(tokens) is flattened to rows. A MatMul's bias is the constant of the ``Add``
that follows it; a MatMul without one gets a new ``Add`` when its bias moves.

``X`` comes from the pruned model **as already re-fitted** (earlier layers'
fixes are in place, so errors do not compound); ``Y`` from the original
model, restricted to the surviving output channels. Consumers are processed in
*levels*: a consumer's level is one more than the highest level of any
consumer upstream of it, so the consumers of one level are independent.
Calibration is sequential (:class:`onnxprune.runtime.capture.Frontier`): each
model runs once in all, level by level, from the activations the previous
level left (spilled to memory-mapped files past a memory budget), so the cost
grows with the depth, not with its square. ``[X 1]^T [X 1]``, ``[X 1]^T Y``
are accumulated in float64 per fold of calibration *sources*.

What generalises is decided on data the fit did not see. Samples of one
source (a ``source`` array in the calibration ``.npz``, else groups of
look-alike images: crops of one photo) always fall in the same fold. The
ridge strength of each layer is chosen by 2-fold cross-validation over
sources, and a fit that does not beat the pruned weights on held-out sources
is not applied (shrinking towards ``W0`` *is* the ridge). A quarter of the
sources (when there are at least 8) is kept out of every fit: on it the whole
recovered model is compared with the pruned one, and if it is further from
the original there, the pruned model is returned.

Layers that cannot be handled are skipped with a reason in the rows; a fit
that does not lower the layer's reconstruction error on the calibration data
is not applied; the result is checked with ``onnx.checker`` (full check) and an
ORT run, and if that fails the pruned model is returned unchanged.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune import io
from onnxprune.report import Progress
from onnxprune.runtime import session
from onnxprune.runtime.capture import Frontier

log = logging.getLogger(__name__)

METHODS = ("bias", "stats", "ridge")


@dataclass
class LayerRow:
    """One consumer of pruned channels. Errors are relative reconstruction errors
    ``||Y_hat - Y||_F / ||Y||_F`` of this layer's output on the calibration
    samples, with this layer's inputs taken from the (already re-fitted) pruned
    model: ``err_before`` with the pruned weights, ``err_after`` with the new
    ones. ``status``: ``refit`` (applied), ``kept`` (fitted, not better: pruned
    weights kept), ``skipped`` (not handled; see ``reason``)."""

    node: str
    op: str
    status: str
    method: str = ""
    reason: str = ""
    level: int = -1
    inputs_kept: str = ""  # e.g. "55/64"
    outputs_kept: str = ""
    features: int = 0
    samples: int = 0
    err_before: float | None = None
    err_after: float | None = None
    ridge: float | None = None  # the ridge strength used (chosen on held-out sources)
    held_before: float | None = None  # the same errors on held-out sources (cross-validated)
    held_after: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- graph helpers


class _Graph:
    """Name-indexed view of a ModelProto that is edited in place."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.g = proto.graph
        self.refresh()

    def refresh(self) -> None:
        g = self.g
        self.nodes = {n.name: n for n in g.node if n.name}
        self.inits = {t.name: t for t in g.initializer}
        self.uses: dict[str, list] = defaultdict(list)
        for n in g.node:
            for i, v in enumerate(n.input):
                if v:
                    self.uses[v].append((n, i))
        self.outputs = {o.name for o in g.output}
        inits = set(self.inits)
        self.inputs = [i.name for i in g.input if i.name not in inits]

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def set_const(self, node, slot: int, arr: np.ndarray, tag: str) -> None:
        """Write ``arr`` into ``node``'s input ``slot``, un-sharing the initializer
        if anything else reads it (or adding the input if the slot is empty)."""
        arr = np.ascontiguousarray(arr.astype(np.float32))
        name = node.input[slot] if slot < len(node.input) else ""
        shared = name and (len(self.uses.get(name, [])) > 1 or name in self.outputs or name in self.inputs)
        if name and not shared and name in self.inits:
            self.inits[name].CopyFrom(numpy_helper.from_array(arr, name))
            return
        new = self._fresh(f"{node.name or name}__{tag}")
        self.g.initializer.append(numpy_helper.from_array(arr, new))
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = new
        self.refresh()

    def _fresh(self, base: str) -> str:
        taken = set(self.inits) | {v for n in self.g.node for v in list(n.input) + list(n.output)}
        name = base
        while name in taken:
            name += "_"
        return name

    def insert_bias_add(self, node, bias: np.ndarray) -> None:
        """``node``'s output ``y`` becomes ``Add(y', bias)``: downstream names unchanged."""
        out = node.output[0]
        mid = self._fresh(f"{out}__pre_bias")
        bname = self._fresh(f"{node.name}__recover_bias")
        self.g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias.astype(np.float32)), bname))
        node.output[0] = mid
        add = helper.make_node("Add", [mid, bname], [out], name=self._fresh(f"{node.name}__recover_bias_add"))
        # rebuild the node list (NodeProto references held elsewhere go stale:
        # callers look nodes up by name)
        nodes = []
        for n in self.g.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            nodes.append(c)
            if n.name == node.name:
                nodes.append(add)
        del self.g.node[:]
        self.g.node.extend(nodes)
        self.refresh()


# --------------------------------------------------------------------------- one consumer


@dataclass
class _Fit:
    """A re-fittable consumer: how to turn activations into regression rows and
    how to write the result back."""

    row: LayerRow
    node: onnx.NodeProto  # in the working (pruned) proto at planning time; look up by name after edits
    x_name: str  # its data input in the pruned model
    y_name: str  # the matching output in the original model
    kept_out: np.ndarray  # surviving output channels, as indices of the original's
    groups: list  # per group: (input channel slice, output channel slice) of the pruned layer
    w0: list  # per group: [d+1, m] pruned weights with the bias as last row
    kind: str  # "conv" | "dense"
    conv: dict = field(default_factory=dict)
    dense: dict = field(default_factory=dict)
    bias_add: str | None = None  # MatMul: name of the Add holding its bias
    G: list = field(default_factory=list)
    C: list = field(default_factory=list)
    yy: list = field(default_factory=list)  # per group, per output channel sum of Y^2
    n: int = 0
    folds: dict = field(default_factory=dict)  # fold -> (G, C, yy) lists: the same statistics per fold of sources


def _kept_maps(ctx, keep):
    """node name -> list of (slot, axis, kept, width) for IN and OUT members."""
    from onnxprune.core.members import IN, OUT

    ins, outs = defaultdict(list), defaultdict(list)
    for m in ctx.tensors:
        if m.role not in (IN, OUT) or m.space.size is None:
            continue
        k = ctx.table.kept(m.space, keep)
        (ins if m.role == IN else outs)[m.node.name].append((m.slot, m.axis, k, m.space.size, m.node.op_type))
    return ins, outs


def _levels(g: _Graph, names: set[str]) -> dict[str, int]:
    """Level of each consumer: 1 + the highest level of a consumer upstream of it."""
    lv: dict[str, int] = {}
    out: dict[str, int] = {}
    for n in g.g.node:
        up = max((lv.get(v, -1) for v in n.input if v), default=-1)
        if n.name in names:
            out[n.name] = up + 1
            up = up + 1
        for o in n.output:
            lv[o] = up
    return out


def _conv_geometry(g: _Graph, node, w: np.ndarray) -> dict | str:
    if w.ndim != 4:
        return "only 2-D convolutions are re-fitted"
    auto = g.attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return dict(k=tuple(w.shape[2:]), s=list(g.attr(node, "strides", [1, 1])), d=list(g.attr(node, "dilations", [1, 1])),
                pads=list(g.attr(node, "pads", [0, 0, 0, 0])), auto=auto)


def _pads(geo: dict, hw) -> list[int]:
    if geo["auto"] in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i, (size, k, s, d) in enumerate(zip(hw, geo["k"], geo["s"], geo["d"])):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            lo = total // 2 if geo["auto"] == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + 2] = lo, total - lo
        return pads
    return [0, 0, 0, 0] if geo["auto"] == "VALID" else geo["pads"]


def _plan_fit(g: _Graph, orig: _Graph, name: str, ins, outs, max_features: int, method: str) -> _Fit | LayerRow:
    node = g.nodes.get(name)
    op = node.op_type if node is not None else "?"
    row = LayerRow(node=name, op=op, status="skipped", method=method)
    if node is None:
        row.reason = "node not found in the pruned model"
        return row
    if name not in orig.nodes:
        row.reason = "node not found in the original model (unnamed or renamed)"
        return row
    io_in = ins[name]
    row.inputs_kept = ", ".join(f"{len(k)}/{w}" for _, _, k, w, _ in io_in)
    if op not in ("Conv", "Gemm", "MatMul"):
        row.reason = f"{op} is not re-fitted (only Conv, Gemm, MatMul)"
        return row
    wslot = 1
    if any(s != 1 for s, *_ in io_in):
        row.reason = "the constant is the first operand"
        return row
    w = g.const(node.input[1]) if len(node.input) > 1 else None
    if w is None or g.const(node.input[0]) is not None:
        row.reason = "weight is not a constant initializer (or the data input is)"
        return row
    if w.dtype != np.float32:
        row.reason = f"weight dtype {w.dtype} (only float32)"
        return row
    y_node = orig.nodes[name]
    # surviving output channels (indices of the original's output axis)
    out_axis = {"Conv": 0, "Gemm": 0 if g.attr(node, "transB", 0) else 1, "MatMul": w.ndim - 1}[op]
    ko = [(k, wd) for s, a, k, wd, _ in outs.get(name, []) if s == wslot and a == out_axis]
    width_now = w.shape[out_axis]
    kept_out, width0 = ko[0] if ko else (np.arange(width_now), width_now)
    if len(kept_out) != width_now:
        row.reason = f"kept outputs ({len(kept_out)}) do not match the pruned weight ({width_now})"
        return row
    row.outputs_kept = f"{len(kept_out)}/{width0}"
    fit_kw = dict(row=row, node=node, x_name=node.input[0], y_name=y_node.output[0], kept_out=np.asarray(kept_out))
    if op == "Conv":
        grp = int(g.attr(node, "group", 1))
        m, cpg = w.shape[:2]
        if m % grp:
            row.reason = "group does not divide the output channels"
            return row
        geo = _conv_geometry(g, node, w)
        if isinstance(geo, str):
            row.reason = geo
            return row
        b = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(m, np.float32)
        if b is None:
            row.reason = "Conv bias is not a constant"
            return row
        if cpg == 1 and grp > 1:
            row.reason = "depthwise: one input per output channel (re-fitting it did not generalise on held-out data in our runs)"
            return row
        mpg = m // grp
        groups, w0 = [], []
        for gi in range(grp):
            osl = slice(gi * mpg, (gi + 1) * mpg)
            groups.append((slice(gi * cpg, (gi + 1) * cpg), osl))
            w0.append(np.vstack([w[osl].reshape(mpg, -1).T, b[osl][None]]).astype(np.float64))
        d = cpg * w.shape[2] * w.shape[3]
        if d + 1 > max_features:
            row.reason = f"{d} features per group exceed max_features={max_features}"
            return row
        row.features = d
        return _Fit(groups=groups, w0=w0, kind="conv", conv=geo, **fit_kw)
    if op == "Gemm":
        ta, tb = int(g.attr(node, "transA", 0)), int(g.attr(node, "transB", 0))
        alpha, beta = float(g.attr(node, "alpha", 1.0)), float(g.attr(node, "beta", 1.0))
        W = (w.T if tb else w) * alpha  # [K, N]
        n_out = W.shape[1]
        if len(node.input) > 2 and node.input[2]:
            c = g.const(node.input[2])
            if c is None:
                row.reason = "Gemm C is not a constant"
                return row
            if c.size not in (1, n_out) or (c.ndim == 2 and c.shape[0] != 1):
                row.reason = f"Gemm C of shape {list(c.shape)} is not a per-output bias"
                return row
            bias = np.broadcast_to(c.reshape(-1), (n_out,)) * beta
        else:
            bias = np.zeros(n_out)
        if beta == 0:
            row.reason = "Gemm beta is 0: no bias to move"
            return row
        if W.shape[0] + 1 > max_features:
            row.reason = f"{W.shape[0]} features exceed max_features={max_features}"
            return row
        row.features = W.shape[0]
        w0 = [np.vstack([W, bias[None]]).astype(np.float64)]
        return _Fit(groups=[(slice(None), slice(None))], w0=w0, kind="dense",
                    dense=dict(transA=ta, transB=tb, alpha=alpha, beta=beta), **fit_kw)
    # MatMul with a constant right operand
    if w.ndim != 2:
        row.reason = "MatMul weight with batch dimensions"
        return row
    bias_add, bias = None, np.zeros(w.shape[1])
    users = g.uses.get(node.output[0], [])
    if len(users) == 1 and node.output[0] not in g.outputs and users[0][0].op_type == "Add" and users[0][0].name:
        add, slot = users[0]
        other = add.input[1 - slot]
        c = g.const(other)
        if c is not None and c.dtype == np.float32 and c.size == w.shape[1] and c.shape[-1] == w.shape[1] \
                and len(g.uses[other]) >= 1:
            bias_add, bias = add, c.reshape(-1)
    if w.shape[0] + 1 > max_features:
        row.reason = f"{w.shape[0]} features exceed max_features={max_features}"
        return row
    row.features = w.shape[0]
    # the target is the original MatMul's own output (before its bias Add): the
    # fitted bias row is then added to the pruned bias
    w0 = [np.vstack([w, np.zeros((1, w.shape[1]))]).astype(np.float64)]
    fit = _Fit(groups=[(slice(None), slice(None))], w0=w0, kind="dense", dense=dict(matmul=True, bias=bias), **fit_kw)
    fit.bias_add = bias_add.name if bias_add is not None else None
    return fit


# --------------------------------------------------------------------------- regression rows


def _conv_rows(fit: _Fit, x: np.ndarray, y: np.ndarray, rng, budget: int):
    """Sampled im2col rows of the kept input channels and the matching target rows."""
    geo = fit.conv
    kh, kw = geo["k"]
    (sh, sw), (dh, dw) = geo["s"], geo["d"]
    pt, pl, _, _ = _pads(geo, x.shape[2:])
    B, _, Ho, Wo = y.shape
    total = B * Ho * Wo
    take = np.arange(total) if total <= budget else np.sort(rng.choice(total, budget, replace=False))
    b, rest = np.divmod(take, Ho * Wo)
    oh, ow = np.divmod(rest, Wo)
    H, W = x.shape[2:]
    hh = oh[:, None] * sh + np.arange(kh)[None] * dh - pt  # [S, kh] rows in the unpadded input
    ww = ow[:, None] * sw + np.arange(kw)[None] * dw - pl  # [S, kw]
    inside = ((hh >= 0) & (hh < H))[:, None, :, None] & ((ww >= 0) & (ww < W))[:, None, None, :]
    hh, ww = np.clip(hh, 0, H - 1), np.clip(ww, 0, W - 1)
    yk = y[b, :, oh, ow][:, fit.kept_out]  # [S, kept outputs]
    rows = []
    for isl, osl in fit.groups:
        xs = x[:, isl]
        patch = xs[b[:, None, None, None], np.arange(xs.shape[1])[None, :, None, None], hh[:, None, :, None], ww[:, None, None, :]]
        patch = np.where(inside, patch, 0)  # zero padding, without a padded copy of the input
        X = patch.reshape(len(take), -1)
        Y = yk[:, osl]
        rows.append((X, Y))
    return rows, b


def _dense_rows(fit: _Fit, x: np.ndarray, y: np.ndarray, rng, budget: int):
    if fit.dense.get("transA"):
        x = x.T
    X = x.reshape(-1, x.shape[-1])
    Y = y.reshape(-1, y.shape[-1])[:, fit.kept_out]
    if len(X) != len(Y):
        return None
    # the sample each row comes from: rows are [B, ...] flattened (tokens of a sample are consecutive)
    per = len(X) // x.shape[0] if not fit.dense.get("transA") and x.ndim > 1 and len(X) % x.shape[0] == 0 else len(X)
    sample = np.arange(len(X)) // max(per, 1)
    if len(X) > budget:
        take = np.sort(rng.choice(len(X), budget, replace=False))
        X, Y, sample = X[take], Y[take], sample[take]
    return [(X, Y)], sample


def _accumulate(fit: _Fit, rows, fold: np.ndarray) -> None:
    """Add the regression rows to the layer's statistics, per fold of sources
    (``fold``: the fold of each row); the totals are the sums over folds."""
    for k in np.unique(fold):
        sel = fold == k
        G, C, yy = fit.folds.setdefault(int(k), ([], [], []))
        for gi, (X, Y) in enumerate(rows):
            Xa = np.empty((int(sel.sum()), X.shape[1] + 1))
            Xa[:, :-1] = X[sel]
            Xa[:, -1] = 1.0
            Yk = Y[sel].astype(np.float64)
            if len(G) <= gi:
                G.append(np.zeros((Xa.shape[1], Xa.shape[1])))
                C.append(np.zeros((Xa.shape[1], Yk.shape[1])))
                yy.append(np.zeros(Yk.shape[1]))
            G[gi] += Xa.T @ Xa
            C[gi] += Xa.T @ Yk
            yy[gi] += (Yk * Yk).sum(0)
    fit.n += len(fold)


def _totals(fit: _Fit) -> None:
    """``fit.G, fit.C, fit.yy``: the statistics of all folds together."""
    parts = list(fit.folds.values())
    fit.G = [sum(p[0][gi] for p in parts) for gi in range(len(parts[0][0]))]
    fit.C = [sum(p[1][gi] for p in parts) for gi in range(len(parts[0][1]))]
    fit.yy = [sum(p[2][gi] for p in parts) for gi in range(len(parts[0][2]))]


def _ridge(G, C, W0, lam_rel: float):
    d = G.shape[0] - 1
    lam = lam_rel * np.trace(G[:d, :d]) / max(d, 1)
    D = np.ones(d + 1)
    D[-1] = 0.0
    A = G + lam * np.diag(D)
    rhs = C + lam * D[:, None] * W0
    try:
        W = np.linalg.solve(A, rhs)
        if not np.all(np.isfinite(W)):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        W = np.linalg.lstsq(A, rhs, rcond=None)[0]
    return W


def _select(fit: _Fit, ridge: float) -> tuple[float | None, float, float]:
    """Choose the ridge strength by cross-validation over folds of *sources*:
    fit on the other folds, measure on each in turn. Returns ``(strength,
    held-out error of the pruned weights, held-out error of the fit)`` (sums of
    squares); ``strength`` is None with fewer than two folds."""
    folds = list(fit.folds.values())
    base = sum(_sq_err(Gv, Cv, yv, W0) for Gk, Ck, yk in folds for Gv, Cv, yv, W0 in zip(Gk, Ck, yk, fit.w0))
    if len(folds) < 2:
        return None, base, base
    errs: dict[float, float] = {}

    def cv(lam: float) -> float:
        if lam not in errs:
            errs[lam] = sum(_sq_err(Gv, Cv, yv, _ridge(G - Gv, C - Cv, W0, lam))
                            for Gk, Ck, yk in folds
                            for G, C, W0, Gv, Cv, yv in zip(fit.G, fit.C, fit.w0, Gk, Ck, yk))
        return errs[lam]

    # coarse to fine over powers of ten around the given strength (each
    # evaluation is a solve per fold: the cost of recovery on wide layers)
    lo, hi = ridge * 1e-4, max(ridge * 1e3, 10.0)
    for lam in (ridge * 1e-2, ridge, ridge * 1e2):
        cv(lam)
    while True:
        best = min(errs, key=errs.get)
        step = [v for v in (best / 10, best * 10) if lo * 0.999 <= v <= hi * 1.001 and v not in errs]
        if not step:
            break
        for v in step:
            cv(v)
        if min(errs, key=errs.get) == best:
            break
    lam = min(errs, key=errs.get)
    if errs[ridge] <= errs[lam] * 1.01 + 1e-30:
        lam = ridge  # the given strength unless another is clearly better
    return lam, base, errs[lam]


def _folds(feeds: list[dict], sources, seed: int, k: int = 2, reserve: float = 0.0) -> list[np.ndarray]:
    """Per batch, the cross-validation fold of each sample, or -1 for the
    samples kept out of every fit to check the whole model (``reserve``: that
    fraction of the sources, when there are at least 8). Samples of one source
    (``sources``: per batch, an id per sample) share a fold; without sources
    every sample is its own."""
    sizes = [len(next(iter(fd.values()))) for fd in feeds]
    if sources is None:
        sources = [np.arange(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
    ids = np.random.default_rng(seed).permutation(np.unique(np.concatenate([np.asarray(s).reshape(-1) for s in sources])))
    n_out = int(round(len(ids) * reserve)) if len(ids) >= 8 else 0
    fold = {v: (-1 if i < n_out else (i - n_out) % k) for i, v in enumerate(ids.tolist())}
    return [np.array([fold[v] for v in np.asarray(s).reshape(-1).tolist()], int) for s in sources]


def _outputs(proto: onnx.ModelProto, feeds: list[dict], threads: int) -> list[list[np.ndarray]]:
    sess = session(proto, threads)
    return [sess.run(None, fd) for fd in feeds]


def held_out_check(original, pruned, recovered, feeds: list[dict], fold_of: list[np.ndarray], threads: int) -> dict | None:
    """The whole model on the samples no fit saw (fold -1): relative error of
    the outputs against the original's (all outputs, per sample on axis 0) and,
    for a ``[N, classes]`` first output, top-1 agreement, for the pruned and the
    recovered model, and ``worse``: whether recovery moved the model away from
    the original there (by KL for logits, else by the output error). None when
    no sample was kept out."""
    if not any(np.any(f < 0) for f in fold_of):
        return None
    first = [d for i in original.graph.input[:1] for d in i.type.tensor_type.shape.dim[:1]]
    if not (first and first[0].dim_value > 0):  # a dynamic batch: run the kept-out samples only
        feeds = [{k: v[f < 0] for k, v in fd.items()} for fd, f in zip(feeds, fold_of) if np.any(f < 0)]
        fold_of = [np.full(int(np.sum(f < 0)), -1) for f in fold_of if np.any(f < 0)]
    ref, outs = _outputs(original, feeds, threads), {"pruned": _outputs(pruned, feeds, threads),
                                                    "recovered": _outputs(recovered, feeds, threads)}
    res = {"samples": int(sum(int(np.sum(f < 0)) for f in fold_of))}
    for name, got in outs.items():
        num = den = 0.0
        agree, total, kl = 0, 0, 0.0
        for r_b, g_b, f in zip(ref, got, fold_of):
            sel = f < 0
            for k, (r, g) in enumerate(zip(r_b, g_b)):
                if r.ndim == 0 or r.shape[0] != len(f) or r.shape != g.shape:
                    continue
                r, g = r[sel].astype(np.float64), g[sel].astype(np.float64)
                num += float(((g - r) ** 2).sum())
                den += float((r**2).sum())
                if k == 0 and r.ndim == 2 and r.shape[1] > 1:  # logits: agreement and KL(original || model)
                    agree += int((r.argmax(1) == g.argmax(1)).sum())
                    total += len(r)
                    lr, lg = _log_softmax(r), _log_softmax(g)
                    kl += float((np.exp(lr) * (lr - lg)).sum())
        res[f"err_{name}"] = float(np.sqrt(num / max(den, 1e-30)))
        if total:
            res[f"agree_{name}"] = 100.0 * agree / total
            res[f"kl_{name}"] = kl / total
    # the verdict: KL for a classifier's logits, else the relative output error
    key = "kl" if "kl_pruned" in res else "err"
    res["worse"] = bool(res[f"{key}_recovered"] > res[f"{key}_pruned"])
    return res


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


# --------------------------------------------------------------------------- solvers


def _sq_err(G, C, yy, W) -> float:
    """sum ||[X 1] W - Y||^2 from the accumulated statistics."""
    return float(max(yy.sum() - 2 * np.sum(W * C) + np.sum(W * (G @ W)), 0.0))


def _solve(fit: _Fit, method: str, ridge: float) -> list:
    out = []
    for G, C, yy, W0 in zip(fit.G, fit.C, fit.yy, fit.w0):
        n = G[-1, -1]
        if method == "bias":
            W = W0.copy()
            W[-1] += (C[-1] - G[-1] @ W0) / n
        elif method == "stats":
            # per output channel: match the original's mean and std
            s_p = G[-1] @ W0  # sum of pruned outputs
            ss_p = np.einsum("ij,ij->j", W0, G @ W0)
            s_y = C[-1]
            mu_p, mu_y = s_p / n, s_y / n
            sd_p = np.sqrt(np.maximum(ss_p / n - mu_p**2, 0))
            sd_y = np.sqrt(np.maximum(yy / n - mu_y**2, 0))
            a = np.where(sd_p > 1e-12, sd_y / np.maximum(sd_p, 1e-12), 1.0)
            a = np.clip(a, 0.1, 10.0)
            W = W0 * a[None]
            W[-1] += mu_y - a * mu_p
        else:
            W = _ridge(G, C, W0, ridge)
        out.append(W)
    return out


def _write_back(g: _Graph, fit: _Fit, Ws: list) -> None:
    node = g.nodes[fit.row.node]
    if fit.kind == "conv":
        w = g.const(node.input[1])
        m = w.shape[0]
        new_w = np.empty_like(w)
        new_b = np.empty(m, np.float64)
        for (isl, osl), W in zip(fit.groups, Ws):
            mg = new_w[osl].shape[0]
            new_w[osl] = W[:-1].T.reshape(mg, *w.shape[1:])
            new_b[osl] = W[-1]
        g.set_const(node, 1, new_w, "recovered_w")
        g.set_const(node, 2, new_b, "recovered_b")
        return
    W = Ws[0]
    if fit.dense.get("matmul"):
        g.set_const(node, 1, W[:-1], "recovered_w")
        bias = fit.dense["bias"] + W[-1]
        if fit.bias_add is not None:
            add = g.nodes[fit.bias_add]
            slot = 1 if add.input[0] == node.output[0] else 0
            c = g.const(add.input[slot])
            g.set_const(add, slot, bias.reshape(c.shape), "recovered_b")
        elif np.any(W[-1] != 0):
            g.insert_bias_add(node, W[-1])
        return
    tb, alpha, beta = fit.dense["transB"], fit.dense["alpha"], fit.dense["beta"]
    Wk = W[:-1] / alpha
    g.set_const(node, 1, Wk.T if tb else Wk, "recovered_w")
    bias = W[-1] / beta
    if len(node.input) > 2 and node.input[2]:
        c = g.const(node.input[2])
        bias = bias.reshape(c.shape) if c.size == bias.size else bias.reshape(1, -1) if c.ndim == 2 else bias
    g.set_const(node, 2, bias, "recovered_b")


# --------------------------------------------------------------------------- driver


def consumers(ctx, keep) -> list[str]:
    """Names of the nodes that read pruned channels (an IN member whose kept list
    is shorter than its axis), in graph order."""
    from onnxprune.core.members import IN

    seen: dict[str, None] = {}
    for m in ctx.tensors:
        if m.role == IN and m.space.size is not None and len(ctx.table.kept(m.space, keep)) < m.space.size:
            seen.setdefault(m.node.name, None)
    order = {n.name: i for i, n in enumerate(ctx.graph)}
    return sorted(seen, key=lambda n: order.get(n, 1 << 30))


def downstream(ctx, keep) -> list[str]:
    """Names of every linear layer (Conv, Gemm, MatMul with a constant weight)
    whose input the pruning changed: the consumers of pruned channels and every
    linear layer after them in data flow (their inputs drift with the pruned
    model's activations), in graph order."""
    from onnxprune.core.members import IN, OUT

    touched, reads = set(), set()
    for m in ctx.tensors:
        if m.role in (IN, OUT) and m.space.size is not None and len(ctx.table.kept(m.space, keep)) < m.space.size:
            touched.add(m.node.name)
            if m.role == IN:
                reads.add(m.node.name)
    changed: set = set()  # values whose contents differ from the original's
    out = []
    for n in ctx.graph:
        hit = n.name in touched or any(v is not None and v.name in changed for v in n.inputs)
        if not hit:
            continue
        changed.update(v.name for v in n.outputs)
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.inputs) > 1 and n.inputs[1] is not None \
                and (n.inputs[1].const_value is not None or n.inputs[1].producer() is not None
                     and n.inputs[1].producer().op_type == "DequantizeLinear"):
            if n.name in reads or (n.inputs[0] is not None and n.inputs[0].name in changed):
                out.append(n.name)
    return out


def recover(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    ctx,
    keep: dict,
    batches,
    method: str = "ridge",
    ridge: float = 1e-2,
    rows_per_batch: int = 4096,
    max_features: int = 8192,
    threads: int = 0,
    seed: int = 0,
    progress: bool = True,
    validate: bool = True,
    layers: str = "all",
    ridge_select: bool = True,
    frontier_bytes: int = 2 << 30,
    check_fraction: float = 0.25,
    stats: dict | None = None,
) -> tuple[onnx.ModelProto, list[LayerRow]]:
    """Re-fit every consumer of pruned channels in closed form; no labels.

    ``original``: the unpruned model (any form; nodes are matched by name).
    ``pruned``: ``PruneResult.proto``; ``ctx``: ``PruneResult.analyzed.ctx``;
    ``keep``: ``PruneResult.plan.keep``. ``batches``: a
    :class:`~onnxprune.importance.calib.Calibration` (labels are ignored), or a
    list of input arrays ``[B, ...]`` or of feed dicts. ``method``: ``bias``, ``stats``
    or ``ridge`` (see the module doc). ``ridge``: regularisation relative to
    the mean diagonal of the Gram matrix. ``rows_per_batch``: regression rows
    sampled per batch and layer (output positions of a Conv, tokens of a
    MatMul). ``frontier_bytes``: activations held in memory between levels
    (the rest spill to memory-mapped files). ``stats``: a dict filled with the
    time split (``run_s``: ORT passes, ``fit_s``: statistics and solves) and
    the number of ORT passes. Returns the new model (a copy; the inputs are not modified) and
    one :class:`LayerRow` per consumer."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    import os

    threads = threads or (os.cpu_count() or 1)
    sources = getattr(batches, "sources", None)
    batches = list(getattr(batches, "batches", batches))
    work = onnx.ModelProto()
    work.CopyFrom(pruned)
    g, og = _Graph(work), _Graph(original)
    ins, outs = _kept_maps(ctx, keep)
    if layers not in ("pruned", "all"):
        raise ValueError(f"layers must be 'pruned' or 'all', not {layers!r}")
    names = consumers(ctx, keep) if layers == "pruned" or method != "ridge" else downstream(ctx, keep)
    rows: list[LayerRow] = []
    fits: list[_Fit] = []
    for name in names:
        f = _plan_fit(g, og, name, ins, outs, max_features, method)
        if isinstance(f, LayerRow):
            rows.append(f)
        else:
            fits.append(f)
            rows.append(f.row)
    if not fits:
        return work, rows
    levels = _levels(g, {f.row.node for f in fits})
    by_level: dict[int, list[_Fit]] = defaultdict(list)
    for f in fits:
        f.row.level = levels[f.row.node]
        by_level[f.row.level].append(f)
    in_names = og.inputs

    def feeds(b):
        return b if isinstance(b, dict) else {in_names[0]: np.asarray(b, dtype=np.float32)}

    # ridge: the strength of each layer is chosen by cross-validation over
    # folds of calibration *sources* (crops of one photo are one source), and a
    # fit that does not beat the pruned weights on held-out sources is refused
    fd_list = [feeds(b) for b in batches]
    fold_of = _folds(fd_list, sources, seed, reserve=check_fraction)
    hold = method == "ridge" and ridge_select and len({int(k) for f in fold_of for k in np.unique(f) if k >= 0}) >= 2
    timing = {"run": 0.0, "fit": 0.0}
    bar = Progress("recover", len(by_level), progress)
    rng = np.random.default_rng(seed)
    # sequential calibration: each model runs once in all, level by level, from
    # the values the previous levels left (with the re-fitted weights in place)
    front_p = Frontier(work, fd_list, threads, frontier_bytes)
    front_o = Frontier(original, fd_list, threads, frontier_bytes)
    try:
        for done, lvl in enumerate(sorted(by_level), 1):
            todo = by_level[lvl]
            t0 = time.perf_counter()
            x_names = sorted({f.x_name for f in todo})
            y_names = sorted({f.y_name for f in todo})
            px, oy = front_p.get(x_names), front_o.get(y_names)
            t1 = time.perf_counter()
            timing["run"] += t1 - t0
            for bi in range(len(batches)):
                for f in todo:
                    if f.row.status == "skipped" and f.row.reason:
                        continue
                    x, y = px[f.x_name][bi], oy[f.y_name][bi]
                    try:
                        got = (_conv_rows if f.kind == "conv" else _dense_rows)(f, x, y, rng, rows_per_batch)
                    except Exception as e:  # shape surprises: skip the layer, never crash
                        got, f.row.reason = None, f"could not build regression rows: {type(e).__name__}: {e}"
                    if got is None:
                        f.row.reason = f.row.reason or "input/output shapes do not match a linear layer"
                        continue
                    rws, sample = got
                    fb = fold_of[bi][np.minimum(sample, len(fold_of[bi]) - 1)]
                    if not np.all(fb >= 0):  # samples kept out for the whole-model check
                        rws, fb = [(X[fb >= 0], Y[fb >= 0]) for X, Y in rws], fb[fb >= 0]
                    _accumulate(f, rws, fb if hold else np.zeros(len(fb), int))
            del px, oy
            bar.step(done, f"level {lvl}: {', '.join(f.row.node for f in todo)}"[:60], force=done == len(by_level) and not bar.tty)
            for f in todo:
                if f.row.reason or not f.folds:
                    f.row.status = "skipped"
                    continue
                _totals(f)
                lam, held_before, held_after = _select(f, ridge) if hold else (None, 0.0, 0.0)
                f.row.ridge = lam if lam is not None else (ridge if method == "ridge" else None)
                Ws = _solve(f, method, ridge if lam is None else lam)
                tot_y = sum(float(yy.sum()) for yy in f.yy)
                before = sum(_sq_err(G, C, yy, W) for G, C, yy, W in zip(f.G, f.C, f.yy, f.w0))
                after = sum(_sq_err(G, C, yy, W) for G, C, yy, W in zip(f.G, f.C, f.yy, Ws))
                f.row.samples = f.n
                rel = lambda e: float(np.sqrt(e / max(tot_y, 1e-30)))  # noqa: E731
                f.row.err_before, f.row.err_after = rel(before), rel(after)
                if lam is not None:
                    f.row.held_before, f.row.held_after = rel(held_before), rel(held_after)
                if not all(np.all(np.isfinite(W)) for W in Ws):
                    f.row.status, f.row.reason = "skipped", "non-finite solution"
                elif lam is not None and not held_after < held_before * (1 - 1e-6):
                    f.row.status, f.row.reason = "kept", "no ridge strength beat the pruned weights on held-out sources"
                    f.row.err_after, f.row.held_after = f.row.err_before, f.row.held_before
                elif after > before * (1 + 1e-9):
                    f.row.status, f.row.reason = "kept", "the fit did not lower the reconstruction error"
                    f.row.err_after, f.row.held_after = f.row.err_before, f.row.held_before
                else:
                    _write_back(g, f, Ws)
                    f.row.status = "refit"
                f.G, f.C, f.folds = [], [], {}  # free the Gram matrices
                f.row.seconds = (time.perf_counter() - t0) / len(todo)
            timing["fit"] += time.perf_counter() - t1
    finally:  # the spill folders go whatever happens
        front_p.close()
        front_o.close()
    timing["passes"] = front_p.passes + front_o.passes
    timing["levels"] = len(by_level)
    if stats is not None:
        stats.update(run_s=timing["run"], fit_s=timing["fit"], passes=timing["passes"], levels=timing["levels"])
    if validate:
        try:
            onnx.checker.check_model(work, full_check=True)
            session(work, threads).run(None, feeds(batches[0]))
            check = held_out_check(original, pruned, work, fd_list, fold_of, threads)
        except Exception as e:  # never hand out an invalid model
            return _reverted(pruned, rows, f"recovered model failed validation: {e}")
        if stats is not None:
            stats["held_out"] = check
        if check is not None and check["worse"]:
            return _reverted(pruned, rows, "the whole recovered model was further from the original on held-out sources")
    return work, rows


def _reverted(pruned: onnx.ModelProto, rows: list[LayerRow], reason: str) -> tuple[onnx.ModelProto, list[LayerRow]]:
    """The pruned model as it was (a copy), every applied fit marked reverted with ``reason``."""
    log.warning("%s; returning the pruned model", reason)
    back = onnx.ModelProto()
    back.CopyFrom(pruned)
    for r in rows:
        if r.status == "refit":
            r.status, r.reason = "reverted", reason
    return back, rows


def recover_result(res, original, batches, **kw) -> tuple[onnx.ModelProto, list[LayerRow]]:
    """``recover`` for an :class:`onnxprune.api.PruneResult` (what ``prune``
    returned) and the original model (a path or proto)."""
    if isinstance(original, str):
        original = io.read_proto(original)
    return recover(original, res.proto, res.analyzed.ctx, res.plan.keep, batches, **kw)


def format_rows(rows: list[LayerRow]) -> str:
    """A plain-text table of the per-layer rows (for reports and the CLI): the
    relative error of each layer's output on the calibration data, and on
    held-out sources (cross-validated) where the ridge strength was chosen."""
    head = (f"{'node':<36} {'op':<7} {'lvl':>3} {'in kept':>10} {'status':<8} {'err before':>10} {'err after':>10} "
            f"{'held-out before':>15} {'held-out after':>14}  reason")
    lines = [head]
    for r in rows:
        cell = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"{r.node[:36]:<36} {r.op:<7} {r.level:>3} {r.inputs_kept[:10]:>10} {r.status:<8} "
                     f"{cell(r.err_before):>10} {cell(r.err_after):>10} {cell(r.held_before):>15} {cell(r.held_after):>14}  {r.reason}")
    return "\n".join(lines)


__all__ = ["recover", "recover_result", "consumers", "LayerRow", "format_rows", "METHODS"]

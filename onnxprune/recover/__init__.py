"""Closed-form recovery after pruning, without labels.

Every *consumer of pruned channels* (a Conv, ConvTranspose, Gemm or MatMul with a constant
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
columns the layer's output channels. A ConvTranspose is the stride-1 Conv it
equals on its input with ``stride - 1`` zeros between neighbours (kernel
flipped, channel axes swapped); an output phase reads only its share of the
taps, so its normal equations are kept and solved per block of those taps
(:func:`onnxprune.recover.fit.tap_blocks`). Gemm (``transA``/``transB``, ``alpha``/
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

A layer whose output is added to the residual stream (``y + r``: the last
layer of a residual block) is fitted to the original's sum minus the pruned
model's ``r``, not to its own output alone: what the pruned stream lost
upstream and the earlier fits could not give back is then taken up wherever a
block can, as sequential calibration feeds errors forward (GPTQ). Only where
``r`` is final when the layer is fitted (every re-fitted layer upstream of it
is at a lower level); two branches of one ``Add`` never both correct for the other.

A layer whose output only goes through a ``Relu``, a ``Clip`` with constant
bounds, a ``HardSwish`` or a ``HardSigmoid`` (directly or through constant
per-channel steps: :func:`onnxprune.recover.graph.clamp_after`) is not asked to reproduce what the clamp hides: after its plain fit,
:data:`CLAMP_PASSES` more passes over the same rows (no ORT run, the Gram
matrices kept, the rows too within :data:`CLAMP_ROWS_BYTES`) take as target, where the original's value lies at or beyond a
bound, the previous fit's value kept on that side of it
(:func:`onnxprune.recover.fit._clamped_targets`).

What generalises is decided on data the fit did not see. Samples of one
source (a ``source`` array in the calibration ``.npz``, else groups of
look-alike images: crops of one photo) always fall in the same fold. The
ridge strength of each layer is chosen by 2-fold cross-validation over
sources (infinite strength among the candidates: the pruned weights with only
the bias re-fitted), and a fit that does not beat the pruned weights on
held-out sources is not applied (shrinking towards ``W0`` *is* the ridge). An eighth of the
sources (:data:`CHECK_FRACTION`, when there are at least 8) is kept out of the
*checked* fits: every layer is solved twice from the same statistics, once
without the kept-out rows (checked) and once with them (written; the next
levels read its outputs). The model with the checked fits is compared with
the pruned one on the kept-out sources, and if it is further from the
original there, the pruned model is returned; else the written fits stay, so
the written model has seen every photo (which sources were kept out
otherwise moves the result by several points) in one pass through the
models. The checked fits' inputs come from the written fits upstream, which
did see the kept-out rows: the check is of each layer's own fit on new
sources, not of a recovery that never met them (``refit_all=True``: that
recovery, then a second pass on every source).

The package: ``fit.py`` is the arithmetic (plain numpy: regression rows,
statistics per fold, the ridge solve and its strength), ``graph.py`` finds
what can be re-fitted and hands new weights to the rewriter (recovery edits
no model itself),
``check.py`` judges the whole recovered model on kept-out sources, and this
module drives them level by level.

Layers that cannot be handled are skipped with a reason in the rows; a fit
that does not lower the layer's reconstruction error on the calibration data
is not applied; the result is checked with ``onnx.checker`` (full check) and an
ORT run, and if that fails the pruned model is returned unchanged.
"""
from __future__ import annotations

import logging
import time
import zlib
from collections import Counter, defaultdict

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune import io
from onnxprune.core.quant import dq_node
from onnxprune.recover import attention
from onnxprune.recover.check import _reverted, held_out_check
from onnxprune.recover.fit import (LayerRow, _accumulate, _clamped_targets, _conv_rows, _dense_rows, _Fit, _folds,
                                   _select, _solve, _sq_err, _totals, finite, reset_targets)
from onnxprune.recover.graph import (_Graph, _kept_maps, _levels, _output_names, _packed_sources, _plan_fit, _residuals,
                                     _write_back, is_packed_attention)
from onnxprune.report import Progress
from onnxprune.rewrite import Journal, name_nodes, needs_names, unique_node_names
from onnxprune.runtime import session
from onnxprune.runtime.capture import Frontier

CLAMP_PASSES = 2  # passes with clamped targets after the plain fit of a layer behind a clamp (EfficientNet-Lite0
# at 70% of its MACs, KL on new photos after --recover: 1.353 without, 0.795 with one, 0.735 with two)
CLAMP_ROWS_BYTES = 1 << 30  # a level's regression rows kept for its clamp passes (past this, built again: the same
# rows, from the replayed random state)
CHECK_FRACTION = 0.125  # of the sources (with 8 or more), kept out of the checked fits for the whole-model check
# (the ViT-S with a dense decoder at 70% of its MACs, one plan, the checked fits written, Pearson per crop on new
# photos over three fold seeds: 0.891 / 0.899 / 0.897 with a quarter kept out, 0.905 / 0.899 / 0.901 with an eighth)

log = logging.getLogger(__name__)

METHODS = ("bias", "stats", "ridge")


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


def _named(original: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``original`` whose unnamed (or twice-named) nodes carry the
    names :func:`onnxprune.rewrite.name_nodes` gives the pruned model's."""
    if not needs_names(n.name for n in original.graph.node):
        return original
    p = onnx.ModelProto()
    p.CopyFrom(original)
    names = unique_node_names([(n.name, n.op_type, n.output[0] if n.output else "") for n in p.graph.node])
    for n, name in zip(p.graph.node, names):
        n.name = name
    return p


def downstream(ctx, keep) -> list[str]:
    """Names of every linear layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight,
    onnxruntime's packed-weight Attention for its q/k/v projection)
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
        if (n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") or is_packed_attention(n)) and len(n.inputs) > 1 \
                and n.inputs[1] is not None \
                and (n.inputs[1].const_value is not None or dq_node(n.inputs[1]) is not None):
            if n.name in reads or (n.inputs[0] is not None and n.inputs[0].name in changed):
                out.append(n.name)
    return out


def recover_model(
    original: onnx.ModelProto,
    model: ir.Model,
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
    check_fraction: float = CHECK_FRACTION,
    stats: dict | None = None,
    journal: Journal | None = None,
    attention_logits: bool = True,
    residual: bool = True,
    refit_all: bool | None = None,
    clamp: bool = True,
    scale_ridge: bool = True,
) -> list[LayerRow]:
    """Re-fit every consumer of pruned channels in closed form; no labels.

    ``original``: the unpruned model (any form; nodes are matched by name).
    ``model``: the pruned IR model, edited in place through the rewriter
    (:func:`onnxprune.rewrite.set_input`, :func:`~onnxprune.rewrite.add_bias_after`),
    each edit recorded in ``journal`` (a fresh one when None); when the result
    fails validation or the held-out check, every edit is undone. ``ctx``, ``keep``:
    the analysis and the plan's kept indices that made ``model``. ``batches``: a
    :class:`~onnxprune.importance.calib.Calibration` (labels are ignored), or a
    list of input arrays ``[B, ...]`` or of feed dicts. ``method``: ``bias``, ``stats``
    or ``ridge`` (see the module doc). ``ridge``: regularisation relative to
    the mean diagonal of the Gram matrix. ``rows_per_batch``: regression rows
    sampled per batch and layer (output positions of a Conv, tokens of a
    MatMul). ``frontier_bytes``: activations held in memory between levels
    (the rest spill to memory-mapped files). ``stats``: a dict filled with the
    time split (``run_s``: ORT passes, ``fit_s``: statistics and solves) and
    the number of ORT passes. ``attention_logits``: where head dims went, re-fit
    q and k jointly for the logits q.k^T (:mod:`onnxprune.recover.attention`;
    ridge only). ``residual``: a layer whose output is added to the residual
    stream (``y + r``) is fitted to the original's sum minus the pruned ``r``,
    so it also takes up what the stream lost upstream (ridge only; see
    :func:`onnxprune.recover.graph._residuals`). ``refit_all``: None (the
    default): one pass, each layer solved with and without the kept-out rows,
    the check judging the fits without them and the fits with them written;
    True: the check's pass leaves the kept-out sources out of every fit and,
    once the check has passed, recovery runs again from the pruned model on
    every source (two passes); False: that first pass is written. ``clamp``: a layer whose output only reaches a
    clamp (Relu, Clip, HardSwish, HardSigmoid; :func:`onnxprune.recover.graph.clamp_after`)
    is not asked to reproduce what that clamp hides (see
    :func:`onnxprune.recover.fit._clamped_targets`; ridge only). ``scale_ridge``: the
    strength cross-validation chose, scaled for the fit on the totals by the
    share of rows its fits trained on (:func:`onnxprune.recover.fit.train_share`). Returns one :class:`LayerRow` per consumer (and
    per joint q/k fit)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    import os

    threads = threads or (os.cpu_count() or 1)
    given = batches
    sources = getattr(batches, "sources", None)
    # a Calibration: its feed dicts for a multi-input model (token ids, masks, ...), else its first-input arrays
    batches = list(getattr(batches, "inputs", None) or getattr(batches, "batches", batches))
    journal = journal if journal is not None else Journal()
    mark = journal.mark()  # this recovery's edits come after it
    if name_nodes(model.graph):  # old exporters name no node: layers are addressed by name
        if ctx.graph is not model.graph:  # the analysis of the same pruned graph (the API's recover())
            name_nodes(ctx.graph)
        original = _named(original)
    g, og = _Graph(model), _output_names(original)
    ins, outs = _kept_maps(ctx, keep)
    if layers not in ("pruned", "all"):
        raise ValueError(f"layers must be 'pruned' or 'all', not {layers!r}")
    names = consumers(ctx, keep) if layers == "pruned" or method != "ridge" else downstream(ctx, keep)
    extra: set = set()
    if method == "ridge" and attention_logits and layers == "all":  # q/k layers that only lost head dims
        extra = set(attention.extra_layers(g, names, outs)) - set(names)
        order = {n.name: i for i, n in enumerate(g.g)}
        names = sorted(set(names) | extra, key=lambda n: order.get(n, 1 << 30))
    rows: list[LayerRow] = []
    fits: list[_Fit] = []
    packed = _packed_sources(original, names)
    for name in names:
        f = _plan_fit(g, og, name, ins, outs, max_features, method, packed=packed)
        if isinstance(f, LayerRow):
            rows.append(f)
        else:
            fits.append(f)
            rows.append(f.row)
    if not fits:
        if rows:
            top = Counter(r.reason for r in rows).most_common(1)[0]
            log.warning("--recover re-fitted no layer: %s (%d of %d layers)", top[0], top[1], len(rows))
        return rows
    levels, value_level = _levels(g, {f.row.node for f in fits})
    by_level: dict[int, list[_Fit]] = defaultdict(list)
    for f in fits:
        f.row.level = levels[f.row.node]
        by_level[f.row.level].append(f)
    # attention logits: q and k re-fitted jointly where head dims went (ridge only)
    logits = attention.plan(g, fits, original) if method == "ridge" and attention_logits else []
    # a layer whose output is added to a residual stream also takes up what the
    # pruned stream lost upstream (ridge only)
    res = _residuals(original, g, fits, levels, value_level) if method == "ridge" and residual else {}
    for f in fits:
        if f.row.node in res:
            f.row.target = "stream"
    inits = {t.name for t in original.graph.initializer}
    in_names = [i.name for i in original.graph.input if i.name not in inits]

    def feeds(b):
        return b if isinstance(b, dict) else {in_names[0]: np.asarray(b, dtype=np.float32)}

    # ridge: the strength of each layer is chosen by cross-validation over
    # folds of calibration *sources* (crops of one photo are one source), and a
    # fit that does not beat the pruned weights on held-out sources is refused
    fd_list = [feeds(b) for b in batches]
    fold_of = _folds(fd_list, sources, seed, reserve=check_fraction if validate else 0.0)  # no check: none kept out
    hold = method == "ridge" and ridge_select and len({int(k) for f in fold_of for k in np.unique(f) if k >= 0}) >= 2
    # one pass, two fits per layer: the checked one without the kept-out rows (the whole-model check runs it) and
    # the written one with them, which the next levels read (refit_all None; True: a second pass, False: the checked)
    shadow = refit_all is None and validate and any(np.any(fo < 0) for fo in fold_of)
    written: dict = {}  # layer -> (its fit, the written solution, the checked one)
    timing = {"run": 0.0, "fit": 0.0}
    bar = Progress("recover", len(by_level), progress)
    # rows are sampled per layer from its own stream: which other layers are fitted changes none of them
    rngs = {f.row.node: np.random.default_rng([seed, zlib.crc32(f.row.node.encode())]) for f in fits}
    for lg in logits:
        rngs[id(lg)] = np.random.default_rng([seed, zlib.crc32(("q.k " + lg.row.node).encode())])
    # sequential calibration: each model runs once in all, level by level, from
    # the values the previous levels left (with the re-fitted weights in place)
    pruned = io.full_proto(model) if validate else None  # the held-out check compares against it
    known = None  # the original's and the recovered model's outputs, for the whole-model check
    front_p = Frontier(model, fd_list, threads, frontier_bytes)
    front_o = Frontier(original, fd_list, threads, frontier_bytes)

    kept_rows: dict = {}  # (layer, batch) -> its regression rows, for the clamp passes of this level
    kept_bytes = [0]

    def _gather(f, bi, px, oy, anchor=None, targets_only=False, keep=False):
        """Add batch ``bi``'s regression rows of ``f`` to its statistics; ``anchor``: the weights its
        clamped targets are taken from (the previous pass's solution; None: the plain targets);
        ``targets_only``: the rows of an earlier pass again, only their targets new (from ``kept_rows``
        where ``keep`` stored them within :data:`CLAMP_ROWS_BYTES`, else built again)."""
        if f.row.status == "skipped" and f.row.reason:
            return
        got = kept_rows.get((f.row.node, bi)) if targets_only else None
        if got is None:
            got = _rows(f, bi, px, oy)
            if got is None:
                return
            size = sum(a.nbytes for r in got[0] for a in r)
            if keep and kept_bytes[0] + size <= CLAMP_ROWS_BYTES:
                kept_rows[(f.row.node, bi)] = got
                kept_bytes[0] += size
        rws, sample = got
        if anchor is not None:
            rws = _clamped_targets(f, rws, anchor)
        fb = fold_of[bi][np.minimum(sample, len(fold_of[bi]) - 1)]  # -1: kept out for the whole-model check
        with np.errstate(over="ignore", invalid="ignore"):  # overflowing activations: see finite()
            _accumulate(f, rws, fb if hold else np.where(fb >= 0, 0, -1), targets_only, out=shadow)

    def _rows(f, bi, px, oy):
        """Batch ``bi``'s regression rows of ``f`` and the sample of each (None: the layer cannot be fitted,
        said in its row)."""
        x, y = px[f.x_name][bi], oy[f.y_name][bi]
        stream = None
        if f.row.node in res:
            r, scale = res[f.row.node]
            if f.kind == "conv":
                y = _with_stream_error(f, y, oy[r][bi], px[r][bi], scale)
            else:  # added to the sampled rows only
                ok, inv = _stream_inverse(f, y, oy[r][bi], px[r][bi], scale)
                stream = (oy[r][bi], px[r][bi], inv) if ok else None
        try:
            if f.kind == "conv":
                got = _conv_rows(f, x, y, rngs[f.row.node], rows_per_batch)
            else:
                got = _dense_rows(f, x, y, rngs[f.row.node], rows_per_batch, stream, len(fold_of[bi]))
        except Exception as e:  # shape surprises: skip the layer, never crash
            got, f.row.reason = None, f"could not build regression rows: {type(e).__name__}: {e}"
        if got is None:
            f.row.reason = f.row.reason or "input/output shapes do not match a linear layer"
        return got

    try:
        for done, lvl in enumerate(sorted(by_level), 1):
            todo = by_level[lvl]
            t0 = time.perf_counter()
            streams = {res[f.row.node][0] for f in todo if f.row.node in res}
            x_names = sorted({f.x_name for f in todo} | streams)
            here = [lg for lg in logits if lg.level == lvl]
            y_names = sorted({f.y_name for f in todo} | {v for lg in here for v in (lg.q_val, lg.k_val)} | streams)
            px, oy = front_p.get(x_names), front_o.get(y_names)
            t1 = time.perf_counter()
            timing["run"] += t1 - t0
            # a layer behind a clamp: further passes over the same rows (sampled and built again the same way),
            # whose targets leave free what the clamp hides around the previous pass's solution
            two = [f for f in todo if clamp and method == "ridge" and f.clamp is not None]
            states = {f.row.node: rngs[f.row.node].bit_generator.state for f in two}
            behind = {f.row.node for f in two}
            for bi in range(len(batches)):
                for f in todo:
                    _gather(f, bi, px, oy, keep=f.row.node in behind)
                for lg in here:
                    fold = fold_of[bi] if hold else np.where(fold_of[bi] >= 0, 0, -1)
                    try:
                        attention.accumulate(lg, px[lg.fq.x_name][bi], oy[lg.fq.y_name][bi], oy[lg.fk.y_name][bi],
                                             oy[lg.q_val][bi], oy[lg.k_val][bi], fold, rngs[id(lg)], rows_per_batch,
                                             out=shadow)
                    except Exception as e:  # shape surprises: the separate fits stay, never crash
                        lg.failed = f"could not gather the q/k statistics: {type(e).__name__}: {e}"
            chosen: dict = {}  # layer -> the strength its plain fit chose: every later pass's solve, and where its
            # final choice starts from (a search per pass took a third of ResNet-50's recovery)
            for _ in range(CLAMP_PASSES):
                for f in two:
                    if f.row.reason or not f.folds or not finite(f):
                        continue
                    _totals(f)
                    if f.row.node not in chosen:
                        chosen[f.row.node] = _select(f, ridge)[0] if hold else None
                    lam = chosen[f.row.node]
                    _totals(f, out=shadow)  # the anchor: the written fit's
                    first = _solve(f, method, ridge if lam is None else lam, scale_ridge)
                    reset_targets(f)
                    rngs[f.row.node].bit_generator.state = states[f.row.node]
                    anchor = first if all(np.all(np.isfinite(W)) for W in first) else f.w0
                    f.row.target = "clamped"
                    for bi in range(len(batches)):
                        _gather(f, bi, px, oy, anchor, targets_only=True)
            kept_rows.clear()
            kept_bytes[0] = 0
            del px, oy
            bar.step(done, f"level {lvl}: {', '.join(f.row.node for f in todo)}"[:60], force=done == len(by_level) and not bar.tty)
            final: dict[str, list] = {}  # fit -> the solution to write (absent: the pruned weights stay)
            checked: dict[str, list] = {}  # ... and the one without the kept-out rows, for the check (shadow)
            for f in todo:
                if f.row.reason or not f.folds:
                    f.row.status = "skipped"
                    continue
                if not finite(f):
                    f.row.status, f.row.reason = "skipped", "activations not finite on the calibration data (overflow or NaN)"
                    f.folds = {}
                    continue
                _totals(f)
                lam, held_before, held_after = _select(f, ridge, chosen.get(f.row.node)) if hold else (None, 0.0, 0.0)
                f.row.ridge = lam if lam is not None else (ridge if method == "ridge" else None)
                if lam is not None and np.isinf(lam):  # cross-validation chose the bias alone
                    f.row.ridge, f.row.method = None, "bias"
                    f.row.reason = "bias only: no re-fit of the weights beat it on held-out sources"
                if shadow:
                    Wc = _solve(f, method, ridge if lam is None else lam, scale_ridge)
                    _totals(f, out=True)
                Ws = _solve(f, method, ridge if lam is None else lam, scale_ridge)
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
                elif f.row.node in extra:  # its inputs are unchanged: written only for the attention logits
                    f.row.status, f.row.reason = "kept", "reads unchanged inputs: re-fitted only for the attention logits"
                    f.row.err_after, f.row.held_after = f.row.err_before, f.row.held_before
                else:
                    final[f.row.node] = Ws
                    f.row.status = "refit"
                    if shadow:
                        checked[f.row.node] = Wc if all(np.all(np.isfinite(W)) for W in Wc) else f.w0
                f.G, f.C, f.folds = [], [], {}  # free the Gram matrices
                f.row.seconds = (time.perf_counter() - t0) / len(todo)
            for lg in here:
                try:
                    attention.solve(lg, final, ridge, checked if shadow else None)
                except (np.linalg.LinAlgError, ValueError) as e:  # e.g. statistics too few for a head
                    lg.row.status, lg.row.reason = "skipped", f"joint q/k fit failed: {type(e).__name__}: {e}"
                lg.folds = {}
            for f in todo:
                if f.row.node in final:
                    _write_back(g, f, final[f.row.node], journal)
                if f.row.node in final and shadow:
                    # in float32, as written (twice the weights' size, not four times)
                    written[f.row.node] = (f, [np.asarray(W, np.float32) for W in final[f.row.node]],
                                           [np.asarray(W, np.float32) for W in checked.get(f.row.node, f.w0)])
            timing["fit"] += time.perf_counter() - t1
        if validate:
            known = _final_outputs(front_o, front_p, original, model, fold_of)
    finally:  # the spill folders go whatever happens
        front_p.close()
        front_o.close()
    for lg in logits:  # each joint q/k fit right after its k layer's row
        if lg.row.reason != "no head lost dims":
            rows.insert(next(i for i, r in enumerate(rows) if r is lg.fk.row) + 1, lg.row)
    timing["passes"] = front_p.passes + front_o.passes
    timing["levels"] = len(by_level)
    if stats is not None:
        stats.update(run_s=timing["run"], fit_s=timing["fit"], passes=timing["passes"], levels=timing["levels"])
    if validate:
        work = io.full_proto(model)
        try:
            onnx.checker.check_model(work, full_check=True)
            if shadow:  # the check runs the checked fits; the written model must run too
                session(work, threads).run(None, feeds(batches[0]))
                judged = _checked_model(model, g, written, journal, mark)
                known = {"original": known["original"]} if known else None
            check = held_out_check(original, pruned, judged if shadow else work, fd_list, fold_of, threads, known)
            if check is None:  # nothing kept out: the recovered model must still run
                session(work, threads).run(None, feeds(batches[0]))
        except Exception as e:  # never hand out an invalid model
            journal.undo(mark)
            return _reverted(rows, f"recovered model failed validation: {e}")
        if stats is not None:
            stats["held_out"] = check
        if check is not None and shadow:
            check["shadow"] = True
        elif check is not None and refit_all is False:
            check["refit_all"] = False
        if check is not None and check["worse"]:
            journal.undo(mark)
            return _reverted(rows, "the whole recovered model was further from the original on held-out sources")
        if check is not None and refit_all:
            return _refit_all(original, model, ctx, keep, given, rows, journal, mark, stats, threads, feeds(batches[0]),
                              dict(method=method, ridge=ridge, rows_per_batch=rows_per_batch, max_features=max_features,
                                   threads=threads, seed=seed, progress=progress, layers=layers,
                                   ridge_select=ridge_select, frontier_bytes=frontier_bytes,
                                   attention_logits=attention_logits, residual=residual, clamp=clamp,
                                   scale_ridge=scale_ridge))
    return rows


def _checked_model(model: ir.Model, g: _Graph, written: dict, journal: Journal, mark: int) -> onnx.ModelProto:
    """The model with every layer's checked fit (the one that never saw the
    kept-out rows) in place of the written one, as a proto; ``model`` is left
    with the written fits, recorded in ``journal`` after ``mark`` (where this
    recovery's edits begin)."""
    journal.undo(mark)
    for f, _, Wc in written.values():
        _write_back(g, f, Wc, journal)
    judged = io.full_proto(model)
    journal.undo(mark)
    for f, Ws, _ in written.values():
        _write_back(g, f, Ws, journal)
    return judged


def _final_outputs(front_o: Frontier, front_p: Frontier, original: onnx.ModelProto, model: ir.Model,
                   fold_of: list[np.ndarray]) -> dict | None:
    """The original's and the recovered model's outputs on every sample, from
    the frontiers that have run both level by level (only the nodes after the
    last fitted level run now), for the whole-model check: each would
    otherwise run again from the input on the kept-out samples (a ViT-S with
    a dense decoder: about 3 s each on 2 cores). None when nothing was kept out
    or the outputs do not line up (the check then runs the models)."""
    names = [o.name for o in original.graph.output]
    if not any(np.any(f < 0) for f in fold_of) or names != [o.name for o in model.graph.outputs] \
            or len(set(names)) != len(names):
        return None
    try:
        got = {"original": front_o.get(names), "recovered": front_p.get(names)}
    except Exception:  # noqa: BLE001 - e.g. an output no node makes: the check runs the models (and judges)
        return None
    return {k: [[np.asarray(v[o][b]) for o in names] for b in range(len(fold_of))] for k, v in got.items()}


def _refit_all(original, model, ctx, keep, batches, rows, journal, mark, stats, threads, feed, kw) -> list[LayerRow]:
    """The recovery done again from the pruned model on every source (the
    kept-out ones too), after the whole-model check passed; its rows carry the
    checked pass's held-out errors where it has none of its own. Where the new
    fit fails validation, the pruned model is returned."""
    journal.undo(mark)
    t0 = time.perf_counter()
    again: dict = {}
    rows2 = recover_model(original, model, ctx, keep, batches, validate=False, check_fraction=0.0, stats=again,
                          journal=journal, refit_all=False, **kw)
    try:
        work = io.full_proto(model)
        onnx.checker.check_model(work, full_check=True)
        session(work, threads).run(None, feed)
    except Exception as e:  # never hand out an invalid model
        journal.undo(mark)
        return _reverted(rows2, f"the re-fit on every source failed validation: {e}")
    if stats is not None:
        for k in ("run_s", "fit_s", "passes"):
            stats[k] = stats.get(k, 0) + again.get(k, 0)
        stats["refit_all_s"] = time.perf_counter() - t0
        if stats.get("held_out") is not None:
            stats["held_out"]["refit_all"] = True
    return rows2


def _stream_inverse(f: _Fit, y: np.ndarray, r_orig: np.ndarray, r_pruned: np.ndarray,
                    scale: np.ndarray | None = None):
    """How what the pruned stream ``r`` lacks reaches the target of a layer
    whose output ``y`` is added to it: ``(True, inv)`` with ``inv`` the inverse
    of the layer scale between ``y`` and the sum per kept channel (None: no
    scale; channels scaled by almost nothing take up nothing), or ``(False,
    None)`` where the shapes do not line up."""
    axis = 1 if f.kind == "conv" else y.ndim - 1
    if r_orig.shape != y.shape:
        return False, None
    want = list(y.shape)
    want[axis] = len(f.kept_out)
    if list(r_pruned.shape) != want:
        return False, None
    if scale is None:
        return True, None
    if scale.size not in (1, y.shape[axis]):
        return False, None
    s = np.broadcast_to(np.reshape(scale, -1), (y.shape[axis],))[f.kept_out]
    big = np.abs(s) > 1e-3 * max(float(np.abs(s).max()), 1e-30)
    inv = np.where(big, 1.0 / np.where(big, s, 1.0), 0.0).astype(np.float32)
    shape = [1] * y.ndim
    shape[axis] = len(inv)
    return True, (inv if f.kind != "conv" else inv.reshape(shape))


def _with_stream_error(f: _Fit, y: np.ndarray, r_orig: np.ndarray, r_pruned: np.ndarray,
                       scale: np.ndarray | None = None) -> np.ndarray:
    """``y`` plus what the pruned stream ``r`` lacks (``r_orig - r_pruned`` on
    the kept channels, over the layer scale ``scale`` between ``y`` and the
    sum): the target of a layer added to a residual stream (a dense layer's
    rows get it after sampling, in :func:`fit._dense_rows`). ``y`` unchanged
    where the shapes do not line up."""
    ok, inv = _stream_inverse(f, y, r_orig, r_pruned, scale)
    if not ok:
        return y
    axis = 1 if f.kind == "conv" else y.ndim - 1
    lost = np.take(r_orig, f.kept_out, axis=axis) - r_pruned
    if inv is not None:
        lost = lost * inv
    idx = [slice(None)] * y.ndim
    idx[axis] = f.kept_out
    y = np.array(y, dtype=np.float32)
    y[tuple(idx)] += lost
    return y


def recover(original: onnx.ModelProto, pruned: onnx.ModelProto, ctx, keep: dict, batches, **kw
            ) -> tuple[onnx.ModelProto, list[LayerRow]]:
    """:func:`recover_model` on protos: ``pruned`` (``PruneResult.proto``) is
    not modified; returns the recovered model (a new proto) and the rows.
    ``ctx``: ``PruneResult.analyzed.ctx``; ``keep``: ``PruneResult.plan.keep``."""
    work = onnx.ModelProto()
    work.CopyFrom(pruned)
    model = ir.serde.deserialize_model(work)
    rows = recover_model(original, model, ctx, keep, batches, **kw)
    return io.full_proto(model), rows




def recover_result(res, original, batches, **kw) -> tuple[onnx.ModelProto, list[LayerRow]]:
    """``recover`` for an :class:`onnxprune.api.PruneResult` (what ``prune``
    returned) and the original model (a path or proto)."""
    if isinstance(original, str):
        original = io.read_proto(original)
    return recover(original, res.proto, res.analyzed.ctx, res.plan.keep, batches, **kw)


DAMAGE_IMPORTANCE = {"default": "l2", "mlp": "recon", "heads": "recon", "head_dim": "recon"}  # ranks under scope damage


def plan_defaults(ratios):
    """The ratios a recovery run plans with. Under a MACs/params budget or a
    latency target: ``scope`` ``damage`` (the budget goes where the measured
    output damage per MAC, or per predicted millisecond, saved is lowest,
    :mod:`onnxprune.plan.damage`), with ranks inside each group from
    :data:`DAMAGE_IMPORTANCE`: ``recon`` (the error left once the consumers
    are re-fitted) for a transformer's MLP units, heads and head dims, ``l2``
    for convolution channels and residual streams. On real weights and new
    data (docs/recovery.md) ``recon`` ranks kept a ViT-S's maps and a BERT
    encoder's embeddings closer to the original's after recovery than ``l2``;
    on a BN-folded CNN (channels and streams) they fit the calibration photos
    and kept fewer top-1 answers on new ones. Otherwise ``importance`` ``recon``. Fields the user
    wrote are kept. Returns the ratios (a copy) and a line saying what was
    defaulted ("" when nothing)."""
    from onnxprune.plan import Ratios

    r = Ratios(**{**ratios.__dict__})
    said = []
    if "scope" not in ratios.given and (ratios.target is not None or ratios.target_latency is not None):
        r.scope = "damage"
    if "importance" not in ratios.given:
        if r.scope == "damage":
            r.importance = dict(DAMAGE_IMPORTANCE)
            said.append(f"importance {importance_text(r.importance)}")
        else:
            r.importance = "recon"
            said.append("importance recon")
    if r.scope != ratios.scope:
        said.append(f"scope {r.scope}")
    return r, ("--recover: " + ", ".join(said) + " (set them in the ratios to override)") if said else ""


def importance_text(spec) -> str:
    """``{"default": "l2", "mlp": "recon", "heads": "recon"}`` as ``l2 (mlp, heads: recon)``."""
    if not isinstance(spec, dict):
        return str(spec)
    other: dict[str, list[str]] = {}
    for kind, crit in spec.items():
        if kind != "default" and crit != spec.get("default", "l2"):
            other.setdefault(crit, []).append(kind)
    rest = "; ".join(f"{', '.join(kinds)}: {crit}" for crit, kinds in other.items())
    return spec.get("default", "l2") + (f" ({rest})" if rest else "")


def held_out_text(h) -> str:
    """One line on the whole model against the original on calibration sources no fit saw."""
    if not h:
        return "held-out check: fewer than 8 calibration sources, none kept out (the per-layer held-out errors still apply)"
    if h.get("outputs") == 0:
        return ("held-out check: no float output holds the samples on one axis, nothing compared (the per-layer "
                "held-out errors still apply)")
    agree = (f"; top-1 agreement {h['agree_pruned']:.1f}% -> {h['agree_recovered']:.1f}%, "
             f"KL {h['kl_pruned']:.3g} -> {h['kl_recovered']:.3g}" if "agree_pruned" in h else "")
    kept = " (worse: kept the pruned weights)" if h["worse"] else ""
    again = ("; the written fits also learnt from the kept-out sources (the checked ones, without them, are "
             "what this judges)" if h.get("shadow") else "; then recovered again on every source"
             if h.get("refit_all") else "; the written fits never saw the kept-out sources" if h.get("refit_all") is False
             else "")
    odd = (f"; the original's own outputs were not finite in {h['nonfinite']} values (overflow on these inputs?), "
           "compared without them" if h.get("nonfinite") else "")
    saw = "the checked fits never saw" if h.get("shadow") else "no fit saw"
    return (f"held-out check ({h['samples']} samples from sources {saw}): output error vs the original "
            f"{h['err_pruned']:.4f} pruned -> {h['err_recovered']:.4f} recovered{agree}{kept}{again}{odd}")


def format_rows(rows: list[LayerRow]) -> str:
    """A plain-text table of the per-layer rows (for reports and the CLI): the
    relative error of each layer's output on the calibration data, and on
    held-out sources (cross-validated) where the ridge strength was chosen; a
    ``*`` marks the layers fitted to the residual sum (their errors are of that target), a ``^``
    those fitted to what passes the clamp after them."""
    w = max([7] + [len(r.op) for r in rows])
    head = (f"{'node':<36} {'op':<{w}} {'lvl':>3} {'in kept':>10} {'status':<8} {'err before':>10} {'err after':>10} "
            f"{'held-out before':>15} {'held-out after':>14}  reason")
    lines = [head]
    stream = clamped = False
    for r in rows:
        cell = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        mark = {"stream": "*", "clamped": "^"}.get(r.target, " ") if r.status != "skipped" else " "
        stream |= mark == "*"
        clamped |= mark == "^"
        lines.append(f"{r.node[:36]:<36} {r.op:<{w}} {r.level:>3} {r.inputs_kept[:10]:>10} {r.status:<8}"
                     f"{mark}{cell(r.err_before):>10} {cell(r.err_after):>10} {cell(r.held_before):>15} {cell(r.held_after):>14}  {r.reason}")
    if stream:
        lines.append("* fitted to the original's residual sum minus the pruned stream (takes up what the stream lost upstream)")
    if clamped:
        lines.append("^ fitted to what passes the clamp after it (Relu, Clip, HardSwish, HardSigmoid; errors of those targets)")
    return "\n".join(lines)


__all__ = ["recover", "recover_model", "recover_result", "plan_defaults", "held_out_text", "consumers", "LayerRow", "format_rows", "METHODS"]

"""The whole recovered model judged on calibration sources no fit saw."""
from __future__ import annotations

import logging
import math

import numpy as np
import onnx

from onnxprune.recover.fit import LayerRow
from onnxprune.runtime import session

log = logging.getLogger(__name__)

TIE = 1e-3  # recovered within this (relative) of the pruned model's error or KL: not worse
FLOOR = 1e-6  # ... nor within this (absolute: float32 round-off when the pruned model already matches)


def _outputs(proto: onnx.ModelProto, feeds: list[dict], threads: int) -> list[list[np.ndarray]]:
    sess = session(proto, threads)
    return [sess.run(None, fd) for fd in feeds]


def held_out_check(original, pruned, recovered, feeds: list[dict], fold_of: list[np.ndarray], threads: int,
                   known: dict | None = None) -> dict | None:
    """The whole model on the samples no fit saw (fold -1): relative error of
    the float outputs against the original's (per sample on the batch axis,
    :func:`batch_axis`; the root of the
    mean, over every output's channels on axis 1, of each channel's relative
    squared error, so a small channel, a detector's class scores beside its
    boxes, counts as much as a large one) and,
    for a ``[N, classes]`` first output, top-1 agreement, for the pruned and the
    recovered model, and ``worse``: whether recovery moved the model away from
    the original there (by KL for logits, else by the output error). None when
    no sample was kept out. ``known``: ``{"original": ..., "recovered": ...}``,
    outputs already computed on every sample of ``feeds`` (per batch, a list in
    output order: recovery's frontiers hold them), used instead of running
    those models again; the recovered model then runs on one sample only, to
    prove the whole proto runs."""
    if not any(np.any(f < 0) for f in fold_of):
        return None
    known = known or {}
    first = [d for i in original.graph.input[:1] for d in i.type.tensor_type.shape.dim[:1]]
    if not (first and first[0].dim_value > 0):  # a dynamic batch: run the kept-out samples only
        known = {k: [[_kept_out(a, f) for a in outs] for outs, f in zip(v, fold_of) if np.any(f < 0)]
                 for k, v in known.items()}
        feeds = [{k: v[f < 0] for k, v in fd.items()} for fd, f in zip(feeds, fold_of) if np.any(f < 0)]
        fold_of = [np.full(int(np.sum(f < 0)), -1) for f in fold_of if np.any(f < 0)]
    if "recovered" in known:  # the whole proto must still run (recovery's pieces ran, not it)
        session(recovered, threads).run(None, {k: v[:1] for k, v in feeds[0].items()} if not
                                        (first and first[0].dim_value > 0) else feeds[0])
    ref = known["original"] if "original" in known else _outputs(original, feeds, threads)
    outs = {"pruned": _outputs(pruned, feeds, threads),
            "recovered": known["recovered"] if "recovered" in known else _outputs(recovered, feeds, threads)}
    res = {"samples": int(sum(int(np.sum(f < 0)) for f in fold_of))}
    for name, got in outs.items():
        num: dict[tuple, float] = {}
        den: dict[tuple, float] = {}
        agree, total, kl = 0, 0, 0.0
        for r_b, g_b, f in zip(ref, got, fold_of):
            sel = f < 0
            for k, (r, g) in enumerate(zip(r_b, g_b)):
                ax = batch_axis(r.shape, len(f))
                if ax is None or r.shape != g.shape or not np.issubdtype(r.dtype, np.floating):
                    continue
                r, g = np.moveaxis(r, ax, 0), np.moveaxis(g, ax, 0)  # sequence-first outputs: [T, N, C]
                r, g = r[sel].astype(np.float64), g[sel].astype(np.float64)
                # values the original itself does not give as numbers (overflow on these inputs) are left
                # out and counted; a model that is not finite where the original is, is infinitely far
                ok = np.isfinite(r)
                if name == "pruned":
                    res["nonfinite"] = res.get("nonfinite", 0) + int(ok.size - np.count_nonzero(ok))
                with np.errstate(invalid="ignore", over="ignore"):
                    sq = np.where(ok, np.where(np.isfinite(g), (g - r) ** 2, np.inf), 0.0)
                    r0 = np.where(ok, r, 0.0)
                axes = (0,) + tuple(range(2, r.ndim))  # per channel on axis 1 (a 1-D output: one)
                for c, (e, t) in enumerate(zip(np.atleast_1d(sq.sum(axis=axes)),
                                               np.atleast_1d((r0**2).sum(axis=axes)))):
                    num[(k, c)] = num.get((k, c), 0.0) + float(e)
                    den[(k, c)] = den.get((k, c), 0.0) + float(t)
                if k == 0 and r.ndim == 2 and r.shape[1] > 1:  # logits: agreement and KL(original || model)
                    rows = ok.all(1)  # samples whose original logits are numbers
                    r, g = r[rows], g[rows]
                    fin = np.isfinite(g).all(1)
                    agree += int((r[fin].argmax(1) == g[fin].argmax(1)).sum())
                    total += len(r)
                    if not fin.all():
                        kl = math.inf
                    lr, lg = _log_softmax(r[fin]), _log_softmax(g[fin])
                    kl += float((np.exp(lr) * (lr - lg)).sum())
        rel = [num[k] / den[k] if den[k] > 0 else math.inf for k in num if den[k] > 0 or math.isinf(num[k])]
        res[f"err_{name}"] = float(np.sqrt(np.mean(rel))) if rel else 0.0
        res["outputs"] = len({k for k, _ in num})
        if total:
            res[f"agree_{name}"] = 100.0 * agree / total
            res[f"kl_{name}"] = kl / total
    # the verdict: KL for a classifier's logits, else the relative output error
    key = "kl" if "kl_pruned" in res else "err"
    res["worse"] = worse(res[f"{key}_recovered"], res[f"{key}_pruned"])
    return res


def _kept_out(a: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Output ``a`` of a whole batch cut to its kept-out samples (``fold`` < 0)
    on its batch axis (:func:`batch_axis`); as it is when it has none (it is
    then compared with nothing)."""
    ax = batch_axis(a.shape, len(fold))
    return a if ax is None else np.compress(fold < 0, a, axis=ax)


def batch_axis(shape: tuple, n: int) -> int | None:
    """The axis of an output of ``shape`` that holds the ``n`` samples of a feed:
    axis 0, else the one other axis of that size (a CTC recogniser's ``[T, N,
    classes]``), else None (nothing to compare per sample)."""
    if not shape:
        return None
    if shape[0] == n:
        return 0
    axes = [a for a, d in enumerate(shape) if d == n]
    return axes[0] if len(axes) == 1 else None


def worse(recovered: float, pruned: float) -> bool:
    """The verdict on the recovered model's KL or error against the pruned one's:
    worse only beyond :data:`TIE` (relative) and :data:`FLOOR` (absolute); an
    error that is not a number counts as infinite (worse than any finite one)."""
    recovered, pruned = (math.inf if math.isnan(v) else v for v in (recovered, pruned))
    return bool(recovered > pruned * (1 + TIE) + FLOOR)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _reverted(rows: list[LayerRow], reason: str) -> list[LayerRow]:
    """Every applied fit marked reverted with ``reason`` (the caller has undone the edits)."""
    log.warning("%s; returning the pruned model", reason)
    for r in rows:
        if r.status == "refit":
            r.status, r.reason = "reverted", reason
    return rows

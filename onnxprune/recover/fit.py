"""Recovery's arithmetic, plain numpy: regression rows from activations
(im2col for convolutions), per-fold normal-equation statistics, the ridge
solve shrinking towards the pruned weights, the ridge strength chosen on
held-out folds of calibration sources. Nothing here reads or edits a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FLOAT32_FROM = 256  # inputs this wide have their row products taken in float32 (_accumulate)
SELECT_FROM = 1.0  # the relative ridge strength the held-out search starts from: the strengths chosen lie
# between 0.01 and 10 or the weights as pruned, most at 1, 10 or the weights as pruned, so a start at the default 0.01
# walked two more strengths (a solve per fold each) on most layers: statistics and solves 40.2 s -> 35.6 s on a
# ViT-S with a dense decoder at 70% of its MACs (the same strengths, the same Pearson on new photos), 15.0 s -> 12.4 s on
# EfficientNet-Lite0 at 90% (one layer of 35 moved, the same agreement on new photos); tools/ridge_select.py


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
    target: str = ""  # "stream": fitted to the residual sum minus the pruned stream (else its own output)

    def as_dict(self) -> dict:
        return dict(self.__dict__)



@dataclass
class _Fit:
    """A re-fittable consumer: how to turn activations into regression rows and
    how to write the result back."""

    row: LayerRow
    node: object  # an onnx.NodeProto in the working (pruned) proto at planning time; look up by name after edits
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
    shift: dict = field(default_factory=dict)  # group -> the first rows' mean input, which wide products are centred on
    quant: dict = field(default_factory=dict)  # "w" / "b": a QDQ model's quantized constant (core.quant.Dequantized)
    clamp: tuple | None = None  # (lo, hi): beyond these a clamp after the layer hides its values (floats or per
    # channel; graph.clamp_after); used by ridge fits only


# --------------------------------------------------------------------------- regression rows


def _pads(geo: dict, hw) -> list[int]:
    if geo["auto"] in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i, (size, k, s, d) in enumerate(zip(hw, geo["k"], geo["s"], geo["d"])):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            lo = total // 2 if geo["auto"] == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + 2] = lo, total - lo
        return pads
    return [0, 0, 0, 0] if geo["auto"] == "VALID" else geo["pads"]



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
    uh, uw = geo.get("up", (1, 1))  # a ConvTranspose: the input with u - 1 zeros between neighbours
    hh = oh[:, None] * sh + np.arange(kh)[None] * dh - pt  # [S, kh] rows in the unpadded (upsampled) input
    ww = ow[:, None] * sw + np.arange(kw)[None] * dw - pl  # [S, kw]
    inside = ((hh >= 0) & (hh < (H - 1) * uh + 1) & (hh % uh == 0))[:, None, :, None] & \
        ((ww >= 0) & (ww < (W - 1) * uw + 1) & (ww % uw == 0))[:, None, None, :]
    hh, ww = np.clip(hh // uh, 0, H - 1), np.clip(ww // uw, 0, W - 1)
    yk = y[b, :, oh, ow][:, fit.kept_out]  # [S, kept outputs]
    rows = []
    for isl, osl in fit.groups:
        xs = x[:, isl]
        patch = xs[b[:, None, None, None], np.arange(xs.shape[1])[None, :, None, None], hh[:, None, :, None], ww[:, None, None, :]]
        patch = np.where(inside, patch, 0)  # zero padding, without a padded copy of the input
        X = patch.reshape(len(take), -1)
        Y = yk[:, osl]
        rows.append((X, Y, (oh % uh) * uw + ow % uw) if "blocks" in geo else (X, Y))
    return rows, b


def tap_blocks(channels: int, geo: dict) -> list[np.ndarray]:
    """A ConvTranspose fitted as a Conv (``geo["up"]``: its strides): the features
    (input channel x kernel tap) each output phase ``(oh % up_h, ow % up_w)`` reads.
    An output row of a phase is zero outside its taps, so the normal equations are
    block-diagonal but for the bias (:class:`_Blocks`): a stride-2 4x4 kernel gives
    four blocks of a quarter of the taps, 16x less work for the Gram matrices."""
    (kh, kw), (uh, uw) = geo["k"], geo["up"]
    pt, pl = geo["pads"][:2]
    idx = np.arange(channels * kh * kw).reshape(channels, kh, kw)
    out = []
    for ph in range(uh):
        for pw in range(uw):
            u = np.arange(kh)[(np.arange(kh) - (pt - ph)) % uh == 0]
            v = np.arange(kw)[(np.arange(kw) - (pl - pw)) % uw == 0]
            out.append(idx[:, u][:, :, v].reshape(-1))
    return out


class _Blocks:
    """A Gram matrix ``[d + 1, d + 1]`` that is zero outside square blocks of
    features (``cols``, disjoint) and the last (bias) row and column, kept as
    those blocks: what the normal equations need of it (sums, ``G @ W``, its
    last row, the ridge solve)."""

    def __init__(self, cols: list[np.ndarray], d: int, parts=None, border=None, corner: float = 0.0):
        self.cols, self.d = cols, d
        self.parts = parts if parts is not None else [np.zeros((len(c), len(c))) for c in cols]
        self.border = border if border is not None else np.zeros(d)  # G[:d, -1]
        self.corner = corner  # G[-1, -1]: the row count

    def _combine(self, o, sign: float) -> "_Blocks":
        return _Blocks(self.cols, self.d, [a + sign * b for a, b in zip(self.parts, o.parts)],
                       self.border + sign * o.border, self.corner + sign * o.corner)

    def __add__(self, o):
        return self if isinstance(o, int) and o == 0 else self._combine(o, 1.0)

    __radd__ = __add__

    def __sub__(self, o):
        return self._combine(o, -1.0)

    def __getitem__(self, key):
        if key == -1:
            return np.append(self.border, self.corner)
        if key == (-1, -1):
            return self.corner
        raise IndexError(key)

    def __matmul__(self, W: np.ndarray) -> np.ndarray:
        out = np.zeros_like(W, dtype=np.float64)
        for c, P in zip(self.cols, self.parts):
            out[c] = P @ W[c]
        out[:-1] += np.outer(self.border, W[-1])
        out[-1] = self.border @ W[:-1] + self.corner * W[-1]
        return out

    def ridge(self, C: np.ndarray, W0: np.ndarray, lam: float) -> np.ndarray:
        """:func:`_ridge`'s solution (``lam`` absolute): per block with the bias
        eliminated (the Schur complement of the bias row)."""
        W = np.array(W0, dtype=np.float64)
        U, V = [], []
        for c, P in zip(self.cols, self.parts):
            A = P + lam * np.eye(len(c))
            rhs = np.column_stack([C[c] + lam * W0[c], self.border[c]])
            sol = np.linalg.solve(A, rhs)
            U.append(sol[:, :-1])
            V.append(sol[:, -1])
        den = self.corner - sum(float(self.border[c] @ v) for c, v in zip(self.cols, V))
        b = (C[-1] - sum(self.border[c] @ u for c, u in zip(self.cols, U))) / max(den, 1e-30)
        for c, u, v in zip(self.cols, U, V):
            W[c] = u - np.outer(v, b)
        W[-1] = b
        return W


def _row_samples(fit: _Fit, x: np.ndarray, rows: int, batch: int | None) -> np.ndarray:
    """The calibration sample each regression row of a dense layer comes from
    (``batch`` samples in this batch), so that held-out sources stay out of the
    fits. Rows are ``x``'s leading axes flattened: ``[B, tokens, ...]``, or
    sequence first ``[tokens, B, ...]`` (torch's ``nn.MultiheadAttention`` and
    ``nn.Transformer`` without ``batch_first``); a 2-D input is read through the
    dims of the tensor it was flattened from (``fit.dense["src_dims"]``, None
    for a symbol: the batch)."""
    r = np.arange(rows)
    if fit.dense.get("transA") or x.ndim < 2:
        return np.zeros(rows, np.int64)
    if batch is None:
        batch = x.shape[0]
    lead = list(x.shape[:-1]) if x.ndim >= 3 else fit.dense.get("src_dims") or [x.shape[0]]
    if batch < 1 or rows % batch:
        return r // max(rows // max(x.shape[0], 1), 1)
    if len(lead) >= 2 and lead[0] not in (batch, None) and lead[1] in (batch, None) and rows % (lead[0] * batch) == 0:
        return (r // (rows // (lead[0] * batch))) % batch  # sequence first
    return r // (rows // batch)


def _dense_rows(fit: _Fit, x: np.ndarray, y: np.ndarray, rng, budget: int, stream=None, batch: int | None = None):
    """Sampled input rows and the matching target rows, and the sample each
    comes from (:func:`_row_samples`). ``stream``: ``(r_orig, r_pruned, inv)``
    of a layer added to a residual stream (see ``recover._stream_inverse``):
    what the pruned stream lacks is added to the sampled targets. Rows are
    sampled first, so only they are copied."""
    if fit.dense.get("transA"):
        x = x.T
    X = x.reshape(-1, x.shape[-1])
    Yall = y.reshape(-1, y.shape[-1])
    if len(X) != len(Yall):
        return None
    sample = _row_samples(fit, x, len(X), batch)
    take = None
    if len(X) > budget:
        take = np.sort(rng.choice(len(X), budget, replace=False))
        X, Yall, sample = X[take], Yall[take], sample[take]
    if fit.dense.get("packed"):  # a packed Attention's projection, from the original's input
        Y = Yall @ fit.dense["w"][:, fit.kept_out] + fit.dense["b"][fit.kept_out]
    else:
        Y = Yall[:, fit.kept_out]
    if stream is not None:
        r_orig, r_pruned, inv = stream
        ro, rp = r_orig.reshape(-1, r_orig.shape[-1]), r_pruned.reshape(-1, r_pruned.shape[-1])
        if take is not None:
            ro, rp = ro[take], rp[take]
        lost = ro[:, fit.kept_out] - rp
        Y = Y + (lost if inv is None else lost * inv)
    return [(X, Y)], sample


def _clamped_targets(fit: _Fit, rows, anchor: list) -> list:
    """Targets that ask nothing the clamp after the layer would hide
    (``fit.clamp``: its bounds in the layer's own values, from
    :func:`onnxprune.recover.graph.clamp_after`). Where the original's
    value lies at or beyond a bound, any value on that side gives the same
    output after the clamp, so the target becomes ``anchor``'s prediction (a
    first fit's weights, per group ``[d + 1, m]``) kept on that side of the
    bound (the bound itself where it crosses): rows the first fit already
    sends past the bound ask nothing more, rows it brings back inside are
    pulled to the bound. One step of the alternating least squares of a
    regression through a ReLU: the Gram matrices are unchanged, only the
    cross products move."""
    if fit.clamp is None:
        return rows
    lo, hi = fit.clamp  # floats, or one bound per output channel of the pruned layer
    out = []
    for (X, Y, *phase), W, (_, osl) in zip(rows, anchor, fit.groups):
        # in the rows' own precision (float64 temporaries took almost twice as long)
        l, h = (np.asarray(v, Y.dtype) if np.ndim(v) == 0 else np.asarray(v, Y.dtype)[osl] for v in (lo, hi))
        P = X @ W[:-1].astype(X.dtype)
        P += W[-1].astype(X.dtype)
        T = np.where(Y <= l, np.minimum(P, l), Y) if np.any(l > -np.inf) else Y  # -inf: no lower bound there
        T = np.where(Y >= h, np.maximum(P, h, out=P), T) if np.any(h < np.inf) else T
        out.append((X, T, *phase))
    return out


def _accumulate(fit: _Fit, rows, fold: np.ndarray, targets_only: bool = False, out: bool = False) -> None:
    """Add the regression rows to the layer's statistics, per fold of sources
    (``fold``: the fold of each row; -1: a row kept out of the checked fits,
    left out here unless ``out``: then summed apart, as fold -1, for the fits
    that are written); the totals are the sums over folds.
    Inputs of :data:`FLOAT32_FROM` features or more are multiplied in float32,
    centred on the first rows' mean so the products do not cancel, and turned
    back into float64 sums of the raw rows (half the time of the widest
    products: a ViT-S's projections). ``targets_only``: the same rows again
    with new targets (:func:`_clamped_targets`' later passes, after
    :func:`reset_targets`): only the cross products and the targets' sums
    of squares are added; the Gram matrices stay."""
    for k in np.unique(fold):
        if k < 0 and not out:
            continue
        sel = fold == k
        G, C, yy = fit.folds.setdefault(int(k), ([], [], []))
        for gi, (X, Y, *phase) in enumerate(rows):
            if phase:  # a ConvTranspose: per output phase, its taps only (_Blocks)
                _accumulate_blocks(fit, X[sel], Y[sel].astype(np.float64), phase[0][sel], gi, G, C, yy, targets_only)
                continue
            if len(G) <= gi:
                G.append(np.zeros((X.shape[1] + 1, X.shape[1] + 1)))
                C.append(np.zeros((X.shape[1] + 1, Y.shape[1])))
                yy.append(np.zeros(Y.shape[1]))
            wide = X.shape[1] >= FLOAT32_FROM
            if wide and gi not in fit.shift:
                fit.shift[gi] = X.mean(0, dtype=np.float64)
            dt = np.float32 if wide else np.float64
            Xa = np.empty((int(sel.sum()), X.shape[1] + 1), dt)
            Xa[:, :-1] = X[sel] - fit.shift[gi].astype(dt) if wide else X[sel]
            Xa[:, -1] = 1.0
            Yk = Y[sel].astype(dt)
            c = (Xa.T @ Yk).astype(np.float64)
            if wide:  # from the centred rows back to the raw ones: x = x_c + mu
                c[:-1] += np.outer(fit.shift[gi], c[-1])
            if not targets_only:
                g = (Xa.T @ Xa).astype(np.float64)
                if wide:
                    mu, s, n = fit.shift[gi], g[:-1, -1].copy(), g[-1, -1]
                    g[:-1, :-1] += np.outer(s, mu) + np.outer(mu, s) + n * np.outer(mu, mu)
                    g[:-1, -1] = g[-1, :-1] = s + n * mu
                G[gi] += g
            C[gi] += c
            yy[gi] += np.einsum("ij,ij->j", Yk, Yk, dtype=np.float64)
    if not targets_only:
        fit.n += int(len(fold) if out else np.count_nonzero(fold >= 0))


def reset_targets(fit: _Fit) -> None:
    """Zero the statistics that depend on the targets (per fold: the cross
    products and the targets' sums of squares), keeping the Gram matrices, for
    another pass over the same rows with new targets."""
    for G, C, yy in fit.folds.values():
        for c in C:
            c[:] = 0
        for v in yy:
            v[:] = 0
    fit.G, fit.C, fit.yy = [], [], []


def _accumulate_blocks(fit: _Fit, X, Y, phase, gi: int, G: list, C: list, yy: list, targets_only: bool = False) -> None:
    blocks = fit.conv["blocks"]
    if len(G) <= gi:
        G.append(_Blocks(blocks, X.shape[1]))
        C.append(np.zeros((X.shape[1] + 1, Y.shape[1])))
        yy.append(np.zeros(Y.shape[1]))
    g = G[gi]
    for p, cols in enumerate(blocks):
        r = phase == p
        if not r.any():
            continue
        Xp = X[r][:, cols].astype(np.float64)
        if not targets_only:
            g.parts[p] += Xp.T @ Xp
            g.border[cols] += Xp.sum(0)
        C[gi][cols] += Xp.T @ Y[r]
    if not targets_only:
        g.corner += len(Y)
    C[gi][-1] += Y.sum(0)
    yy[gi] += (Y * Y).sum(0)


def finite(fit: _Fit) -> bool:
    """Whether the layer's statistics are all finite numbers (activations that
    overflow on the calibration data, e.g. inputs far outside the range the
    model was trained on, give inf/NaN sums: nothing to solve)."""
    for G, C, yy in fit.folds.values():
        for g in G:
            parts = [*g.parts, g.border, np.array([g.corner])] if isinstance(g, _Blocks) else [g]
            if not all(np.all(np.isfinite(a)) for a in parts):
                return False
        if not all(np.all(np.isfinite(a)) for a in (*C, *yy)):
            return False
    return True


def _totals(fit: _Fit, out: bool = False) -> None:
    """``fit.G, fit.C, fit.yy``: the statistics of all cross-validation folds
    together, and of the kept-out rows too (fold -1) with ``out``."""
    parts = [v for k, v in fit.folds.items() if k >= 0 or out]
    fit.G = [sum(p[0][gi] for p in parts) for gi in range(len(parts[0][0]))]
    fit.C = [sum(p[1][gi] for p in parts) for gi in range(len(parts[0][1]))]
    fit.yy = [sum(p[2][gi] for p in parts) for gi in range(len(parts[0][2]))]


def _ridge(G, C, W0, lam_rel: float):
    """``min ||[X 1] W - Y||^2 + lam ||W - W0||^2`` over the weight rows (the
    bias row unpenalised); ``lam_rel`` infinite: the weights stay ``W0`` and
    only the bias moves (to its least-squares optimum)."""
    d = G.d if isinstance(G, _Blocks) else G.shape[0] - 1
    if math.isinf(lam_rel):
        W = W0.copy()
        W[-1] += (C[-1] - G[-1] @ W0) / max(G[-1, -1], 1e-30)
        return W
    if isinstance(G, _Blocks):
        return G.ridge(C, W0, lam_rel * sum(float(np.trace(P)) for P in G.parts) / max(d, 1))
    lam = lam_rel * np.trace(G[:d, :d]) / max(d, 1)
    A = G.copy()
    A[np.arange(d), np.arange(d)] += lam  # the bias row unpenalised
    rhs = C.copy()
    rhs[:d] += lam * W0[:d]
    try:
        W = np.linalg.solve(A, rhs)
        if not np.all(np.isfinite(W)):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        W = np.linalg.lstsq(A, rhs, rcond=None)[0]
    return W


def _select(fit: _Fit, ridge: float, start: float | None = None) -> tuple[float | None, float, float]:
    """Choose the ridge strength by cross-validation over folds of *sources*:
    fit on the other folds, measure on each in turn. Returns ``(strength,
    held-out error of the pruned weights, held-out error of the fit)`` (sums of
    squares); ``strength`` is None with fewer than two folds. ``start``: where
    the search begins (a strength chosen for the same rows with other targets:
    a clamp pass), else :data:`SELECT_FROM`."""
    folds = [v for k, v in fit.folds.items() if k >= 0]  # fit.G ...: their totals (_totals without out)
    base = sum(_sq_err(Gv, Cv, yv, W0) for Gk, Ck, yk in folds for Gv, Cv, yv, W0 in zip(Gk, Ck, yk, fit.w0))
    if len(folds) < 2:
        return None, base, base
    errs: dict[float, float] = {}
    # per fold, per group: the statistics of the other folds (the fit's) and of this one (the check's)
    split = [[(G - Gv, C - Cv, W0, Gv, Cv, yv) for G, C, W0, Gv, Cv, yv in zip(fit.G, fit.C, fit.w0, Gk, Ck, yk)]
             for Gk, Ck, yk in folds]

    def cv(lam: float) -> float:
        if lam not in errs:
            errs[lam] = sum(_sq_err(Gv, Cv, yv, _ridge(Gt, Ct, W0, lam))
                            for fold in split for Gt, Ct, W0, Gv, Cv, yv in fold)
        return errs[lam]

    # downhill over powers of ten from the start and its two neighbours
    # (each evaluation is a solve per fold: the cost of recovery on wide
    # layers; where the start is best, three of them)
    # (strengths 10 ** e for whole e, so a given start and the default one meet on the same grid)
    e_lo = math.ceil(math.log10(ridge * 1e-4) - 1e-9) if ridge > 0 else -30  # ridge 0: no floor but the data's
    e_hi = math.floor(math.log10(max(ridge * 1e3, 10.0)) + 1e-9)
    start = SELECT_FROM if start is None or not math.isfinite(start) or start <= 0 else start
    e0 = min(max(round(math.log10(start)), e_lo + 1), e_hi - 1)
    for e in (e0 - 1, e0, e0 + 1):
        cv(10.0 ** e)
    while True:
        best = min(errs, key=errs.get)
        eb = round(math.log10(best))
        step = [10.0 ** e for e in (eb - 1, eb + 1) if e_lo <= e <= e_hi and 10.0 ** e not in errs]
        if not step:
            break
        for v in step:
            cv(v)
        if min(errs, key=errs.get) == best:
            break
    lam = min(errs, key=errs.get)
    if ridge in errs and errs[ridge] <= errs[lam] * 1.01 + 1e-30:
        lam = ridge  # the given strength, where tried, unless another is clearly better
    if cv(math.inf) < errs[lam]:  # the weights as pruned, only the bias re-fitted, generalises better
        lam = math.inf
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


# --------------------------------------------------------------------------- solvers


def _sq_err(G, C, yy, W) -> float:
    """sum ||[X 1] W - Y||^2 from the accumulated statistics."""
    return float(max(yy.sum() - 2 * np.sum(W * C) + np.sum(W * (G @ W)), 0.0))


def _rows_in(G) -> float:
    """How many regression rows a Gram matrix sums (its intercept corner)."""
    return float(G.corner) if isinstance(G, _Blocks) else float(G[-1, -1])


def train_share(fit: _Fit) -> float:
    """The rows a cross-validation fit trains on (the other folds, on average)
    over the rows of the totals being solved (``fit.G``): the ridge strength
    chosen on those folds is scaled by it for the fit on the totals. The
    strength is relative to the Gram matrix's mean diagonal, which grows with
    the rows, while the penalty that generalises does not: a strength chosen
    on half the sources over-regularises a fit on all of them (EfficientNet-Lite0
    at 70% of its MACs, one plan, KL on new photos 0.755 -> 0.723:
    ``tools/results/pretrained_recovery_scaled.md``). 1 with fewer than two folds."""
    folds = [v[0][0] for k, v in fit.folds.items() if k >= 0 and v[0]]
    if len(folds) < 2 or not fit.G:
        return 1.0
    n = [_rows_in(G) for G in folds]
    return float(np.mean([sum(n) - k for k in n])) / max(_rows_in(fit.G[0]), 1.0)


def _solve(fit: _Fit, method: str, ridge: float, scale: bool = True) -> list:
    """The layer's solution on its totals (``fit.G, fit.C, fit.yy``); for
    ``ridge``, the strength scaled by :func:`train_share` (``scale``)."""
    if method == "ridge" and scale and math.isfinite(ridge):
        ridge = ridge * train_share(fit)
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




# --------------------------------------------------------------------------- attention logits
#
# One head's logits are l_ij = q_i . k_j with q = x~ Wq, k = x~ Wk (x~ = [x 1],
# the columns of the head in the units its linear layer writes them). Over all
# pairs of sampled rows the squared error of a bilinear form B = A Bk^T against
# the original logits t_ij = tq_i . tk_j is, from the statistics
#   G = X~^T X~, Cq = X~^T Tq, Ck = X~^T Tk, Sq = Tq^T Tq, Sk = Tk^T Tk:
#   E(A, Bk) = tr((A^T G A)(Bk^T G Bk)) - 2 tr((A^T Cq)(Ck^T Bk)) + tr(Sq Sk).
# Its minimum over full-rank B is B* = (G^-1 Cq)(G^-1 Ck)^T; over rank r it is
# the best rank-r approximation of B* in the metric of G: with G = L L^T, the
# top r singular pairs of L^T B* L (Eckart-Young).


def _logit_err(G, Cq, Ck, Sq, Sk, A, Bk) -> float:
    """E(A, Bk) above (pairs of rows, squared logit error)."""
    e = np.trace((A.T @ G @ A) @ (Bk.T @ G @ Bk)) - 2 * np.trace((A.T @ Cq) @ (Ck.T @ Bk)) + np.trace(Sq @ Sk)
    return float(max(e, 0.0))


def _logit_factors(G, heads, lam_rel: float) -> list:
    """Per head of one layer (``heads``: ``[(Cq, Ck, Wq0, Wk0, r)]``), the
    rank-``r`` pair ``(A, Bk)`` ([d+1, r] each, bias last row) whose bilinear
    form is closest to the original logits: each side's full least-squares
    re-fit (ridge, shrinking towards ``Wq0``/``Wk0``, [d+1, m]), their product
    reduced to rank ``r`` in the whitened input space. The heads read the same
    input, so they share ``G``: one factorisation and one solve each way for
    all of them, not per head."""
    d = G.shape[0] - 1
    lam = lam_rel * np.trace(G[:d, :d]) / max(d, 1)
    D = np.ones(d + 1)
    D[-1] = 0.0
    Gl = G + lam * np.diag(D)
    jitter = 1e-9 * max(np.trace(Gl) / (d + 1), 1e-30)
    Gl = Gl + jitter * np.eye(d + 1)
    rhs = [M + lam * D[:, None] * M0 for Cq, Ck, Wq0, Wk0, _ in heads for M, M0 in ((Cq, Wq0), (Ck, Wk0))]
    W = np.linalg.solve(Gl, np.hstack(rhs))
    L = np.linalg.cholesky(Gl)
    LW = L.T @ W
    sides, at = [], 0
    for Cq, Ck, _, _, r in heads:
        Wq, Wk = LW[:, at:at + Cq.shape[1]], LW[:, at + Cq.shape[1]:at + Cq.shape[1] + Ck.shape[1]]
        at += Cq.shape[1] + Ck.shape[1]
        Qp, Rp = np.linalg.qr(Wq)
        Qk, Rk = np.linalg.qr(Wk)
        U, s, Vt = np.linalg.svd(Rp @ Rk.T)
        root = np.sqrt(s[:r])
        sides += [Qp @ (U[:, :r] * root), Qk @ (Vt[:r].T * root)]
    AB = np.linalg.solve(L.T, np.hstack(sides))
    out, at = [], 0
    for *_, r in heads:
        out.append((AB[:, at:at + r], AB[:, at + r:at + 2 * r]))
        at += 2 * r
    return out


def _match_columns(ops: np.ndarray, ys: np.ndarray, tol: float = 1e-3):
    """For each column of ``ops`` ([rows, f]: an attention operand), the column of
    ``ys`` ([rows, c]: its linear layer's output) it is an affine copy of, and
    the scale: ``(cols [f], scale [f])``, or None when a column matches none."""
    oc = ops - ops.mean(0)
    yc = ys - ys.mean(0)
    on, yn = np.linalg.norm(oc, axis=0), np.linalg.norm(yc, axis=0)
    if np.any(on < 1e-12):
        return None
    corr = (oc.T @ yc) / (on[:, None] * np.maximum(yn, 1e-30)[None])
    cols = np.argmax(np.abs(corr), axis=1)
    if np.any(np.abs(corr[np.arange(len(cols)), cols]) < 1 - tol):
        return None
    if len(np.unique(cols)) != len(cols):
        return None
    scale = np.einsum("ij,ij->j", oc, yc[:, cols]) / np.maximum(yn[cols] ** 2, 1e-30)
    return cols, scale

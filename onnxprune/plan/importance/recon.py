"""``recon``: what removing a channel costs once the consumers are re-fitted.

For every linear layer where a group's channels *end* (a Conv, Gemm or MatMul
with a constant weight whose data input carries the group and whose output does
not), the calibration data give the covariance ``S`` of that input (per input
channel of a Conv, per feature of a Gemm/MatMul). Removing input positions
``P`` and re-fitting the layer's remaining weights and bias by least squares
(what ``--recover ridge`` does) raises the layer's squared output error by

    dE(P) = tr( W_P^T  [(S^-1)_PP]^-1  W_P )

(Optimal Brain Surgeon for a linear layer: Hassibi & Stork, *Second order
derivatives for network pruning*, NIPS 1992; the same least-squares view as
*ThiNet* and He et al., *Channel Pruning for Accelerating Very Deep Neural
Networks*, 2017). ``W_P`` are the weight rows of ``P`` (for a k x k Conv the
rows of all its taps, an approximation that ignores the covariance between
taps). A channel's score is the sum over its consumers of ``dE`` divided by the
consumer's output energy, so channels of different layers compare on one
scale: the relative error their removal leaves after recovery. Channels that
are redundant (predictable from the others) score low even when large; this is
what makes the criterion hold up on real pretrained weights with BatchNorm
folded, where weight norms and mean activations mislead.

Memory: one covariance per consumer (float64); consumers are processed in
chunks of at most ``MAX_GRAM_BYTES`` of covariances per pass over the data.
"""
from __future__ import annotations

import numpy as np

from onnxprune.core.analysis import Analysis
from onnxprune.core.groups import Group
from onnxprune.core.members import IN

MAX_GRAM_BYTES = 1 << 30
MAX_ROWS = 8192  # sampled rows (positions x samples) per consumer per batch
SHRINK = 1.0  # scale of the shrinkage towards the diagonal (see _regularised)
RIDGE = 1e-4  # added to the covariance diagonal, relative to each entry (scale-free)


def _regularised(c: np.ndarray, n: int) -> np.ndarray:
    """The covariance shrunk towards its diagonal by ``min(1, (k / n)^2)``
    (``n`` samples of ``k`` features): with few samples per feature the sample
    covariance makes every channel look predictable from the others (rank
    ``n`` < ``k``), so their removal would look free; with many, it is left
    almost as it is."""
    k = len(c)
    d = np.diag(c)
    a = SHRINK * min(1.0, (k / max(n, 1)) ** 2)
    floor = 1e-12 * max(float(d.mean()), 1e-30)  # a dead input (zero variance) stays invertible
    return (1 - a) * c + np.diag(a * d + RIDGE * d + floor)


class _Consumer:
    def __init__(self, node, x, axis: int, w: np.ndarray, groups: int):
        self.node, self.x, self.axis, self.w, self.groups = node, x, axis, w, groups
        self.k = w.shape[1] * groups if node.op_type == "Conv" else (w.shape[0] if w.ndim == 2 else 0)
        self.s = np.zeros(self.k)
        self.gram = np.zeros((self.k, self.k))
        self.n = 0

    def block_rows(self):
        """Per block of input positions that mix (one per Conv group): the
        positions and their weight rows [positions, outputs x taps]."""
        w, op = self.w, self.node.op_type
        if op != "Conv":
            yield np.arange(self.k), w.astype(np.float64)
            return
        m, cpg = w.shape[:2]
        per = m // self.groups
        for gi in range(self.groups):
            blk = w[gi * per:(gi + 1) * per].astype(np.float64)  # [per, cpg, kh, kw]
            yield np.arange(gi * cpg, (gi + 1) * cpg), np.moveaxis(blk, 1, 0).reshape(cpg, -1)

    def add(self, arr: np.ndarray, rng) -> None:
        x = np.moveaxis(arr, self.axis, -1).reshape(-1, arr.shape[self.axis])
        if len(x) > MAX_ROWS:
            x = x[rng.choice(len(x), MAX_ROWS, replace=False)]
        x = x.astype(np.float64)
        self.s += x.sum(0)
        self.gram += x.T @ x
        self.n += len(x)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Second moment and covariance of the input, per sample."""
        mu = self.s / self.n
        second = self.gram / self.n
        return second, second - np.outer(mu, mu)

    def costs(self, lm: np.ndarray, width: int) -> np.ndarray | None:
        """Relative output error of removing each of the group's ``width`` channels."""
        if self.n == 0:
            return None
        second, cov = self.moments()
        out, energy = np.zeros(width), 0.0
        for blk, W in self.block_rows():
            s2 = second[np.ix_(blk, blk)]
            energy += float(((s2 @ W) * W).sum())
            c = cov[np.ix_(blk, blk)]
            inv = np.linalg.inv(_regularised(c, self.n))
            lmb = lm[blk]
            for ch in np.unique(lmb[lmb >= 0]):
                p = np.where(lmb == ch)[0]
                wp = W[p]
                if len(p) == 1:
                    out[ch] += float((wp * wp).sum()) / inv[p[0], p[0]]
                else:
                    out[ch] += float(np.trace(wp.T @ np.linalg.solve(inv[np.ix_(p, p)], wp)))
        if not energy > 0:
            return None
        return out / energy

    def state(self, lm: np.ndarray, width: int):
        """For the sequential path: (inverse covariance, weight rows, channel ->
        position, output energy), or None when a channel spans several positions
        or the layer is grouped."""
        if self.n == 0 or (self.node.op_type == "Conv" and self.groups > 1):
            return None
        sel = lm >= 0
        if np.bincount(lm[sel], minlength=width).max(initial=0) > 1:
            return None
        second, cov = self.moments()
        (_, W), = list(self.block_rows())
        energy = float(((second @ W) * W).sum())
        if not energy > 0:
            return None
        H = np.linalg.inv(_regularised(cov, self.n))
        pos = np.full(width, -1)
        pos[lm[sel]] = np.where(sel)[0]
        return H, W.copy(), pos, energy


def sequential(states: list, width: int, max_k: int = 1536) -> np.ndarray | None:
    """Greedy Optimal-Brain-Surgeon removal over all the group's consumers at
    once: remove the channel whose removal (with every consumer re-fitted) costs
    least, update the consumers' weights and inverse covariances, repeat. Score
    of a channel: the running maximum of the marginal costs up to its removal
    (so a group's order is its removal order and scores never decrease along
    it); the last channel is never removed and scores highest."""
    if not states or any(st is None for st in states) or max(st[0].shape[0] for st in states) > max_k:
        return None
    states = [(H.copy(), W, pos, e) for H, W, pos, e in states]
    alive = np.ones(width, bool)
    score = np.zeros(width)
    level = 0.0
    for _ in range(width - 1):
        cost = np.zeros(width)
        for H, W, pos, e in states:
            v = pos >= 0
            d = np.diag(H)[pos[v]]
            cost[v] += (W[pos[v]] ** 2).sum(1) / np.maximum(d, 1e-30) / e
        cost[~alive] = np.inf
        ch = int(np.argmin(cost))
        level = max(level, float(cost[ch]))
        score[ch] = level
        alive[ch] = False
        for H, W, pos, _ in states:
            p = pos[ch]
            if p < 0:
                continue
            h = H[:, p].copy()
            hp = max(h[p], 1e-30)
            W -= np.outer(h / hp, W[p])
            H -= np.outer(h, h) / hp
            W[p] = 0.0
            H[p, :] = 0.0
            H[:, p] = 0.0
            H[p, p] = 1.0  # a removed position costs nothing again and mixes with nothing
    score[alive] = level * 2 + 1e-12
    return score


def _carries(ctx: Analysis, v, leaf) -> list[int]:
    lay = ctx.layouts.get(v)
    if not lay:
        return []
    t = ctx.table
    return [ax for ax, s in enumerate(lay) if s is not None and any(x is leaf for x in t.leaves(s))]


def consumers(ctx: Analysis, g: Group) -> list[_Consumer]:
    """The linear layers where ``g``'s channels end (see the module docstring)."""
    out, seen = [], set()
    for m in g.tensors:
        node = m.node
        if m.role != IN or m.slot != 1 or node.op_type not in ("Conv", "Gemm", "MatMul") or id(node) in seen:
            continue
        seen.add(id(node))
        x = node.inputs[0]
        w = ctx.const(m.value)
        if x is None or x.const_value is not None or w is None or not np.issubdtype(w.dtype, np.floating):
            continue
        if _carries(ctx, node.outputs[0], g.space):
            continue  # the channel goes on (a depthwise conv): its end is further down
        axes = _carries(ctx, x, g.space)
        rank = ctx.rank(x)
        if len(axes) != 1 or rank is None:
            continue
        ax = axes[0]
        op = node.op_type
        if op == "Conv":
            if ax != 1 or m.axis != 1:
                continue
            out.append(_Consumer(node, x, ax, w, int(ctx.attr(node, "group", 1))))
        elif op == "Gemm":
            if ctx.attr(node, "transA", 0) or ax != 1:
                continue
            w2 = w.T if ctx.attr(node, "transB", 0) else w
            out.append(_Consumer(node, x, ax, w2, 1))
        else:  # MatMul with a 2-D constant weight
            if w.ndim != 2 or ax != rank - 1 or m.axis != 0:
                continue
            out.append(_Consumer(node, x, ax, w, 1))
    return out


def recon_scores(ctx: Analysis, groups: list[Group], proto, calib, capture, seed: int = 0,
                 sequential_ok: bool = True) -> tuple[dict, dict]:
    """Scores per group id, and notes for groups left to the caller's fallback."""
    rng = np.random.default_rng(seed)
    plans, notes = {}, {}
    for g in groups:
        cons = consumers(ctx, g)
        if not cons:
            notes[g.id] = "no linear consumer where the channels end"
            continue
        plans[g.id] = (g, cons)
    everyone = [c for _, cons in plans.values() for c in cons]
    # chunks of consumers whose covariances fit in memory, one pass over the data each
    chunks, cur, size = [], [], 0
    for c in everyone:
        b = 8 * c.k * c.k
        if cur and size + b > MAX_GRAM_BYTES:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(c)
        size += b
    if cur:
        chunks.append(cur)
    for chunk in chunks:
        names = sorted({c.x.name for c in chunk})
        for _, vals in capture(proto, names, calib):
            for c in chunk:
                c.add(vals[c.x.name], rng)
    scores = {}
    for gid, (g, cons) in plans.items():
        tot, used = np.zeros(g.width), 0
        lms = [ctx.table.leaf_map(ctx.layouts[c.x][c.axis], g.space, c.k) for c in cons]
        seq = sequential([c.state(lm, g.width) for c, lm in zip(cons, lms)], g.width) if sequential_ok else None
        if seq is not None:
            scores[gid] = seq
            for c in cons:
                c.gram = None
            continue
        for c, lm in zip(cons, lms):
            cost = c.costs(lm, g.width)
            c.gram = None  # free
            if cost is not None:
                tot += cost
                used += 1
        if used:
            scores[gid] = tot
        else:
            notes[gid] = "no calibration signal at the consumers"
    return scores, notes

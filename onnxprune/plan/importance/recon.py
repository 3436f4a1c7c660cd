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
A pass stops at the first batch after which every covariance of its chunk
has :data:`ROWS_PER_FEATURE` rows per feature: a transformer's token rows
fill them long before a CNN's last, small feature maps do.
"""
from __future__ import annotations

import numpy as np

from onnxprune.core.analysis import Analysis
from onnxprune.core.groups import Group
from onnxprune.core.members import IN

MAX_GRAM_BYTES = 1 << 30
MAX_ROWS = 8192  # sampled rows (positions x samples) per consumer per batch
SHRINK = 1.0  # scale of the shrinkage towards the diagonal (see _regularised)
FLOAT32_FROM = 512  # inputs this wide have their row products taken in float32 (_Stats)
RIDGE = 1e-4  # added to the covariance diagonal, relative to each entry (scale-free)
ROWS_PER_FEATURE = 8  # a pass over the data stops once every covariance has this many rows per feature (the
# shrinkage towards the diagonal is then at most 1/64): a ViT-S at 224 px has them after 64 images (197 tokens
# each), so --recover runs it on half of 128; a CNN's last layers (7 x 7 positions) read every batch


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


class _Stats:
    """Sums over the calibration rows of one input, on one axis: shared by every
    consumer that reads it (a block's q, k and v projections read one
    normalised stream). Rows are centred on the first batch's mean (so the
    covariance does not cancel) and, for inputs of :data:`FLOAT32_FROM`
    features or more, multiplied in float32 (half the time of the largest
    products: a ViT-S's MLP hidden layers) into float64 totals."""

    def __init__(self, k: int):
        self.k, self.n, self.users = k, 0, 0
        self.shift = self.s = self.gram = None
        self._inverse = None

    def add(self, arr: np.ndarray, axis: int, rng) -> None:
        x = np.moveaxis(arr, axis, -1)  # a view: rows are drawn before anything is copied
        rows = x.size // max(x.shape[-1], 1)
        if rows > MAX_ROWS:  # a decoder's 224 x 224 maps: 8192 rows, not a copy of all of them
            x = x[np.unravel_index(rng.choice(rows, MAX_ROWS, replace=False), x.shape[:-1])]
        else:
            x = x.reshape(rows, x.shape[-1])
        if self.shift is None:
            self.shift = x.mean(0, dtype=np.float64)
            self.s, self.gram = np.zeros(self.k), np.zeros((self.k, self.k))
        x = (x - self.shift).astype(np.float32 if self.k >= FLOAT32_FROM else np.float64)
        self.s += x.sum(0, dtype=np.float64)
        self.gram += (x.T @ x).astype(np.float64)
        self.n += len(x)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Second moment and covariance of the input, per sample."""
        m = self.s / self.n  # mean of the shifted rows
        cov = self.gram / self.n - np.outer(m, m)
        mu = m + self.shift
        return cov + np.outer(mu, mu), cov

    def inverse(self) -> np.ndarray:
        """The regularised covariance's inverse (computed once)."""
        if self._inverse is None:
            self._inverse = np.linalg.inv(_regularised(self.moments()[1], self.n))
        return self._inverse

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.gram = self._inverse = None


class _Consumer:
    def __init__(self, node, x, axis: int, w: np.ndarray, groups: int):
        self.node, self.x, self.axis, self.w, self.groups = node, x, axis, w, groups
        self.k = w.shape[1] * groups if node.op_type == "Conv" else (w.shape[0] if w.ndim == 2 else 0)
        self.stats: _Stats | None = None  # set by recon_scores, shared by the consumers of one input

    @property
    def n(self) -> int:
        return self.stats.n

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

    def costs(self, lm: np.ndarray, width: int) -> np.ndarray | None:
        """Relative output error of removing each of the group's ``width`` channels."""
        if self.n == 0:
            return None
        second, cov = self.stats.moments()
        out, energy = np.zeros(width), 0.0
        for blk, W in self.block_rows():
            s2 = second[np.ix_(blk, blk)]
            energy += float(((s2 @ W) * W).sum())
            inv = self.stats.inverse() if len(blk) == self.k else \
                np.linalg.inv(_regularised(cov[np.ix_(blk, blk)], self.n))
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
        second, _ = self.stats.moments()
        (_, W), = list(self.block_rows())
        energy = float(((second @ W) * W).sum())
        if not energy > 0:
            return None
        pos = np.full(width, -1)
        pos[lm[sel]] = np.where(sel)[0]
        return self.stats.inverse(), W.copy(), pos, energy


def _merged(states: list) -> list:
    """States of consumers that read one input (the same inverse covariance and
    positions) as one: their weight rows side by side, each scaled by the root
    of its output energy, so the summed relative costs stay the same."""
    out, index = [], {}
    for st in states:
        H, W, pos, e = st
        key = (id(H), pos.tobytes())
        if key not in index:
            index[key] = len(out)
            out.append((H, [W / np.sqrt(e)], pos))
        else:
            out[index[key]][1].append(W / np.sqrt(e))
    return [(H, np.concatenate(ws, axis=1), pos, 1.0) for H, ws, pos in out]


FLUSH = 128  # removals whose inverse-covariance and weight updates are held back and applied as one product


class _Surgeon:
    """One consumer's state in :func:`sequential`: the inverse covariance ``H``
    and weight rows ``W`` after the removals so far, held as ``H0 - Z Z^T`` and
    ``W0 - Z Y^T`` with at most :data:`FLUSH` pending columns. Each removal is
    a rank-one update of both (Optimal Brain Surgeon); applying them in blocks
    gives the same numbers as applying each at once, while a removal costs a
    pass over ``W`` instead of two over the ``k x k`` matrix (a ViT-S's twelve
    1536-unit MLP groups: seconds instead of minutes)."""

    def __init__(self, H: np.ndarray, W: np.ndarray, pos: np.ndarray, energy: float):
        k = len(H)
        self.H, self.W, self.pos, self.energy = H.copy(), W.astype(np.float64), pos, energy
        self.Z, self.Y, self.r = np.zeros((k, FLUSH)), np.zeros((W.shape[1], FLUSH)), 0
        self.dead = np.zeros(k, bool)
        self._sync()

    def _sync(self) -> None:
        """Apply the pending updates; exact diagonal and row norms again."""
        if self.r:
            Z, Y = self.Z[:, :self.r], self.Y[:, :self.r]
            self.H -= Z @ Z.T
            self.W -= Z @ Y.T
            self.r = 0
        self.d = np.diag(self.H).copy()
        self.norm = (self.W ** 2).sum(1)
        self.d[self.dead], self.norm[self.dead] = 1.0, 0.0

    def costs(self, width: int) -> np.ndarray:
        """Relative output error of removing each channel next (0 where it has no position here)."""
        out, v = np.zeros(width), self.pos >= 0
        p = self.pos[v]
        out[v] = np.maximum(self.norm[p], 0.0) / np.maximum(self.d[p], 1e-30) / self.energy
        return out

    def remove(self, p: int) -> None:
        Z, Y, r = self.Z[:, :self.r], self.Y[:, :self.r], self.r
        zp = Z[p]
        h = self.H[p].copy()  # column p of the current H (symmetric)
        w = self.W[p].copy()  # row p of the current W
        if r:
            h -= Z @ zp
            w -= Y @ zp
        h[self.dead] = 0.0  # a removed position mixes with nothing
        s = np.sqrt(max(h[p], 1e-30))
        z, y = h / s, w / s
        wy = self.W @ y - (Z @ (Y.T @ y) if r else 0.0)  # current W @ y
        self.norm += z * z * float(y @ y) - 2.0 * z * wy
        self.d -= z * z
        self.dead[p] = True
        self.d[p], self.norm[p] = 1.0, 0.0
        self.Z[:, r], self.Y[:, r] = z, y
        self.r += 1
        if self.r == FLUSH:
            self._sync()


def sequential(states: list, width: int, max_k: int = 1536) -> np.ndarray | None:
    """Greedy Optimal-Brain-Surgeon removal over all the group's consumers at
    once: remove the channel whose removal (with every consumer re-fitted) costs
    least, update the consumers' weights and inverse covariances, repeat. Score
    of a channel: the running maximum of the marginal costs up to its removal
    (so a group's order is its removal order and scores never decrease along
    it); the last channel is never removed and scores highest."""
    if not states or any(st is None for st in states) or max(st[0].shape[0] for st in states) > max_k:
        return None
    surgeons = [_Surgeon(*st) for st in _merged(states)]
    alive = np.ones(width, bool)
    score = np.zeros(width)
    level = 0.0
    for _ in range(width - 1):
        cost = np.zeros(width)
        for sg in surgeons:
            cost += sg.costs(width)
        cost[~alive] = np.inf
        ch = int(np.argmin(cost))
        level = max(level, float(cost[ch]))
        score[ch] = level
        alive[ch] = False
        for sg in surgeons:
            if sg.pos[ch] >= 0:
                sg.remove(int(sg.pos[ch]))
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
        node, w = m.node, None
        if m.role == IN and m.slot == 0 and node.op_type == "DequantizeLinear":  # a QDQ model's weight
            uses = list(node.outputs[0].uses())
            if len(uses) != 1 or uses[0].idx != 1:
                continue
            w = ctx.const(node.outputs[0])  # read dequantized
            node = uses[0].node
        elif m.role != IN or m.slot != 1:
            continue
        if node.op_type not in ("Conv", "Gemm", "MatMul") or id(node) in seen:
            continue
        seen.add(id(node))
        x = node.inputs[0]
        w = ctx.const(m.value) if w is None else w
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


NO_CONSUMER = "no linear consumer where the channels end"


def consumer_plans(ctx: Analysis, groups: list[Group]) -> dict:
    """Group id -> (group, its consumers), for the groups that have any."""
    return {g.id: (g, cons) for g in groups for cons in [consumers(ctx, g)] if cons}


def recon_scores(ctx: Analysis, groups: list[Group], proto, calib, capture, seed: int = 0,
                 sequential_ok: bool = True, plans: dict | None = None) -> tuple[dict, dict]:
    """Scores per group id, and notes for groups left to the caller's fallback.
    ``plans``: :func:`consumer_plans` of ``groups`` when the caller has them."""
    rng = np.random.default_rng(seed)
    plans = consumer_plans(ctx, groups) if plans is None else plans
    notes = {g.id: NO_CONSUMER for g in groups if g.id not in plans}
    everyone = [c for _, cons in plans.values() for c in cons]
    shared: dict[tuple, _Stats] = {}  # (input, axis) -> its sums, one per input read
    for c in everyone:
        c.stats = shared.setdefault((c.x.name, c.axis, c.k), _Stats(c.k))
        c.stats.users += 1
    everyone = list({id(c.stats): c for c in everyone}.values())  # one consumer per input stands for its sums
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
                c.stats.add(vals[c.x.name], c.axis, rng)
            if all(c.stats.n >= ROWS_PER_FEATURE * c.k for c in chunk):
                break  # enough rows: the remaining batches are not run
    scores = {}
    for gid, (g, cons) in plans.items():
        tot, used = np.zeros(g.width), 0
        lms = [ctx.table.leaf_map(ctx.layouts[c.x][c.axis], g.space, c.k) for c in cons]
        seq = sequential([c.state(lm, g.width) for c, lm in zip(cons, lms)], g.width) if sequential_ok else None
        if seq is not None:
            scores[gid] = seq
            for c in cons:
                c.stats.release()
            continue
        for c, lm in zip(cons, lms):
            cost = c.costs(lm, g.width)
            c.stats.release()
            if cost is not None:
                tot += cost
                used += 1
        if used:
            scores[gid] = tot
        else:
            notes[gid] = "no calibration signal at the consumers"
    return scores, notes

"""Params/MACs of a plan without rewriting the model, and ratio scaling to a
``target_macs`` / ``target_params`` budget.

:func:`onnxprune.metrics.terms` writes params and MACs as sums of products of
tensor dimensions, each factor naming the axis it comes from. Under a plan, an
axis keeps ``size_after(space) / size(space)`` of its extent, where the space
is the axis' member space (constants) or its activation layout. The estimate is
exact: tests compare it with a count on the rewritten model.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from onnxprune.core import metrics
from onnxprune.core.analysis import Analysis
from onnxprune.core.quant import dq_node
from onnxprune.core.space import ATOM, CONCAT, FIXED, Space

log = logging.getLogger(__name__)

MAX_RATIO = 0.99  # a scaled ratio never goes above this (groups are never emptied anyway)


def _keep_fraction(t, s: Space, keep: dict[int, np.ndarray]) -> float:
    r = t.find(s)
    if r.kind == ATOM:
        k = keep.get(r.id)
        return 1.0 if k is None or not r.size else len(k) / r.size
    if r.kind == FIXED:
        return 1.0
    if r.kind == CONCAT:
        sizes = [c.size for c in r.children]
        if any(x is None for x in sizes) or not sum(sizes):
            return 1.0
        return sum(_keep_fraction(t, c, keep) * c.size for c in r.children) / sum(sizes)
    return math.prod(_keep_fraction(t, c, keep) for c in r.children)


class Estimator:
    """Params and MACs of ``ctx.model`` under any plan, from one set of terms."""

    def __init__(self, ctx: Analysis, proto=None) -> None:
        from onnxprune import io

        self.ctx = ctx
        proto = proto if proto is not None else io.to_proto(ctx.model)
        self.terms = metrics.terms(proto)
        nodes = list(ctx.graph)
        if len(nodes) != len(proto.graph.node):
            raise RuntimeError("estimator: node lists differ")
        members = {(id(m.node), m.slot, m.axis): m.space for m in ctx.tensors}
        self._factors = []  # per term: [(dim, space | None)]
        for term in self.terms:
            node = nodes[term.node]
            row = []
            for f in term.factors:
                space = None
                if f.ref is not None:
                    io_, slot, axis = f.ref
                    if io_ == "x":  # a width the node's rule named (Analysis.extent)
                        space, v = ctx.extents.get((id(node), slot)), None
                    elif io_ == "in":
                        space = members.get((id(node), slot, axis))
                        v = node.inputs[slot] if slot < len(node.inputs) else None
                        dq = dq_node(v) if space is None else None
                        if dq is not None:  # a QDQ weight: the analysis binds its channels to the integer tensor
                            space = members.get((id(dq), 0, axis))
                    else:
                        v = node.outputs[slot]
                    if space is None and v is not None:
                        lay = ctx.layouts.get(v)
                        if lay is not None and axis < len(lay):
                            space = lay[axis]
                row.append((f.dim, space))
            self._factors.append(row)
        self._nodes = nodes
        self.before = self.estimate({})
        self._macs0 = self._node_macs(self._fractions({}))

    def _fractions(self, keep: dict[int, np.ndarray]):
        """``fr(space)``: the share of ``space`` that ``keep`` leaves, worked out once per space."""
        t, cache = self.ctx.table, {}

        def fr(space) -> float:
            f = cache.get(id(space))
            if f is None:
                f = cache[id(space)] = _keep_fraction(t, space, keep)
            return f

        return fr

    def _term_values(self, fr):
        """``(term, value)`` for every cost term under the fractions ``fr``."""
        for term, row in zip(self.terms, self._factors):
            v = 1
            for dim, space in row:
                v *= int(round(dim * fr(space))) if space is not None else dim
            yield term, v

    def _node_macs(self, fr) -> np.ndarray:
        out = np.zeros(len(self._nodes))
        for term, v in self._term_values(fr):
            if term.metric == "macs":
                out[term.node] += v
        return out

    def node_work(self, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Per node (graph order), the share of its work ``keep`` leaves: its
        MACs under the plan over its MACs before for a node that has MACs,
        else the share of its first output's elements left (an activation, a
        normalisation, an elementwise op moves that many values)."""
        fr = self._fractions(keep)
        macs = self._node_macs(fr)
        out = np.ones(len(self._nodes))
        for j, node in enumerate(self._nodes):
            if self._macs0[j] > 0:
                out[j] = macs[j] / self._macs0[j]
            elif node.outputs:
                out[j] = math.prod(fr(sp) for sp in self.ctx.layouts.get(node.outputs[0]) or () if sp is not None)
        return out

    def estimate(self, keep: dict[int, np.ndarray]) -> dict[str, int]:
        out = {"params": 0, "macs": 0}
        for term, v in self._term_values(self._fractions(keep)):
            if term.metric == "params" and v <= 1:
                continue  # as metrics.count: single-element tensors are constants, not weights
            out[term.metric] += v
        return out


@dataclass
class Target:
    metric: str  # "macs" | "params"
    value: float  # absolute
    requested: object  # as written in ratios.json


def parse_target(x, before: int, metric: str) -> Target:
    """``0 < x <= 1`` or ``"50%"``: a fraction of the original; larger numbers or
    ``"4.2G"`` / ``"20M"`` / ``"800K"``: absolute."""
    from onnxprune.errors import UserError

    v = x
    if isinstance(x, str):
        s = x.strip().upper()
        mult = {"%": None, "G": 1e9, "M": 1e6, "K": 1e3}.get(s[-1:], 1)
        try:
            num = float(s[:-1] if s[-1:] in "%GMK" else s)
        except ValueError:
            raise UserError(f"target_{metric} {x!r}: expected a number, 'N%' or 'N[K|M|G]'") from None
        v = num / 100 * before if mult is None else num * mult
    elif isinstance(x, bool) or not isinstance(x, (int, float)):
        raise UserError(f"target_{metric} must be a number or a string like '50%' or '4.2G', got {x!r}")
    elif 0 < x <= 1:
        v = x * before
    if not v > 0:
        raise UserError(f"target_{metric} must be positive, got {x!r}")
    return Target(metric, float(v), x)


def solve(ctx: Analysis, groups, ratios, target: Target, estimator: Estimator, scores, iters: int = 40):
    """Find the common scale ``s`` of the given ratios whose plan meets ``target``
    (the largest value not above it, or the closest one). Returns
    ``(scaled Ratios, plan, estimate, info)``."""
    from onnxprune.plan import make_plan

    base = ratios.base_for_target()
    evals: dict[float, tuple] = {}

    def at(s: float):
        if s not in evals:
            r = base.scaled(s, MAX_RATIO)
            p = make_plan(ctx, groups, r, scores=scores)
            evals[s] = (r, p, estimator.estimate(p.keep))
        return evals[s]

    m = target.metric
    hi = MAX_RATIO / max(base.max_ratio(), 1e-9)
    lo = 0.0
    if at(lo)[2][m] <= target.value:
        hi = lo
    elif at(hi)[2][m] > target.value:
        lo = hi  # cannot reach: take the most pruned
    else:
        for _ in range(iters):
            if hi - lo <= 1e-5 * hi:
                break
            mid = (lo + hi) / 2
            if at(mid)[2][m] <= target.value:
                hi = mid
            else:
                lo = mid
    cands = [at(lo), at(hi)]
    best = min(cands, key=lambda c: (abs(c[2][m] - target.value), c[2][m] > target.value))
    r, p, est = best
    s = lo if best is cands[0] else hi
    before = estimator.before[m]
    info = {
        "metric": m,
        "requested": target.requested,
        "target": target.value,
        "achieved": est[m],
        "before": before,
        "error": (est[m] - target.value) / target.value,
        "scale": s,
        "ratios_used": r.ratio_dict(),
        "evaluations": len(evals),
    }
    if abs(info["error"]) > 0.01:
        log.warning("target_%s: closest reachable is %s (%.1f%% off): channel granularity", m, est[m], 100 * info["error"])
    return r, p, est, info

"""Mean compensation of the candidates the damage search measures.

A channel removed from the input of a linear layer (a Conv, Gemm or MatMul
where the group's channels end) takes its contribution ``W[:, c] x_c`` with
it; on average that is ``W[:, c] E[x_c]``, a constant per output channel that
the layer's bias can carry (for a Conv, summed over the kernel taps: exact
away from zero padding). ``--recover`` gives at least that back (the bias row
of its ridge fit is never shrunk; ``--recover bias`` is exactly this plus the
drift of the layers above), so scope ``damage`` measures every candidate with
it folded in when recovery follows (a plain prune is measured as written).
Measured without it, a channel with a large mean and little variance looks
expensive although recovery returns it almost for free, and
the budget goes where recovery can do little.

The means come from the original model on the calibration data, one pass
whose sums per channel are taken inside ONNX Runtime (the caller's
``sums``, :func:`onnxprune.runtime.capture.channel_sums`).
Nothing here edits a model: :meth:`MeanShift.shifts` says how much each
layer's output moves, and the caller hands that to the rewriter
(:func:`onnxprune.rewrite.shift_output`).
"""
from __future__ import annotations

import numpy as np

from onnxprune.plan.importance.recon import consumers


class MeanShift:
    """Per consumer layer of the ``groups``' channels: its input's mean per
    position and the weight each position feeds each output with (summed
    over kernel taps; Gemm's ``alpha`` applied)."""

    def __init__(self, ctx, groups, sums, every=()):
        """``sums(axes)``: for ``axes`` (value name -> (channel axis, rank)) of
        the original model, ``{name: (sum per channel, entries per channel)}``
        over the calibration data. ``every``: all the model's groups (a plan
        may also remove a consumer's output channels; default ``groups``)."""
        by_node: dict[int, list] = {}
        for g in groups:
            for c in consumers(ctx, g):
                if c.node.op_type == "Conv" and c.groups != 1:
                    continue  # a grouped conv mixes per group: left out (rare where channels end)
                if not ctx.dims(c.x):
                    continue  # its rank unknown: no mean taken
                lm = ctx.table.leaf_map(ctx.layouts[c.x][c.axis], g.space, c.k)
                by_node.setdefault(id(c.node), [c, []])[1].append((g.id, lm))
        self.layers: list[tuple] = []  # (node, rows [k, outputs], mean [k], [(group id, leaf map)], output maps)
        if not by_node:
            return
        got = sums({c.x.name: (c.axis, len(ctx.dims(c.x))) for c, _ in by_node.values()})
        sums_of = {n: s for n, (s, _) in got.items()}
        counts = {n: k for n, (_, k) in got.items()}
        for c, lms in by_node.values():
            n = c.x.name
            if not counts.get(n) or len(sums_of[n]) != c.k:
                continue
            w = c.w.astype(np.float64)
            if c.node.op_type == "Conv":
                rows = w.sum(axis=tuple(range(2, w.ndim))).T  # [inputs, outputs]
            else:
                rows = w * (float(ctx.attr(c.node, "alpha", 1.0)) if c.node.op_type == "Gemm" else 1.0)
            self.layers.append((c.node, rows, sums_of[n] / counts[n], lms, _output_maps(ctx, c.node, rows.shape[1],
                                                                                  every or groups)))

    def shifts(self, keep: dict, unpruned: bool = False) -> list[tuple]:
        """``[(node, shift)]``: how much each layer's output (per output channel)
        must move so that, on average, it still gets what the channels removed
        by ``keep`` (group id -> kept indices) gave it. ``unpruned``: for the
        model with the removed channels zeroed instead of cut out, every layer,
        each shift as wide as the layer's whole output (0 on the channels the
        plan removes, and on every channel of a layer that lost no input)."""
        out = []
        for node, rows, mean, lms, outs in self.layers:
            gone = np.zeros(len(mean), bool)
            for gid, lm in lms:
                if gid in keep:
                    gone |= (lm >= 0) & ~np.isin(lm, keep[gid])
            if not gone.any():
                if unpruned:
                    out.append((node, np.zeros(rows.shape[1])))
                continue
            stays = np.ones(rows.shape[1], bool)  # output channels the plan keeps
            for gid, lm in outs:
                if gid in keep:
                    stays &= (lm < 0) | np.isin(lm, keep[gid])
            shift = rows[gone].T @ mean[gone]
            out.append((node, np.where(stays, shift, 0.0) if unpruned else shift[stays]))
        return out


def _output_maps(ctx, node, width: int, groups) -> list[tuple]:
    """``[(group id, leaf map)]`` of the groups laid along ``node``'s output
    channels (axis 1 of a Conv, the last of a Gemm or MatMul)."""
    y = node.outputs[0]
    lay = ctx.layouts.get(y)
    if not lay:
        return []
    s = lay[1] if node.op_type == "Conv" else lay[-1]
    if s is None:
        return []
    leaves = ctx.table.leaves(s)
    return [(g.id, ctx.table.leaf_map(s, g.space, width)) for g in groups if any(x is g.space for x in leaves)]


__all__ = ["MeanShift"]

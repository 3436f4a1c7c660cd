"""Channel importance of every group, per criterion.

Scores of a group are one number per channel (per head for ``heads``); a plan
ranks them inside a pool (an isomorphic set, a kind, or one group) and keeps the
highest. Scores of different kinds are never compared: pools never mix kinds.

| criterion | score of channel c | needs data |
|---|---|---|
| ``l2`` / ``l1`` | norm of every slice of c in every member tensor | no |
| ``random`` | uniform, seeded | no |
| ``bn_scale`` | abs of the normalisation scale (BatchNorm/LayerNorm/GroupNorm/InstanceNorm gamma) of c; groups without one fall back to ``l2`` (noted) | no |
| ``activation`` | mean abs activation of c, where the group's consumers read it (ORT, intermediate outputs exposed) | yes |
| ``taylor`` | sum over members of abs(w * dL/dw) over c's slices (gradients through the onnx2torch import; L = cross-entropy with label smoothing 0.1 against the data's labels, else the model's own predictions) | yes |
| ``hessian`` | sum over members and calibration batches of (w * dL/dw)^2: the diagonal empirical-Fisher approximation of the loss change (OBD-style) | yes |
| ``recon`` | relative output error the channel's removal leaves at the linear layers where it ends, after the least-squares re-fit that ``--recover ridge`` does (Optimal-Brain-Surgeon formula on the consumers' input covariance; see ``recon.py``) | yes |
| ``gohsp`` | heads only: stationary probability of the Markov chain over head-output cosine similarity (GOHSP, Alg. 2) | yes |
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune import io
from onnxprune.core.analysis import Analysis
from onnxprune.core.groups import Group
from onnxprune.errors import UserError

log = logging.getLogger(__name__)

CRITERIA = ("l2", "l1", "random", "bn_scale", "activation", "taylor", "hessian", "recon", "gohsp")
DATA_CRITERIA = {"activation", "taylor", "hessian", "recon", "gohsp"}
NORMS = {"BatchNormalization", "LayerNormalization", "GroupNormalization", "InstanceNormalization"}
GOHSP_EPS = 1e-12
GOHSP_MAX_ITERS = 100000


@dataclass
class Scores:
    values: dict = field(default_factory=dict)  # group id -> per-channel scores
    used: dict = field(default_factory=dict)  # group id -> criterion actually used
    notes: dict = field(default_factory=dict)  # group id -> why a fallback happened
    gohsp: dict = field(default_factory=dict)  # group id -> {"P": ..., "stationary": ..., "iterations": ...}
    unit: dict = field(default_factory=dict)  # group id -> MACs (or params) one channel saves (scope "cost")


def criterion_for(spec: dict, kind: str) -> str:
    return spec.get(kind, spec.get("default", "l2"))


# -- helpers -------------------------------------------------------------------------------
def _per_channel(per_position: np.ndarray, lm: np.ndarray, width: int, how: str = "sum") -> np.ndarray:
    out = np.zeros(width)
    sel = lm >= 0
    np.add.at(out, lm[sel], per_position[sel])
    if how == "mean":
        cnt = np.bincount(lm[sel], minlength=width).astype(float)
        out = out / np.maximum(cnt, 1)
    return out


def magnitude(ctx: Analysis, g: Group, criterion: str, arrays: dict | None = None) -> np.ndarray:
    """l1/l2 norm of every slice of each channel over every member tensor (or,
    with ``arrays``, the l1 sum of those per-element arrays by tensor name)."""
    scores = np.zeros(g.width)
    for m in g.tensors:
        if arrays is not None:
            arr = arrays.get(m.value.name)
        elif m.node.op_type == "DequantizeLinear" and m.slot == 0:
            arr = ctx.const(m.node.outputs[0])  # a quantized weight: its dequantized values
        else:
            arr = ctx.const(m.value)
        if arr is None or not np.issubdtype(arr.dtype, np.floating) or arr.ndim <= m.axis:
            continue
        lm = ctx.table.leaf_map(m.space, g.space)
        scores += _per_channel(_slice_norms(arr, m.axis, criterion == "l2"), lm, g.width)
    return np.sqrt(scores) if criterion == "l2" else scores


def _slice_norms(arr: np.ndarray, axis: int, squared: bool, chunk: int = 1 << 20) -> np.ndarray:
    """Sum of squares (or of absolute values) of every slice along ``axis``, in
    float64, a few rows at a time (no full-size temporaries of a large weight)."""
    per = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
    out = np.empty(per.shape[0])
    step = max(1, chunk // max(per.shape[1], 1))
    for i in range(0, per.shape[0], step):
        block = per[i:i + step].astype(np.float64)
        out[i:i + step] = np.einsum("ij,ij->i", block, block) if squared else np.abs(block).sum(1)
    return out


def bn_scale(ctx: Analysis, g: Group) -> np.ndarray | None:
    scores, found = np.zeros(g.width), False
    for m in g.tensors:
        if m.node.op_type in NORMS and m.slot == 1:
            arr = ctx.const(m.value)
            if arr is None:
                continue
            lm = ctx.table.leaf_map(m.space, g.space)
            per = np.abs(np.moveaxis(arr.astype(np.float64), m.axis, 0).reshape(arr.shape[m.axis], -1)).mean(1)
            scores += _per_channel(per, lm, g.width)
            found = True
    return scores if found else None


def _activation_site(ctx: Analysis, g: Group):
    """(value, axis) where the group's channels are read: a consumer's data
    input, else a producer's output."""
    t = ctx.table
    leaf = g.space

    def has(v, ax):
        lay = ctx.layouts.get(v)
        s = lay[ax] if lay and ax < len(lay) else None
        return s is not None and any(x is leaf for x in t.leaves(s))

    for role in ("in", "out"):
        for m in g.tensors:
            if m.role != role:
                continue
            vals = m.node.inputs if role == "in" else m.node.outputs
            for v in vals:
                if v is None or v.const_value is not None or v not in ctx.layouts:
                    continue
                for ax in range(len(ctx.layouts[v])):
                    if has(v, ax):
                        return v, ax
    return None


def _av_site(ctx: Analysis, g: Group):
    """The attention output of a heads group: the AV MatMul (activation x
    activation, last axis a head_dim) or an Attention op's output."""
    t = ctx.table
    for node in ctx.graph:
        if node.op_type not in ("MatMul", "Attention"):
            continue
        if node.op_type == "MatMul" and any(v is None or v.const_value is not None for v in node.inputs[:2]):
            continue
        out = node.outputs[0]
        lay = ctx.layouts.get(out)
        if not lay:
            continue
        if node.op_type == "MatMul":
            last = lay[-1]
            if last is None or not any("head_dim" in t.find(x).tags for x in t.leaves(last)):
                continue
        for ax, s in enumerate(lay):
            if s is not None and any(x is g.space for x in t.leaves(s)):
                return out, ax
    return None


def _capture(proto: onnx.ModelProto, names: list[str], calib, threads: int | None = None):
    """Yield ``(batch index, {name: array})`` with the named values exposed as outputs."""
    from onnxprune.runtime.capture import exposed

    sess = exposed(proto, names, threads or 0)
    inputs = [i.name for i in sess.get_inputs()]
    for k in range(len(calib.batches)):
        outs = sess.run(names, calib.feed(k, inputs))
        yield k, dict(zip(names, outs))


def _power_iteration(P: np.ndarray) -> tuple[np.ndarray, int]:
    n = len(P)
    s = np.full(n, 1.0 / n)
    for it in range(1, GOHSP_MAX_ITERS + 1):
        s2 = P @ s
        if np.abs(s2 - s).sum() <= GOHSP_EPS:
            return s2, it
        s = s2
    return s, GOHSP_MAX_ITERS


def gohsp_matrix(head_vectors: np.ndarray) -> np.ndarray:
    """P(i, j) = cosine similarity of the summed outputs of heads i and j
    (GOHSP, Eq. 3), negatives clamped to 0 (a Markov chain
    needs non-negative weights; the paper is silent), columns normalised
    (Alg. 2, line 5)."""
    v = head_vectors.astype(np.float64)
    norms = np.linalg.norm(v, axis=1)
    norms[norms == 0] = 1.0
    u = v / norms[:, None]
    P = np.clip(u @ u.T, 0.0, None)
    col = P.sum(0)
    col[col == 0] = 1.0
    return P / col[None, :]


def gohsp_scores(head_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    P = gohsp_matrix(head_vectors)
    s, it = _power_iteration(P)
    return s, P, it


# -- driver --------------------------------------------------------------------------------
def score_groups(ctx: Analysis, groups: list[Group], spec: dict, seed: int = 0, proto=None, calib=None,
                 after_group=None) -> Scores:
    """Scores of every prunable group under ``spec`` (``{kind | "default": criterion}``).
    ``after_group(group)`` is called after each data-free score (memory upkeep, progress)."""
    rng = np.random.default_rng(seed)
    out = Scores()
    live = [g for g in groups if not g.frozen]
    want = {g.id: criterion_for(spec, g.kind) for g in live}
    for g in live:
        if want[g.id] == "gohsp" and g.kind != "heads":
            out.notes[g.id] = f"gohsp ranks heads only; l2 used for this {g.kind} group"
            want[g.id] = "l2"
    needs = {c for c in want.values() if c in DATA_CRITERIA}
    if needs and (calib is None or proto is None):
        raise UserError(f"importance {', '.join(sorted(needs))} needs calibration data: --calib DIR | FILE.npy | synthetic")
    # data-free criteria (random draws in group order, so plans are reproducible)
    for g in live:
        c = want[g.id]
        if c == "random":
            out.values[g.id] = rng.random(g.width)
        elif c in ("l1", "l2"):
            out.values[g.id] = magnitude(ctx, g, c)
        elif c == "bn_scale":
            s = bn_scale(ctx, g)
            if s is None:
                out.notes[g.id] = "no normalisation scale in this group; l2 used"
                s = magnitude(ctx, g, "l2")
                want[g.id] = "l2"
            out.values[g.id] = s
        if after_group is not None:
            after_group(g)
    if "taylor" in needs or "hessian" in needs:
        arrays = _taylor_arrays(proto, calib, {c for c in needs if c in ("taylor", "hessian")})
        for g in live:
            c = want[g.id]
            if c in ("taylor", "hessian"):
                s = magnitude(ctx, g, "l1", arrays[c])
                if not s.any():
                    out.notes[g.id] = "no gradient reached this group's tensors; l2 used"
                    s = magnitude(ctx, g, "l2")
                    want[g.id] = "l2"
                out.values[g.id] = s
    if "recon" in needs:
        from onnxprune.plan.importance.recon import consumer_plans, recon_scores

        todo = [g for g in live if want[g.id] == "recon"]
        plans = consumer_plans(ctx, todo)
        # groups recon cannot score (no linear layer where they end) get activation, summed with the other
        # data criteria in recon's own pass over the data
        early = {**want, **{g.id: "activation" for g in todo if g.id not in plans}}
        data = _DataScores(ctx, live, early, calib, out) \
            if any(c in ("activation", "gohsp") for c in early.values()) else None
        want.update({gid: "l2" for gid, c in early.items() if c == "l2"})  # nothing to capture: l2, noted

        def capture(proto_, names, calib_):
            for k, vals in _capture(proto_, sorted(set(names) | set(data.names if data else ())), calib_):
                if data is not None:
                    data.add(k, vals)
                yield k, vals

        vals, notes = recon_scores(ctx, todo, proto, calib, capture, seed, plans=plans)
        out.values.update(vals)
        if data is not None:
            data.finish()
        later = []
        for gid, why in notes.items():
            if early[gid] == "l2":  # nothing to capture either: l2, noted by _DataScores
                continue
            out.notes[gid] = f"{why}; activation used"
            want[gid] = "activation"
            if data is None or gid not in data.sites:  # recon found no signal where it expected one
                later.append(gid)
        if later:
            _data_scores(ctx, [g for g in live if g.id in later], want, proto, calib, out)
    elif any(c in ("activation", "gohsp") for c in want.values()):
        _data_scores(ctx, live, want, proto, calib, out)
    out.used = want
    return out


class _DataScores:
    """``activation`` and ``gohsp`` scores, summed batch by batch from the
    captured values :attr:`names` (:meth:`add`), finished by :meth:`finish`.
    Groups with nothing to capture get ``l2`` (noted) when it is made."""

    def __init__(self, ctx, live, want, calib, out: Scores):
        self.ctx, self.want, self.calib, self.out = ctx, want, calib, out
        self.live = [g for g in live if want[g.id] in ("activation", "gohsp")]
        self.sites = {}
        for g in self.live:
            site = _activation_site(ctx, g) if want[g.id] == "activation" else _av_site(ctx, g)
            if site is None:
                out.notes[g.id] = f"no {'activation' if want[g.id] == 'activation' else 'attention output'} to capture; l2 used"
                want[g.id] = "l2"
                out.values[g.id] = magnitude(ctx, g, "l2")
            else:
                self.sites[g.id] = site
        self.names = sorted({v.name for v, _ in self.sites.values()})
        self.acc: dict[int, np.ndarray] = {}
        self.seen: set[int] = set()

    def add(self, k: int, vals: dict) -> None:
        """The values of calibration batch ``k`` (each batch counted once)."""
        if k in self.seen:
            return
        self.seen.add(k)
        calib, ctx, acc = self.calib, self.ctx, self.acc
        B = len(calib.batches[k])
        for g in self.live:
            if g.id not in self.sites:
                continue
            v, ax = self.sites[g.id]
            arr = vals[v.name].astype(np.float64)
            if self.want[g.id] == "activation":
                lm = ctx.table.leaf_map(ctx.layouts[v][ax], g.space, arr.shape[ax])
                per = np.abs(np.moveaxis(arr, ax, 0)).reshape(arr.shape[ax], -1).mean(1)
                acc[g.id] = acc.get(g.id, 0) + _per_channel(per, lm, g.width, "mean") / len(calib.batches)
            else:  # gohsp: sum the head outputs over the samples of the batch
                n0 = arr.shape[0]
                if n0 % B:
                    raise RuntimeError(f"cannot separate the batch from axis 0 of {v.name} ({n0} vs batch {B})")
                summed = arr.reshape(B, n0 // B, *arr.shape[1:]).sum(0)
                acc[g.id] = acc.get(g.id, 0) + summed

    def finish(self) -> None:
        ctx, calib, out, acc = self.ctx, self.calib, self.out, self.acc
        for g in self.live:
            if g.id not in self.sites:
                continue
            if self.want[g.id] == "activation":
                out.values[g.id] = acc[g.id]
                continue
            v, ax = self.sites[g.id]
            summed = acc[g.id]
            if ax == 0:
                lm = ctx.table.leaf_map(ctx.layouts[v][0], g.space, summed.shape[0] * len(calib.batches[0]))[: summed.shape[0]]
            else:
                lm = ctx.table.leaf_map(ctx.layouts[v][ax], g.space, summed.shape[ax])
            vecs = np.stack([np.take(summed, np.where(lm == h)[0], axis=ax).ravel() for h in range(g.width)])
            s, P, it = gohsp_scores(vecs)
            out.values[g.id] = s
            out.gohsp[g.id] = {"P": P.round(8).tolist(), "stationary": s.tolist(), "iterations": it, "value": v.name,
                               "samples": calib.n, "negatives_clamped": True}


def _data_scores(ctx, live, want, proto, calib, out: Scores) -> None:
    acc = _DataScores(ctx, live, want, calib, out)
    for k, vals in _capture(proto, acc.names, calib):
        acc.add(k, vals)
    acc.finish()


def _taylor_arrays(proto, calib, which: set) -> dict[str, dict[str, np.ndarray]]:
    """Per-initializer |w * g| (taylor) and sum_b (w * g_b)^2 (hessian), in ONNX layout."""
    try:
        import torch
        import torch.nn.functional as F

        from onnxprune.torchbridge.importer import tensor_at, import_onnx
    except ImportError as e:
        raise UserError(f"taylor/hessian importance needs torch and onnx2torch: pip install 'onnxprune[finetune]' ({e})") from None
    imp = import_onnx(proto)
    mod = imp.module.eval()
    params = {name: tensor_at(mod, imp.links[name][0].path) for name in imp.trainable}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    inputs = io.input_names(proto)
    for k in range(len(calib.batches)):
        mod.zero_grad(set_to_none=True)
        feed = calib.feed(k, inputs)
        logits = mod(*[torch.from_numpy(feed[n]) for n in inputs])
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        y = torch.from_numpy(calib.labels[k]).long() if calib.labels is not None else logits.argmax(-1).detach()
        # label smoothing keeps gradients alive where the softmax saturates (own-prediction labels)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), y.reshape(-1), label_smoothing=0.1).backward()
        for n, p in params.items():
            if p.grad is not None:
                grads[n] += p.grad
                fisher[n] += (p.detach() * p.grad) ** 2
    out: dict[str, dict[str, np.ndarray]] = {"taylor": {}, "hessian": {}}
    inits = {i.name: i for i in proto.graph.initializer}
    for n, p in params.items():
        link = imp.links[n][0]
        for key, val in (("taylor", (p.detach() * grads[n]).abs()), ("hessian", fisher[n])):
            a = val.numpy()
            if link.transform == "T":
                a = a.T
            out[key][n] = a.reshape(tuple(inits[n].dims))
    return out

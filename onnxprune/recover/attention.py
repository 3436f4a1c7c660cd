"""Attention logits in the re-fit: when head dims go, q and k are re-fitted
*together* so that the kept dims reproduce the original logits q.k^T per head.

Re-fitting q and k separately asks each kept column to reproduce its original
column; the logits then lose the removed dims' share of q.k^T outright. Here,
per head, both sides are fitted on all of the head's original dims (targets:
the original model's q and k operands, inputs: the pruned model's), their
bilinear form ``Wq Wk^T`` is reduced to the kept rank in the metric of the
input statistics (:func:`onnxprune.recover.fit._logit_factors`), and the two
factors become the head's kept q and k columns. The values and the output
projection are re-fitted afterwards as usual, from the pruned model's
activations with these logits in place.

Which columns of a linear layer are head ``h``'s dim ``j`` is read from the
data, not from the layout: each column of the original q (and k) operand is
matched to the column of its linear layer's output it is an affine copy of
(:func:`~onnxprune.recover.fit._match_columns`); any doubt (a dead column, a
per-column scale, tokens in another order) leaves the pair to the separate
fits. A layer whose rows run sequence first (``[tokens, B, C]``: torch's
``nn.MultiheadAttention``, whose q and k are columns of one packed in_proj) is
matched with the operands' rows put in that order. A head is re-fitted jointly only where that beats the separate fits on
held-out calibration sources (the squared logit error over pairs of tokens).
The logits are found where they are formed (:func:`~onnxprune.recover.graph._logit_sites`):
a q.k^T MatMul going to a Softmax (operands ``[..., tokens, d]`` and
``[..., d, tokens]``), an ``Einsum`` that forms them the same way or from ``[..., tokens, d]``
operands on both sides (``bgpid,bgpjd->bgpij``, as torchvision's MaxViT writes it), the ONNX ``Attention`` op (4-D ``[B, heads, tokens, d]``
or 3-D ``[B, tokens, heads * d]`` q and k) and onnxruntime's
``MultiHeadAttention`` with separate 3-D q/k/v, whose packed bias is added to
q and k inside the op (the fit targets include it, and the written columns
leave it to the op), and onnxruntime's packed-weight ``Attention``, whose q/k/v
projection inside the op is itself the re-fitted layer (q and k: slices of its
output, computed from the original's input). Self-attention only (q and k read
the same input).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import helper

from onnxprune.recover.fit import LayerRow, _Fit, _logit_err, _logit_factors, _match_columns
from onnxprune.recover.graph import _attention_linears, _attention_pairs, _Initializers, is_packed_attention


TWO_OPERANDS = ("matmul", "einsum")  # logits formed from q and k alone (no op of their own with heads or a bias)
LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # ridge strengths tried for the joint fit (relative, as for the layers)


@dataclass
class _Logits:
    """One q.k^T MatMul whose q and k come from re-fitted linear layers."""

    row: LayerRow
    fq: _Fit
    fk: _Fit
    q_val: str  # the original model's q operand (left input of q.k^T)
    k_val: str  # its k^T operand
    heads: list | None = None  # per head that lost dims: (kept q columns, kept k columns, first operand column, head dim)
    scale: tuple = (1.0, 1.0)
    failed: str = ""
    folds: dict = field(default_factory=dict)  # fold -> [G, [Cq], [Ck], [Sq], [Sk]] per head
    kind: str = "matmul"  # where the logits are formed (graph._logit_sites): k^T on the right for "matmul"
    # (and an Einsum that contracts as one), k as [..., tokens, d] for "einsum"
    num_heads: int = 0  # heads side by side in the last axis of 3-D operands (attention ops)
    bias: tuple = (None, None)  # q and k biases the op adds itself (MultiHeadAttention), original widths
    layer_bias: tuple = (None, None)  # the original bias Adds of q's and k's MatMuls (their columns include them)
    offset: tuple = (None, None)  # per operand column: what the operand adds to scale x its layer's column
    seq_tokens: int = 0  # the layer's rows are [tokens, B] (sequence first: nn.MultiheadAttention): its token count

    @property
    def level(self) -> int:
        return self.fq.row.level


def extra_layers(g, names: list[str], outs) -> list[str]:
    """The q/k linear layers that lost output columns (head dims) but read
    unchanged inputs: not re-fitted otherwise, needed for the joint fit.
    ``outs``: node -> its OUT members' kept indices (:func:`~onnxprune.recover.graph._kept_maps`)."""
    linears = {n.name for n in g.g if n.name and n.op_type in ("MatMul", "Gemm") and len(n.inputs) > 1
               and g.const(n.inputs[1]) is not None}
    packed = {n.name for n in g.g if n.name and is_packed_attention(n)}
    lost = {name for name in linears | packed if any(len(k) < w for _, _, k, w, _ in outs.get(name, []))}
    return sorted(((_attention_linears(g, linears) | packed) & lost) - set(names))


def _heads_and_bias(on, inits: dict):
    """An attention op's head count and the q and k biases it adds itself:
    ``(num_heads, (bq, bk))``, or a string saying why its logits are not re-fitted."""
    attrs = {a.name: helper.get_attribute_value(a) for a in on.attribute}
    if is_packed_attention(on):  # its bias is part of the layer (the fit's own bias row)
        return int(attrs.get("num_heads", 0)), (None, None)
    if on.op_type == "Attention":
        nq, nkv = int(attrs.get("q_num_heads", 0)), int(attrs.get("kv_num_heads", 0))
        if nq != nkv:
            return "grouped-query Attention"
        return nq, (None, None)
    nh = int(attrs.get("num_heads", 0))
    if len(on.input) > 3 and on.input[3]:
        b = inits.get(on.input[3])
        if b is None:
            return "the MultiHeadAttention bias is not a constant"
        return nh, (b, None)  # split into q and k once the widths are known (_map)
    return nh, (None, None)


def _layer_bias(fit: _Fit, onodes: dict, inits: dict):
    """A MatMul layer's original bias (the Add after it, whose value its fitted
    columns include; the captured output is the MatMul's own): full width,
    0.0 when it has none, None when it cannot be read."""
    if not fit.dense.get("matmul") or getattr(fit, "bias_add", None) is None:
        return 0.0
    add = onodes.get(fit.bias_add)
    arrs = [inits[v] for v in add.input if v in inits] if add is not None else []
    return arrs[0].reshape(-1).astype(np.float64) if len(arrs) == 1 else None


def plan(g, fits: list[_Fit], original) -> list[_Logits]:
    """The attention logits of the pruned model ``g`` to re-fit jointly."""
    by_name = {f.row.node: f for f in fits}
    onodes = {n.name: n for n in original.graph.node if n.name}
    inits = _Initializers(original)
    # a QDQ model: q and k pass activation quantizers whose fixed ranges would clip what the joint fit
    # makes of them (it may trade scale between q and k); on a QDQ ViT the logits' own errors fell
    # four- to tenfold and the model's output error rose 0.30 -> 0.76 on held-out inputs
    quantized = any(n.op_type == "QuantizeLinear" for n in g.g)
    out = []
    for p in _attention_pairs(g, by_name):
        on = onodes.get(p["node"])
        fq, fk = by_name[p["q_fit"]], by_name[p["k_fit"]]
        if on is None or len(on.input) < 2 or (p["kind"] in TWO_OPERANDS) != (len(on.input) == 2) \
                or fq.row.level != fk.row.level or fq.dense.get("transA") or fk.dense.get("transA"):
            continue
        row = LayerRow(node=p["node"], op=on.op_type, status="skipped", method="qk-logits", level=fq.row.level,
                       inputs_kept="q.k^T")
        k_val = on.input[0] if p["kind"] == "packed" else on.input[1]  # packed: both from the op's input
        lg = _Logits(row=row, fq=fq, fk=fk, q_val=on.input[0], k_val=k_val, kind=p["kind"])
        try:
            lg.layer_bias = (_layer_bias(fq, onodes, inits), _layer_bias(fk, onodes, inits))
            got = _heads_and_bias(on, inits) if p["kind"] not in TWO_OPERANDS else (0, (None, None))
        except Exception as e:  # an unreadable constant: the separate fits stay
            lg.layer_bias, got = (0.0, 0.0), f"could not read the attention's constants: {type(e).__name__}: {e}"
        if quantized:
            lg.failed = "q and k pass activation quantizers (a QDQ model): their ranges would clip a joint fit"
        elif any(b is None for b in lg.layer_bias):
            lg.failed = "the bias of a q or k layer is not a constant of the original"
        elif isinstance(got, str):
            lg.failed = got
        else:
            lg.num_heads, lg.bias = got
        out.append(lg)
    return out


def _rows(op: np.ndarray, rows: int, right: bool, flat: bool = False) -> np.ndarray | None:
    """An operand ``[..., tokens, d]`` (``[..., d, tokens]`` on the right;
    ``flat``: 3-D ``[B, tokens, heads * d]``) as ``[rows, heads * d]`` in the
    (sample, token) order of its linear layer's rows."""
    if flat:
        return op.reshape(rows, -1) if op.ndim == 3 and op.shape[0] * op.shape[1] == rows else None
    if right:
        op = np.swapaxes(op, -1, -2)
    tokens, d = op.shape[-2:]
    if rows % tokens or op.size % (rows * d):
        return None
    b, h = rows // tokens, op.size // (rows * d)
    return op.reshape(b, h, tokens, d).transpose(0, 2, 1, 3).reshape(rows, h * d)


def _operands(lg: _Logits, oq, ok, rows: int):
    """The original q and k operands as ``[rows, heads * d]`` with the biases
    the op adds itself, and the head dim; None when they do not line up."""
    if lg.kind == "packed":  # q and k: slices of the op's own projection of its input
        d = lg.fq.dense
        x = oq.reshape(rows, -1) if oq.size % rows == 0 else None
        nq = d["q"]
        if x is None or not lg.num_heads or nq % lg.num_heads:
            return None
        return (x @ d["w"][:, :nq] + d["b"][:nq], x @ d["w"][:, nq:2 * nq] + d["b"][nq:2 * nq], nq // lg.num_heads)
    flat = lg.kind not in TWO_OPERANDS and oq.ndim == 3
    if flat and (not lg.num_heads or oq.shape[-1] % lg.num_heads):
        return None
    q, k = _rows(oq, rows, False, flat), _rows(ok, rows, lg.kind == "matmul", flat)
    if q is None or k is None or q.shape != k.shape:
        return None
    bq, bk = lg.bias
    if bq is not None and bk is None:  # MultiHeadAttention's packed bias [q | k | v]
        if len(bq) < 2 * q.shape[1]:
            return None
        bq, bk = bq[:q.shape[1]], bq[q.shape[1]:2 * q.shape[1]]
        lg.bias = (bq, bk)
    if bq is not None:
        q, k = q + bq, k + bk
    t = lg.seq_tokens
    if t:  # the operands' (sample, token) rows in the layer's (token, sample) order
        if rows % t:
            return None
        q, k = (a.reshape(rows // t, t, -1).transpose(1, 0, 2).reshape(rows, -1) for a in (q, k))
    return q, k, (oq.shape[-1] // lg.num_heads if flat else oq.shape[-1])


def _map(lg: _Logits, yq, yk, oq, ok) -> None:
    """Which columns of the linear layers carry each head's q and k dims, and
    which heads lost dims (``lg.heads``); ``lg.failed`` says why not."""
    rq, rk = yq.reshape(-1, yq.shape[-1]), yk.reshape(-1, yk.shape[-1])
    if lg.kind == "packed":  # the layer's output is the projection inside the op; q and k are slices of it
        rq = rk = rq @ lg.fq.dense["w"] + lg.fq.dense["b"]
        nq = lg.fq.dense["q"]
        ok_heads = lg.num_heads and not nq % lg.num_heads
        got = (rq[:, :nq], rq[:, nq:2 * nq], nq // lg.num_heads) if ok_heads else None
    else:
        got = _operands(lg, oq, ok, len(rq)) if len(rq) == len(rk) else None
    if got is None:
        lg.failed = "the q/k operands do not line up with their linear layers' rows"
        return
    q, k, d = got
    take = slice(0, min(len(rq), 2048))
    mq, mk = _match_columns(q[take], rq[take]), _match_columns(k[take], rk[take])
    if (mq is None or mk is None) and lg.kind in TWO_OPERANDS and yq.ndim == 3 and yq.shape[0] != yq.shape[1]:
        lg.seq_tokens = yq.shape[0]  # sequence first ([tokens, B, C]): the operands' rows in that order
        got = _operands(lg, oq, ok, len(rq))
        if got is not None:
            q, k, d = got
            mq, mk = _match_columns(q[take], rq[take]), _match_columns(k[take], rk[take])
        if mq is None or mk is None:
            lg.seq_tokens = 0
    if mq is None or mk is None:
        lg.failed = "the q/k operand columns are not affine copies of their linear layers' outputs"
        return
    (cq, sq), (ck, sk) = mq, mk
    if np.ptp(sq) > 1e-3 * abs(sq[0]) or np.ptp(sk) > 1e-3 * abs(sk[0]):
        lg.failed = "q or k is scaled per column"
        return
    lg.scale = (float(np.mean(sq)), float(np.mean(sk)))
    # what each operand column adds to scale x its layer's column (constant Adds
    # on the way, the op's own bias): the pruned operand keeps it for its kept dims
    bq, bk = (b if np.ndim(b) == 0 else b[c] for b, c in zip(lg.layer_bias, (cq, ck)))
    lg.offset = (q[take].mean(0) - lg.scale[0] * (rq[take][:, cq].mean(0) + bq),
                 k[take].mean(0) - lg.scale[1] * (rk[take][:, ck].mean(0) + bk))
    posq = {int(c): i for i, c in enumerate(lg.fq.kept_out)}
    posk = {int(c): i for i, c in enumerate(lg.fk.kept_out)}
    heads = []
    for h in range(len(cq) // d):
        qc, kc = cq[h * d:(h + 1) * d], ck[h * d:(h + 1) * d]
        jq = [j for j in range(d) if int(qc[j]) in posq]
        jk = [j for j in range(d) if int(kc[j]) in posk]
        if jq != jk:
            lg.failed = f"head {h} keeps different q and k dims"
            return
        if 0 < len(jq) < d:
            heads.append(([posq[int(qc[j])] for j in jq], [posk[int(kc[j])] for j in jk], h * d, d, jq))
    lg.heads = heads
    if not heads:
        lg.failed = "no head lost dims"


def accumulate(lg: _Logits, x, yq, yk, oq, ok, fold, rng, budget: int, out: bool = False) -> None:
    """Add one batch: ``x`` the pruned model's input to q/k, ``yq``/``yk`` the
    original linear layers' outputs, ``oq``/``ok`` the original q and k
    operands; ``fold``: the fold of each sample (-1: kept out of the checked
    fits; summed apart for the written ones with ``out``)."""
    if lg.failed:
        return
    if lg.heads is None:
        _map(lg, yq, yk, oq, ok)
        if lg.failed:
            return
    X = x.reshape(-1, x.shape[-1])
    got = _operands(lg, oq, ok, len(X))
    if got is None:
        lg.failed = "the q/k operands do not line up with the input rows"
        return
    q, k, _ = got
    if lg.seq_tokens:  # rows [tokens, B]
        sample = np.arange(len(X)) % max(len(X) // lg.seq_tokens, 1)
    else:
        sample = np.arange(len(X)) // max(len(X) // len(fold), 1)
    take = np.arange(len(X)) if len(X) <= budget else np.sort(rng.choice(len(X), budget, replace=False))
    fb = fold[np.minimum(sample[take], len(fold) - 1)]
    Xa = np.empty((len(take), X.shape[1] + 1))
    Xa[:, :-1] = X[take]
    Xa[:, -1] = 1.0
    tq, tk = q[take] / lg.scale[0], k[take] / lg.scale[1]
    for v in np.unique(fb):
        if v < 0 and not out:
            continue
        s = fb == v
        Xs = Xa[s]
        st = lg.folds.setdefault(int(v), [0.0, [0.0] * len(lg.heads), [0.0] * len(lg.heads), [0.0] * len(lg.heads),
                                         [0.0] * len(lg.heads)])
        st[0] = st[0] + Xs.T @ Xs
        for i, (_, _, c0, d, _) in enumerate(lg.heads):
            Tq, Tk = tq[s, c0:c0 + d].astype(np.float64), tk[s, c0:c0 + d].astype(np.float64)
            st[1][i] = st[1][i] + Xs.T @ Tq
            st[2][i] = st[2][i] + Xs.T @ Tk
            st[3][i] = st[3][i] + Tq.T @ Tq
            st[4][i] = st[4][i] + Tk.T @ Tk


def _shift(lg: _Logits, side: int, c0: int, kept) -> np.ndarray:
    """The kept dims' operand offsets in the units of the layer's output (the
    intercept row of a head's columns that turns them into operand columns)."""
    return lg.offset[side][[c0 + j for j in kept]] / lg.scale[side]


def _full(fit: _Fit, W: np.ndarray, pos) -> np.ndarray:
    """Columns ``pos`` of a fit's solution in the units of its layer's output
    with the bias (a MatMul's solution holds the change of its bias Add)."""
    out = W[:, pos].copy()
    if fit.dense.get("matmul"):
        out[-1] += np.asarray(fit.dense["bias"])[pos]
    return out


def _put(fit: _Fit, W: np.ndarray, pos, cols: np.ndarray) -> None:
    W[:, pos] = cols
    if fit.dense.get("matmul"):
        W[-1, pos] -= np.asarray(fit.dense["bias"])[pos]


def _offset(cols: np.ndarray, off: np.ndarray) -> np.ndarray:
    """A layer's columns (bias last) with ``off`` added to the bias row: as
    operand columns over the scale (or back, with ``-off``)."""
    out = cols.copy()
    out[-1] += off
    return out


def solve(lg: _Logits, final: dict, ridge: float, checked: dict | None = None) -> None:
    """Re-fit q and k jointly per head where that beats the separate fits on
    held-out folds; ``final``: fit name -> its solution (the list of
    :func:`~onnxprune.recover.fit._solve`; absent: the pruned weights stay),
    given the jointly fitted columns when any head is. Rows kept out of the
    checked fits (fold -1) are in the written fit only; ``checked``: the same
    for the fits without them (the whole-model check's), given their own
    jointly fitted columns."""
    if lg.failed or not any(k >= 0 for k in lg.folds) or any(f.row.status == "skipped" for f in (lg.fq, lg.fk)):
        lg.row.reason = lg.failed or "its q or k layer was not re-fitted"
        return
    fq, fk = lg.fq, lg.fk
    # copies: the solutions in ``final`` change only once every head is done
    Wq = final.get(fq.row.node, fq.w0)[0].copy()
    Wk = Wq if fk is fq else final.get(fk.row.node, fk.w0)[0].copy()
    folds = [v for k, v in lg.folds.items() if k >= 0]
    tot = [sum(f[0] for f in folds)] + [[sum(f[j][i] for f in folds) for i in range(len(lg.heads))] for j in (1, 2, 3, 4)]
    out = lg.folds.get(-1)
    # the written fit's statistics: the checked ones and the rows kept out of them
    every = tot if out is None else [tot[0] + out[0]] + [[t + o for t, o in zip(tot[j], out[j])] for j in (1, 2, 3, 4)]
    checked = checked if out is not None else None
    if checked is not None:
        Wq_c = checked.get(fq.row.node, fq.w0)[0].copy()
        Wk_c = Wq_c if fk is fq else checked.get(fk.row.node, fk.w0)[0].copy()
    sums = {"pruned": 0.0, "written": 0.0, "base": 0.0}
    held = {"pruned": 0.0, "chosen": 0.0}
    joint, lams = 0, []
    heads = []  # per head: its candidates, zero weights to shrink towards, held-out errors, errors per strength
    for i, (pq, pk, c0, d, kept) in enumerate(lg.heads):
        oq, ok = _shift(lg, 0, c0, kept), _shift(lg, 1, c0, kept)
        cand = {c: (_offset(_full(fq, Wa, pq), oq), _offset(_full(fk, Wb, pk), ok))
                for c, (Wa, Wb) in {"pruned": (fq.w0[0], fk.w0[0]), "separate": (Wq, Wk)}.items()}
        # both sides re-fitted on all the head's dims: the removed ones have no
        # pruned weights to shrink towards, so the strength is chosen here, on held-out folds
        zq, zk = np.zeros((cand["pruned"][0].shape[0], d)), np.zeros((cand["pruned"][1].shape[0], d))
        heads.append({"cand": cand, "zero": (zq, zk), "r": len(pq), "err": {c: 0.0 for c in cand}, "by_lam": {},
                      "shift": (oq, ok)})
    for f in folds if len(folds) > 1 else []:  # fit on the other folds, measure on this one
        for i, h in enumerate(heads):
            for c, (a, b) in h["cand"].items():
                h["err"][c] += _logit_err(f[0], f[1][i], f[2][i], f[3][i], f[4][i], a, b)
        G = tot[0] - f[0]
        for lam in LAMBDAS:  # every head of the layer at once: they share the input statistics
            pairs = _logit_factors(G, [(tot[1][i] - f[1][i], tot[2][i] - f[2][i], *h["zero"], h["r"])
                                       for i, h in enumerate(heads)], lam)
            for i, (h, (A, B)) in enumerate(zip(heads, pairs)):
                h["by_lam"][lam] = h["by_lam"].get(lam, 0.0) + _logit_err(f[0], f[1][i], f[2][i], f[3][i], f[4][i], A, B)
    for h in heads:
        h["lam"] = min(h["by_lam"], key=h["by_lam"].get) if h["by_lam"] else ridge
    for lam in {h["lam"] for h in heads}:  # each head's fit on every fold, at its strength
        at = [i for i, h in enumerate(heads) if h["lam"] == lam]
        args = lambda t: [(t[1][i], t[2][i], *heads[i]["zero"], heads[i]["r"]) for i in at]  # noqa: E731
        for i, AB in zip(at, _logit_factors(every[0], args(every), lam)):
            heads[i]["fit"] = AB
        for i, AB in zip(at, _logit_factors(tot[0], args(tot), lam) if checked is not None else ()):
            heads[i]["fit_checked"] = AB
    for i, ((pq, pk, c0, d, kept), h) in enumerate(zip(lg.heads, heads)):
        cand, err, lam, (A, B), (oq, ok) = h["cand"], h["err"], h["lam"], h["fit"], h["shift"]
        err["joint"] = h["by_lam"].get(lam, 0.0)
        on_calib = {c: _logit_err(every[0], every[1][i], every[2][i], every[3][i], every[4][i], a, b)
                    for c, (a, b) in {**cand, "joint": (A, B)}.items()}
        if len(folds) < 2:
            err = on_calib
        # the separate fit's columns stay unless the joint fit beats both them and the pruned ones
        use = "joint" if err["joint"] < min(err["pruned"], err["separate"]) * (1 - 1e-6) else "separate"
        if use == "joint":
            joint += 1
            _put(fq, Wq, pq, _offset(A, -oq))
            _put(fk, Wk, pk, _offset(B, -ok))
            if checked is not None:
                Ac, Bc = h["fit_checked"]
                _put(fq, Wq_c, pq, _offset(Ac, -oq))
                _put(fk, Wk_c, pk, _offset(Bc, -ok))
        sums["pruned"] += on_calib["pruned"]
        sums["written"] += on_calib[use]
        sums["base"] += float(np.trace(every[3][i] @ every[4][i]))
        held["pruned"] += err["pruned"]
        held["chosen"] += err[use]
        lams.append(lam)
    rel = lambda e: float(np.sqrt(e / max(sums["base"], 1e-30)))  # noqa: E731
    lg.row.err_before, lg.row.err_after = rel(sums["pruned"]), rel(sums["written"])
    if len(folds) > 1:
        lg.row.held_before, lg.row.held_after = rel(held["pruned"]), rel(held["chosen"])
    lg.row.samples = int(every[0][-1, -1])
    lg.row.ridge = sorted(lams)[len(lams) // 2] if lams else None  # the median of the heads' strengths
    lg.row.outputs_kept = f"{joint}/{len(lg.heads)} heads"
    if not joint:
        lg.row.status, lg.row.reason = "kept", "the joint fit did not beat the separate q/k fits on held-out sources"
        return
    lg.row.status = "refit"
    lg.row.reason = f"q and k of {joint} of {len(lg.heads)} heads that lost dims re-fitted for the logits"
    final[fq.row.node], final[fk.row.node] = [Wq], [Wk]
    if checked is not None:
        checked[fq.row.node], checked[fk.row.node] = [Wq_c], [Wk_c]
    for f in {id(fq): fq, id(fk): fk}.values():  # a layer whose own re-fit was refused is written for these columns
        if f.row.status == "kept":
            f.row.status = "refit"
            f.row.reason += "; its q/k columns re-fitted for the attention logits"

"""The zero-contribution oracle, on the user's own model.

For the channels a plan removes: zero every slice of every member tensor in a
copy of the original, prune that copy with the same plan, and compare both in
ONNX Runtime on the same random input. Exact groups (no normalisation or
reduction over the pruned axis) must agree to 1e-4 relative error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune import runtime
from onnxprune.core.groups import Group
from onnxprune.errors import UserError
from onnxprune.plan import Plan, Ratios

TOLERANCE = 1e-4


@dataclass
class OracleRow:
    scope: str  # "all" or a set name
    kind: str
    groups: int
    removed: int
    max_rel_err: float | None
    status: str  # PASS, FAIL, approximate (not tested), nothing removed

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def rel_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    err = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        e = float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-12)) if x.size else 0.0
        if not np.isfinite(e) or not np.isfinite(x).all() or not np.isfinite(y).all():
            return float("nan")  # never a PASS: NaN <= tol is False
        err = max(err, e)
    return err


def _finite(outs) -> bool:
    return all(np.isfinite(np.asarray(x, np.float64)).all() for x in outs)


SQUASHING = {"Sigmoid", "Tanh", "Softmax", "LogSoftmax", "HardSigmoid", "Softsign"}


LAYOUT = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def compared_values(proto: onnx.ModelProto, alias: dict | None = None) -> list[str]:
    """What the oracle compares, each with its own scale: every graph output,
    followed back through layout ops and squashing ops (the sigmoid of a detection
    map: near saturation it turns the runtime's own float noise on large logits
    into visible differences, its input carries the same information) and split
    at a final Concat (a detector's boxes in pixels next to class scores: each
    part is compared against its own magnitude)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    alias = alias or {}
    out: list[str] = []

    def walk(name: str, depth: int = 0) -> None:
        name = alias.get(name, name)
        n = producer.get(name)
        if n is not None and depth < 64:
            if (n.op_type in SQUASHING or n.op_type in LAYOUT) and n.input and n.input[0]:
                return walk(n.input[0], depth + 1)
            if n.op_type == "Concat" and len(n.input) > 1:
                for i in n.input:
                    walk(i, depth + 1)
                return
        if name not in out:
            out.append(name)

    for o in proto.graph.output:
        walk(o.name)
    return out


def _unquantize_activations(proto: onnx.ModelProto) -> dict[str, str]:
    """Bypass every QuantizeLinear -> DequantizeLinear pair on activations (in place;
    returns {dequantized name: float name}): their rounding turns float noise into
    whole quantization steps. Quantized weights stay (they dequantize exactly), so
    their pruning is still what is tested."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    alias = {}
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.input and n.input[0] in producer:
            q = producer[n.input[0]]
            if q.op_type == "QuantizeLinear":
                alias[n.output[0]] = q.input[0]
    for n in proto.graph.node:
        for i, name in enumerate(n.input):
            while name in alias:
                name = alias[name]
            n.input[i] = name
    return alias


def _run(proto: onnx.ModelProto, names: list[str], feeds: dict) -> list:
    from onnxprune.runtime.capture import exposed

    return exposed(proto, names, copy=False).run(names, feeds)  # proto is the oracle's own throwaway copy


def check_subset(job, gids: set[int], keep: dict[int, np.ndarray], batch: int, consumer_only=frozenset()) -> float:
    """Zeroed original vs zeroed-and-pruned, both built from the job's one analysis."""
    sub = {gid: k for gid, k in keep.items() if gid in gids}
    with job.edited(sub, zero=True, consumer_only=consumer_only) as zeroed:
        feeds = runtime.random_inputs(zeroed, batch=batch, seed=1)
        names = compared_values(zeroed, _unquantize_activations(zeroed))
        za = _run(zeroed, names, feeds)
    del zeroed
    if not _finite(za):
        return float("nan")
    with job.edited(sub, zero=True, prune=True, consumer_only=consumer_only) as pruned:
        _unquantize_activations(pruned)
        pb = _run(pruned, names, feeds)
    return rel_err(za, pb)


def _check_set(job, gids: set[int], keep, batch: int, consumer_only: set[int]) -> float:
    """A set's check. When zeroing everything makes a run-time normalisation inside the
    removed channels divide 0 by 0 (ConViT's ``attn / attn.sum()`` over zeroed heads),
    the set is checked again zeroed only where it is read, and remembered as such."""
    err = check_subset(job, gids, keep, batch, consumer_only)
    if np.isnan(err):
        retry = check_subset(job, gids, keep, batch, consumer_only | gids)
        if not np.isnan(retry):
            consumer_only |= gids
            return retry
    return err


def oracle(job, ratios: Ratios | None = None, per_set: bool = True, plan: Plan | None = None, batch: int = 2,
           calib=None) -> list[OracleRow]:
    """Zero-contribution oracle for ``plan`` (or the plan ``ratios`` make, exactly
    as a prune run would: budgets and ``calib`` included) on ``job``, a
    :class:`onnxprune.pipeline.Job` that has not been rewritten (from a path or
    a proto: :func:`onnxprune.api.verify`)."""
    if job.rewritten:
        raise RuntimeError("the oracle needs the analysed original, not a rewritten job")
    if plan is None:
        plan = job.plan(ratios or Ratios(), calib)
    rows: list[OracleRow] = []
    exact = {g.id for g in job.groups if g.id in plan.keep and g.exact}
    by_set: dict[str, list[Group]] = {}
    for g in job.groups:
        if g.id in plan.keep:
            by_set.setdefault(g.set_name or f"group {g.id}", []).append(g)

    def removed(gs):
        return sum(g.width - len(plan.keep[g.id]) for g in gs)

    consumer_only: set[int] = set()
    exact_sets = {name: gs for name, gs in by_set.items() if all(g.exact for g in gs)}
    errs = {}
    if per_set:
        for name, gs in exact_sets.items():
            errs[name] = _check_set(job, {g.id for g in gs}, plan.keep, batch, consumer_only)
    if per_set:
        for name, gs in by_set.items():
            if name not in exact_sets:
                rows.append(OracleRow(name, gs[0].kind, len(gs), removed(gs), None, "approximate (not tested)"))
                continue
            err = errs[name]
            rows.append(OracleRow(name, gs[0].kind, len(gs), removed(gs), err, "PASS" if err <= TOLERANCE else "FAIL"))
    if exact:
        err = check_subset(job, exact, plan.keep, batch, consumer_only)
        if np.isnan(err) and not per_set:  # find the sets that need consumer-side zeroing
            for gs in exact_sets.values():
                _check_set(job, {g.id for g in gs}, plan.keep, batch, consumer_only)
            err = check_subset(job, exact, plan.keep, batch, consumer_only)
        gs = [g for g in job.groups if g.id in exact]
        rows.append(OracleRow("all exact groups", "*", len(gs), removed(gs), err, "PASS" if err <= TOLERANCE else "FAIL"))
    if any(r.max_rel_err is not None and np.isnan(r.max_rel_err) for r in rows):
        require_finite_original(job, batch)
    if exact and err == 0.0:  # no float noise at all: do the outputs see anything?
        require_signal(job, batch)
    return rows


def require_signal(job, batch: int) -> None:
    """A check passes vacuously when the original's outputs do not depend on
    its input (an untrained classifier head initialised to zero: every output
    0 whatever was removed): say so instead of passing."""
    with job.edited({}) as original:
        feeds = runtime.random_inputs(original, batch=batch, seed=1)
        names = compared_values(original, _unquantize_activations(original))
        outs = _run(original, names, feeds)
        other = _run(original, names, runtime.random_inputs(original, batch=batch, seed=2))
    if all(np.array_equal(y, z) for y, z in zip(outs, other)):
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
        raise UserError(f"the original model's outputs are constant on the oracle's random input ({shapes}, "
                        f"standard normal): {', '.join(names)} {'does' if len(names) == 1 else 'do'} not depend on the input (untrained weights, "
                        "a zero-initialised head?), so the oracle cannot see the removed channels")


def require_finite_original(job, batch: int) -> None:
    """A check that came out NaN means nothing when the untouched original already
    outputs NaN or inf on the oracle's input: say so instead of failing every set."""
    with job.edited({}) as original:
        feeds = runtime.random_inputs(original, batch=batch, seed=1)
        names = compared_values(original, _unquantize_activations(original))
        outs = _run(original, names, feeds)
    bad = [n for n, y in zip(names, outs) if not _finite([y])]
    if bad:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
        raise UserError(f"the original model's outputs are not finite on the oracle's random input ({shapes}, "
                        f"standard normal): {', '.join(bad)} has NaN or inf; the oracle needs finite outputs to compare")


def require_checks(rows: list[OracleRow], plan: Plan) -> None:
    """An oracle that checked nothing is a failure, not a pass."""
    if any(r.max_rel_err is not None for r in rows):
        return
    if not plan.keep:
        raise UserError("nothing to check: the plan removes no channel (all ratios 0, or every group frozen or ignored)")
    raise UserError("nothing to check: every pruned group is approximate (under a normalisation over the pruned axis); "
                    "the oracle tests exact groups only")

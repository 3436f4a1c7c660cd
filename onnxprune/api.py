"""Python API: ``analyze`` a model, ``prune`` it, ``validate`` the result."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from . import io, metrics
from .core.analysis import Analysis, run_analysis
from .core.groups import Group, build_groups, isomorphic_sets
from .errors import UserError
from .budget import Estimator, parse_target, solve
from .plan import Plan, Ratios, compute_scores, make_plan
from .rewrite import apply_plan

log = logging.getLogger(__name__)


@dataclass
class Analyzed:
    model: ir.Model
    ctx: Analysis
    groups: list[Group]

    @property
    def sets(self) -> dict[str, list[Group]]:
        return isomorphic_sets(self.groups)

    def group(self, gid: int) -> Group:
        return next(g for g in self.groups if g.id == gid)

    def scores(self, ratios: Ratios, proto=None, calib=None):
        """Channel importance of every prunable group (``ratios.importance``)."""
        return compute_scores(self.ctx, self.groups, ratios, proto, calib)


def analyze(model: str | onnx.ModelProto) -> Analyzed:
    """Load (or take) a model and find its groups and isomorphic sets."""
    m = io.load(model) if isinstance(model, str) else io.to_ir(_copy(model))
    ctx = run_analysis(m)
    return Analyzed(m, ctx, build_groups(ctx))


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    return p


@dataclass
class PruneResult:
    proto: onnx.ModelProto
    analyzed: Analyzed
    plan: Plan
    before: dict
    after: dict
    checks: dict = field(default_factory=dict)
    seconds: float = 0.0


def validate(proto: onnx.ModelProto, batches=(1, 2)) -> dict:
    """onnx.checker with full_check (which runs strict, type-checking shape
    inference) and an ORT run per batch size."""
    out: dict = {}
    onnx.checker.check_model(proto, full_check=True)
    out["checker"] = "ok"
    out["shape_inference"] = "ok"
    sess = io.session(proto)
    dynamic = any(
        not d.HasField("dim_value") for i in proto.graph.input for d in i.type.tensor_type.shape.dim
    )
    for b in batches if dynamic else batches[:1]:
        sess.run(None, io.random_inputs(proto, batch=b))
    out["ort_batches"] = list(batches if dynamic else batches[:1])
    return out


def prune(
    model: str | onnx.ModelProto,
    ratios: Ratios | dict | str | None = None,
    check: bool = True,
    calib=None,
) -> PruneResult:
    """Prune a model; the input is never modified. Returns the new proto and facts.
    ``calib`` (:class:`onnxprune.importance.calib.Calibration`, or a spec string
    such as a directory, ``.npy`` or ``"synthetic"``) feeds data-driven criteria."""
    t0 = time.perf_counter()
    ratios = ratios if isinstance(ratios, Ratios) else Ratios.load(ratios)
    src = io.read_proto(model) if isinstance(model, str) else _copy(model)
    a = analyze(src)
    normalised = io.to_proto(a.model)  # run-time shape chains folded
    if isinstance(calib, str):
        from .importance.calib import load as load_calib

        calib = load_calib(calib, normalised)
    scores = compute_scores(a.ctx, a.groups, ratios, normalised, calib)
    if ratios.target is not None:
        est = Estimator(a.ctx, normalised)
        before = est.before
        metric, requested = ratios.target
        target = parse_target(requested, before[metric], metric)
        _, plan, predicted, info = solve(a.ctx, a.groups, ratios, target, est, scores)
        plan.target = info
    else:
        before = metrics.count(normalised)
        plan = make_plan(a.ctx, a.groups, ratios, scores=scores)
        predicted = None
    apply_plan(a.ctx, plan.keep)
    proto = io.infer(io.to_proto(a.model))
    after = metrics.count(proto)
    if predicted is not None and predicted != after:
        log.warning("budget estimate %s differs from the pruned model's count %s", predicted, after)
    res = PruneResult(proto, a, plan, before, after)
    if check:
        try:
            res.checks = validate(proto)
        except Exception as e:  # never hand out an invalid model
            raise RuntimeError(f"pruned model failed validation: {e}") from e
    res.seconds = time.perf_counter() - t0
    return res


def save_pruned(res: PruneResult, out_path: str, in_path: str | None = None) -> None:
    if in_path and os.path.abspath(out_path) == os.path.abspath(in_path):
        raise UserError("output path equals the input path; onnxprune never overwrites its input")
    io.save(res.proto, out_path)


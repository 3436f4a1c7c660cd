"""Python API: ``analyze`` a model, ``prune`` it, ``validate`` the result.

Both are thin fronts over :class:`onnxprune.pipeline.Job` (load and analyse
once; plan, rewrite, count and check from that one analysis).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import onnx

from onnxprune import io
from onnxprune.pipeline import Job
from onnxprune.validate.checks import validate
from onnxprune.plan import Plan, Ratios, read_json

log = logging.getLogger(__name__)



def analyze(model, rules=None) -> Job:
    """Load (or take) a model and find its groups and isomorphic sets (with the
    given :class:`~onnxprune.core.registry.Registry` of rules, or the default one)."""
    return Job.open(model, rules=rules)


@dataclass
class PruneResult:
    job: Job
    plan: Plan
    before: dict
    after: dict
    checks: dict = field(default_factory=dict)
    seconds: float = 0.0
    recovery: list = field(default_factory=list)  # per-layer rows of the recovery stage (recover=...)
    recovery_stats: dict = field(default_factory=dict)  # its time split and whole-model check on kept-out sources
    _proto: onnx.ModelProto | None = None

    @property
    def analyzed(self) -> Job:
        return self.job

    @property
    def proto(self) -> onnx.ModelProto:
        """The pruned model as a self-contained proto (made on first use)."""
        if self._proto is None:
            self._proto = io.full_proto(self.job.model)
        return self._proto


def load_plan(src, job: Job) -> Plan:
    """A plan file (path, JSON text or dict) replayed on ``job``."""
    where = src if isinstance(src, str) and not src.lstrip().startswith("{") else "plan"
    return Plan.from_json(read_json(src, "plan"), job.groups, where)


def resolve_plan(job: Job, ratios: Ratios | None = None, plan=None, calib=None, runtime=None,
                 latency_table: str | None = None, progress=None) -> Plan:
    """The one place a run gets its plan: ``plan`` (a plan file path, JSON text,
    dict or :class:`Plan`) replayed on ``job``, or the plan ``ratios`` make
    (budgets, latency targets and data-driven criteria included)."""
    if plan is not None:
        return plan if isinstance(plan, Plan) else load_plan(plan, job)
    return job.plan(ratios if ratios is not None else Ratios(), calib, runtime=runtime, latency_table=latency_table,
                    progress=progress)


def prune(
    model,
    ratios: Ratios | dict | str | None = None,
    check: bool = True,
    calib=None,
    plan=None,
    input_shapes=None,
    runtime=None,
    latency_table: str | None = None,
    recover: str | None = None,
) -> PruneResult:
    """Prune a model; the input is never modified. Returns the pruned model and facts.
    ``calib`` (:class:`onnxprune.importance.calib.Calibration`, or a spec string
    such as a directory, ``.npy`` or ``"synthetic"``) feeds data-driven criteria;
    ``plan`` (a plan file path, JSON text, dict or :class:`Plan`) replays a plan
    instead of making one from ``ratios``; ``input_shapes`` (or ``ratios.input_shapes``)
    fixes dynamic input dims, e.g. ``{"images": [1, 3, 640, 640]}``. A ``target_latency``
    in the ratios is measured on ``runtime`` (:class:`onnxprune.plan.latency.Runtime`,
    default CPU), its measured points kept in ``latency_table`` when given. ``recover``
    (``"ridge"``, ``"stats"`` or ``"bias"``, with ``calib``) runs the recovery stage after
    the rewrite (as ``--recover``: under a budget the ratios' unwritten fields default
    to ``Ratios.for_recovery``); its rows are in ``PruneResult.recovery``."""
    t0 = time.perf_counter()
    if plan is None:
        ratios = ratios if isinstance(ratios, Ratios) else Ratios.load(ratios)
    if recover is not None:
        from onnxprune.errors import UserError
        from onnxprune.recover import METHODS

        if recover not in METHODS:
            raise UserError(f"recover must be one of {', '.join(METHODS)}, not {recover!r}")
        if calib is None:
            raise UserError("recovery needs calibration inputs (calib=...)")
        if plan is None:
            ratios, _ = ratios.for_recovery()
    shapes = {**(ratios.input_shapes if plan is None else {}), **io.parse_input_shapes(input_shapes)}
    job = model if isinstance(model, Job) else Job.open(model, shapes)
    if isinstance(calib, str):
        from onnxprune.plan.importance.calib import load as load_calib

        calib = load_calib(calib, job.skeleton())
    plan = resolve_plan(job, ratios, plan, calib, runtime, latency_table)
    before, after = job.counts(), job.counts(plan)
    original = job.data_proto() if recover is not None else None
    job.rewrite(plan)
    res = PruneResult(job, plan, before, after)
    if recover is not None:
        res.recovery, res.recovery_stats = job.recover(original, calib, method=recover)
    if check:
        res.checks = job.validate(res.proto)  # never hand out an invalid model
    res.seconds = time.perf_counter() - t0
    return res


def save_pruned(res: PruneResult, out_path: str, in_path: str | None = None, check: bool = True) -> dict:
    """Stream the pruned model to ``out_path`` and validate the written file."""
    checks = res.job.save(out_path, check=check, inputs=(in_path,))
    if checks:
        res.checks = checks
    return res.checks


__all__ = ["analyze", "prune", "validate", "save_pruned", "load_plan", "resolve_plan", "PruneResult", "Job"]

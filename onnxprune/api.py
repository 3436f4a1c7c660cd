"""The front door: every command and tool goes through these functions.

``analyze`` loads and analyses a model; ``prune`` runs the whole pipeline on
one :class:`~onnxprune.pipeline.Job` (plan -> oracle -> rewrite -> recover ->
write and validate -> bench) and returns one :class:`PruneResult`; ``verify``
runs the zero-contribution oracle; ``scores``, ``calibration``, ``bench`` and
the training entry points (``export_timm``, ``finetune``, ``make_dataset``)
serve the other commands. The CLI only parses arguments, calls these and
prints what they return.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field

import onnx

from onnxprune import io
from onnxprune.errors import UserError
from onnxprune.pipeline import Job
from onnxprune.plan import Plan, Ratios, read_json
from onnxprune.plan.latency import Runtime
from onnxprune.validate.checks import run_error, validate

log = logging.getLogger(__name__)


def analyze(model, input_shapes=None, rules=None) -> Job:
    """Load (or take) a model and find its groups and isomorphic sets (with the
    given :class:`~onnxprune.core.registry.Registry` of rules, or the default one).
    ``input_shapes`` (``{name: [dims]}`` or ``["name:1,3,640,640"]``) fixes dynamic dims."""
    return model if isinstance(model, Job) else Job.open(model, input_shapes, rules=rules)


def load_ratios(src) -> Ratios:
    """Ratios from a path, JSON text, dict or :class:`Ratios` (None: the empty spec)."""
    return src if isinstance(src, Ratios) else Ratios.load(src)


def calibration(spec, job: Job, batches: int = 4, batch_size: int = 32, norm: str | None = None):
    """Calibration inputs for ``job`` from ``spec`` (a folder of images, ``.npy``/``.npz``,
    or ``"synthetic"``; images scaled by ``norm``, see
    :func:`onnxprune.plan.importance.calib.parse_norm`); an already loaded
    :class:`~onnxprune.plan.importance.calib.Calibration` is returned as is."""
    from onnxprune.plan.importance.calib import load

    return load(spec, job.skeleton(), batches, batch_size, norm=norm) if isinstance(spec, str) else spec


@dataclass
class PruneResult:
    """Everything one prune run produced: the job (its model is the pruned one),
    the plan, params/MACs before and after, the validation facts, and the rows of
    the stages that ran (oracle, recovery, latency)."""

    job: Job
    plan: Plan
    before: dict
    after: dict
    checks: dict = field(default_factory=dict)
    seconds: float = 0.0
    ratios: dict | None = None  # the ratios as given (None when a plan was replayed)
    input: str | None = None
    output: str | None = None  # the written file (prune(output=...))
    plan_file: str | None = None
    oracle: list = field(default_factory=list)  # zero-contribution oracle rows (verify=True)
    recovery: list = field(default_factory=list)  # per-layer rows of the recovery stage (recover=...)
    recovery_stats: dict = field(default_factory=dict)  # its time split and whole-model check on kept-out sources
    latency: list = field(default_factory=list)  # bench rows, original then pruned (bench=True or a latency target)
    notes: list = field(default_factory=list)  # what the run chose for the user (defaults it applied)
    timings: dict = field(default_factory=dict)  # seconds per stage: analyse, plan, oracle, rewrite, recover, write, bench
    plan_json: dict | None = None  # the plan file's content, made from the analysis before the rewrite
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

    @property
    def removed(self) -> int:
        """Channels (and heads, head dims) removed, over every group of the plan."""
        return sum(g.width - len(self.plan.keep[g.id]) for g in self.job.groups if g.id in self.plan.keep)

    @property
    def failed(self) -> bool:
        """True when the oracle found an exact group that did not agree."""
        return any(r.status == "FAIL" for r in self.oracle)

    @property
    def speedup(self) -> float | None:
        return self.latency[1].speedup if len(self.latency) > 1 else None

    @property
    def efficiency(self) -> float | None:
        """The measured speed-up divided by the MACs reduction (1.0: as fast as the MACs promise)."""
        if self.speedup is None or not self.before["macs"]:
            return None
        return self.speedup * self.after["macs"] / self.before["macs"]

    def target_text(self) -> str:
        """One line on the budget or latency target the plan was solved for ("" without one)."""
        from onnxprune.report import target_text

        return target_text(self.plan.target) if self.plan.target else ""

    def recovery_text(self) -> str:
        """The per-layer recovery table, its time split and the held-out check."""
        from onnxprune.recover import format_rows, held_out_text

        s = self.recovery_stats
        lines = [format_rows(self.recovery)]
        if "run_s" in s:
            lines.append(f"recovery time: {s['run_s']:.1f}s in ONNX Runtime ({s['levels']} levels, "
                         f"{s['passes']} partial passes), {s['fit_s']:.1f}s statistics and solves"
                         + (f" (both passes; the second, on every source: {s['refit_all_s']:.1f}s)" if "refit_all_s" in s else ""))
        if any(r.status in ("refit", "kept") for r in self.recovery):
            lines.append(held_out_text(s.get("held_out")))
        else:
            lines.append("no layer was re-fitted (the reasons above): the pruned weights stay")
        return "\n".join(lines)

    def report(self) -> dict:
        """The JSON report of this run (what ``--report`` writes)."""
        from onnxprune.report import prune_report

        return prune_report(self)

    def write_report(self, path: str) -> dict:
        rep = self.report()
        with open(path, "w") as f:
            json.dump(rep, f, indent=1)
        return rep

    def save_plan(self, path: str) -> None:
        """The plan as a file that ``prune(plan=...)`` / ``--plan`` replays."""
        with open(path, "w") as f:
            json.dump(self.plan_json, f, indent=1)


def load_plan(src, job: Job) -> Plan:
    """A plan file (path, JSON text or dict) replayed on ``job``."""
    where = src if isinstance(src, str) and not src.lstrip().startswith("{") else "plan"
    return Plan.from_json(read_json(src, "plan"), job.groups, where)


def resolve_plan(job: Job, ratios: Ratios | None = None, plan=None, calib=None, runtime=None,
                 latency_table: str | None = None, progress=None, recovered: bool = True) -> Plan:
    """The one place a run gets its plan: ``plan`` (a plan file path, JSON text,
    dict or :class:`Plan`) replayed on ``job``, or the plan ``ratios`` make
    (budgets, latency targets and data-driven criteria included; ``recovered``:
    whether recovery follows, see :meth:`Job.plan`)."""
    if plan is not None:
        return plan if isinstance(plan, Plan) else load_plan(plan, job)
    return job.plan(ratios if ratios is not None else Ratios(), calib, runtime=runtime, latency_table=latency_table,
                    progress=progress, recovered=recovered)


def _calib_hints(calib) -> dict:
    """Input dims a calibration array file implies (:class:`onnxprune.io.Hint`):
    a .npy, or an .npz's ``x``, for a model with one data input; an .npz's
    other arrays for the inputs of their names (labels and sources aside)."""
    if not isinstance(calib, str) or not calib.endswith((".npy", ".npz")):
        return {}
    out = {}
    for k, shape in io.array_shapes(calib).items():
        if k in ("y", "source") or len(shape) < 2 or min(shape) <= 0:
            continue
        out["" if k in ("", "x") else k] = io.Hint(list(shape))
    return out


def _hinted_dims(job: Job, hints: dict, shapes: dict) -> dict:
    """The dims the analysis took from ``hints`` (the calibration arrays), as
    input shapes for timing the original and the pruned file the same way."""
    inputs = [v for v in job.model.graph.inputs if v.const_value is None]
    hinted = io.hints_by_input([v.name for v in inputs], hints)
    out = {}
    for v in inputs:
        if v.name in shapes or v.shape is None or v.name not in hinted:
            continue
        dims = [d if isinstance(d, int) else str(getattr(d, "value", None) or "N") for d in v.shape.dims]
        if all(isinstance(d, int) for d in dims[1:]):
            out[v.name] = dims
    return out


def _shapes(ratios: Ratios | None, input_shapes) -> dict:
    """The input shapes a run fixes: the ratios' ``input_shapes``, overridden by the caller's."""
    return {**(ratios.input_shapes if ratios is not None else {}), **io.parse_input_shapes(input_shapes)}


def why_nothing(job: Job, plan: Plan | None = None) -> str:
    """One line: why a plan removes nothing (without a plan: why the model has nothing to prune)."""
    live = [g for g in job.groups if not g.frozen]
    parts = []
    if not job.groups:
        parts.append("no prunable channel group was found")
    elif not live:
        reasons = sorted({g.frozen[0].split(" at ")[0] for g in job.groups if g.frozen})
        parts.append(f"all {len(job.groups)} groups are frozen ({'; '.join(reasons[:3])})")
    elif plan is None:
        parts.append(f"{len(live)} prunable groups")
    elif all(plan.ratios.get(g.id, (0,))[0] <= 0 or g.id in plan.skipped for g in live):
        parts.append(f"the ratios remove nothing from the {len(live)} prunable groups")
    else:
        parts.append(f"the ratios round to zero channels in the {len(live)} prunable groups")
    if job.ctx.unhandled:
        ops = sorted(job.ctx.unhandled.items(), key=lambda kv: -kv[1])
        parts.append("ops without a rule: " + ", ".join(f"{op} x{n}" for op, n in ops[:6]))
    return "; ".join(parts)


def prune(
    model,
    ratios: Ratios | dict | str | None = None,
    check: bool = True,
    calib=None,
    plan=None,
    input_shapes=None,
    runtime: Runtime | None = None,
    latency_table: str | None = None,
    recover: str | None = None,
    verify: bool = False,
    bench: bool = False,
    output: str | None = None,
    progress=None,
    recover_options: dict | None = None,
    calib_batches: int = 4,
    calib_batch_size: int = 32,
    calib_norm: str | None = None,
) -> PruneResult:
    """Prune a model (a path, a proto or a :class:`Job` from :func:`analyze`); the
    input is never modified. The stages, in order, on one job:

    1. **plan**: ``plan`` (a plan file path, JSON text, dict or :class:`Plan`) is
       replayed, else ``ratios`` make one. ``calib`` (a
       :class:`~onnxprune.plan.importance.calib.Calibration` or a spec string: a
       folder, ``.npy``/``.npz``, ``"synthetic"``, read as ``calib_batches`` batches of
       ``calib_batch_size``; a folder's images scaled as ``calib_norm`` says, default
       ImageNet's mean/std) feeds data-driven criteria; a
       ``target_latency`` is measured on ``runtime`` (default CPU), its points kept
       in ``latency_table``. A plan that removes nothing returns the model as it is
       (said in ``.notes``), or is a :class:`UserError` when a later stage or ``output`` was asked for.
    2. **oracle** (``verify``): the zero-contribution oracle on every exact group
       (rows in ``.oracle``; an oracle that checked nothing is a UserError).
    3. **rewrite**.
    4. **recover** (``"ridge"``, ``"stats"`` or ``"bias"``, with ``calib``):
       closed-form re-fit; under a budget the ratios' unwritten fields default to
       :func:`onnxprune.recover.plan_defaults` (said in ``.notes``); ``recover_options``
       go to :func:`onnxprune.recover.recover_model` (``ridge``, ``layers``, ...).
    5. **write and validate**: to ``output`` when given (streamed, then the written
       file is checked), else the in-memory proto is validated (``check``).
    6. **bench** (``bench``, or any ``target_latency``): the original against the
       pruned model on ``runtime`` (rows in ``.latency``).

    ``input_shapes`` (or ``ratios.input_shapes``) fixes dynamic input dims, e.g.
    ``{"images": [1, 3, 640, 640]}``. ``progress``: a callable taking one line of
    text per step (long stages also draw a progress bar when given). The
    seconds each stage took are in ``.timings``."""
    t0 = time.perf_counter()
    clock, res_timings = [t0], {}

    def lap(stage: str) -> None:
        now = time.perf_counter()
        res_timings[stage] = res_timings.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    say = progress or (lambda text: None)
    source = model if isinstance(model, str) else model.source if isinstance(model, Job) else None
    if plan is None:
        ratios = load_ratios(ratios)
    notes = []
    if recover is not None:
        from onnxprune.recover import METHODS, plan_defaults

        if recover not in METHODS:
            raise UserError(f"recover must be one of {', '.join(METHODS)}, not {recover!r}")
        if calib is None:
            raise UserError("recovery needs calibration inputs (calib=...; unlabelled inputs are enough: "
                            "a folder of images, FILE.npy/.npz or 'synthetic')")
        if plan is None:
            ratios, note = plan_defaults(ratios)
            if note:
                notes.append(note)
                say(note)
    if output is not None:
        io.refuse_overwrite(output, source, *([plan] if isinstance(plan, str) else []))
    shapes = _shapes(ratios if plan is None else None, input_shapes)
    hints = _calib_hints(calib)
    job = analyze(model, {**hints, **shapes})
    if isinstance(calib, str):
        calib = calibration(calib, job, calib_batches, calib_batch_size, calib_norm)
        say(f"calibration: {calib.source}, {len(calib.batches)} batches of {len(calib.batches[0])}")
    lap("analyse")
    latency_target = plan is None and ratios.target_latency is not None
    if (bench or latency_target) and runtime is None:
        runtime = Runtime(input_shapes=shapes or None)
    hinted = _hinted_dims(job, hints, shapes) if runtime is not None else {}
    if hinted:  # timed at the dims the analysis took from the calibration arrays
        runtime = dataclasses.replace(runtime, input_shapes={**hinted, **(runtime.input_shapes or {})})
    if latency_target:
        say(f"latency search on {runtime.provider} (batch {runtime.key()['batch']}, {runtime.key()['threads']} threads) ...")
    # 1. plan
    the_plan = resolve_plan(job, ratios if plan is None else None, plan, calib, runtime, latency_table, progress,
                            recovered=recover is not None)
    if not the_plan.keep and (output is not None or verify or recover is not None or bench):
        raise UserError(f"nothing to prune: {why_nothing(job, the_plan)}")
    t = the_plan.target or {}
    if t.get("metric") == "latency" and not t["met"]:
        from onnxprune.report import target_text

        log.warning("target_latency not met: %s", target_text(t))
    from onnxprune.plan.latency import slow_head_dims

    odd = slow_head_dims(job.groups, the_plan.keep)
    if odd:
        notes.append(f"head dims {', '.join(map(str, odd))} are not multiples of 8: fused attention kernels "
                     "(onnxruntime's CUDA flash / memory-efficient attention) will not take them; \"round_to\": 8 keeps them")
        log.warning(notes[-1])
    lap("plan")
    res = PruneResult(job, the_plan, job.counts(), job.counts(the_plan), notes=notes, input=source, timings=res_timings,
                      ratios=ratios.to_dict() if plan is None else None,
                      plan_file=plan if isinstance(plan, str) and not plan.lstrip().startswith("{") else None)
    res.plan_json = the_plan.to_json(job.groups, os.path.basename(source or "model"))  # names as analysed
    if not the_plan.keep:  # nothing asked for more than the model as it is
        res.notes.append(f"nothing to prune: {why_nothing(job, the_plan)}")
        res.checks = job.validate(res.proto) if check else {}
        res.seconds = time.perf_counter() - t0
        return res
    # 2. oracle, on the analysed original (it zeroes and rewrites under an undo journal)
    if verify:
        from onnxprune.validate.oracle import oracle, require_checks

        say("zero-contribution oracle ...")
        res.oracle = oracle(job, plan=the_plan)
        require_checks(res.oracle, the_plan)
        lap("oracle")
    reference = None
    if bench or latency_target:
        reference = source or job.data_proto()
    original = job.data_proto() if recover is not None else None
    # 3. rewrite
    job.rewrite(the_plan)
    _count_written(res, job)
    lap("rewrite")
    # 4. recover
    if recover is not None:
        say(f"recovery ({recover}) from {calib.source} ...")
        res.recovery, res.recovery_stats = job.recover(original, calib, method=recover, progress=progress is not None,
                                                       **(recover_options or {}))
        del original
        lap("recover")
    # 5. write and validate
    if output is not None:
        res.checks = job.save(output, check=check, inputs=(source,))
        res.output = output
    elif check:
        res.checks = job.validate(res.proto)  # never hand out an invalid model
    lap("write")
    # 6. bench
    if reference is not None:
        res.latency = _bench_pruned(res, reference, runtime, progress is not None, say)
        lap("bench")
    res.seconds = time.perf_counter() - t0
    return res


COUNT_TOLERANCE = 0.005  # relative: the budget's estimate and the rewritten model's own count agree to this


def _count_written(res: PruneResult, job: Job) -> None:
    """``res.after`` becomes the rewritten model's own count (the terms read
    from its graph, not the budget's estimate of the plan); where the two
    differ, a warning says so: the estimate missed some layer's change (the
    budget was then spent against the wrong count)."""
    from onnxprune.core.metrics import count

    try:
        counted = count(io.skeleton(job.model))
    except Exception as e:  # a graph the cost terms cannot read as rewritten: the estimate stands
        log.debug("counting the rewritten model failed: %s", e)
        return
    off = {k: (res.after[k], counted[k]) for k in counted
           if abs(counted[k] - res.after[k]) > COUNT_TOLERANCE * max(res.after[k], 1)}
    if off:
        msg = ("the pruned model's own count differs from the budget's estimate: " +
               ", ".join(f"{k} {e:,} estimated, {c:,} counted" for k, (e, c) in off.items()))
        res.notes.append(msg)
        log.warning(msg)
    res.after = counted


def _bench_pruned(res: PruneResult, reference, rt: Runtime, progress: bool, say) -> list:
    from onnxprune.runtime.bench import bench as run_bench

    say(f"benchmarking original vs pruned ({rt.provider}, {rt.runs} interleaved runs each) ...")
    pruned = ("pruned", res.output) if res.output else ("pruned", res.proto)
    rows = run_bench([reference if isinstance(reference, str) else ("original", reference), pruned],
                     batch=rt.batch, provider=rt.provider, threads=rt.threads, warmup=rt.warmup, runs=rt.runs,
                     progress=progress, input_shapes=rt.input_shapes)
    res.latency = rows
    t = res.plan.target or {}
    if t.get("metric") == "latency" and 1 / rows[1].speedup > 1.1 * t["target_ratio"]:
        log.warning("the written model measured %.1f%% of the original's time, more than 10%% over the target %.1f%% "
                    "(the search measured %.1f%%): timings on this machine vary; --runs N times longer",
                    100 / rows[1].speedup, 100 * t["target_ratio"], 100 * t["achieved_ratio"])
    odd = sorted({len(k) for k in res.plan.keep.values() if len(k) % 8})
    if odd and res.efficiency is not None and res.efficiency < 0.7:  # the shape of the peers' "pruned but not faster" reports
        log.warning("the speed-up is %.0f%% of the MACs reduction; %d kept widths are not multiples of 8 (e.g. %s), "
                    "which the %s kernels run slowly: try \"round_to\": 8 in the ratios", 100 * res.efficiency, len(odd),
                    ", ".join(map(str, odd[:4])), rt.provider.upper())
    return rows


def save_pruned(res: PruneResult, out_path: str, in_path: str | None = None, check: bool = True) -> dict:
    """Stream the pruned model to ``out_path`` and validate the written file."""
    checks = res.job.save(out_path, check=check, inputs=(in_path,))
    if checks:
        res.checks = checks
    res.output = out_path
    return res.checks


def verify(model, ratios: Ratios | dict | str | None = None, plan=None, calib=None, per_set: bool = True,
           batch: int = 2, input_shapes=None, strict: bool = False) -> list:
    """The zero-contribution oracle on ``model`` (a path, proto or unrewritten
    :class:`Job`) for ``plan`` or the plan ``ratios`` make (exactly as a prune
    run would). Returns its rows; ``strict``: an oracle that checked nothing is
    a :class:`UserError`."""
    from onnxprune.validate.oracle import oracle, require_checks

    if plan is None:
        ratios = load_ratios(ratios)
    job = analyze(model, _shapes(ratios if plan is None else None, input_shapes))
    calib = calibration(calib, job)
    the_plan = resolve_plan(job, ratios if plan is None else None, plan, calib)
    rows = oracle(job, plan=the_plan, per_set=per_set, batch=batch)
    if strict:
        require_checks(rows, the_plan)
    return rows


def scores(job: Job, importance="l2", calib=None):
    """Importance of every channel of every group (``importance``: a criterion
    name or ``{kind: criterion}``), as a prune run with that criterion would score them."""
    return job.scores(Ratios.from_dict({"importance": importance}), calib)


def bench(models: list, **kw):
    """ORT latency of ``models`` (paths, protos or ``(name, proto)``), interleaved
    runs; see :func:`onnxprune.runtime.bench.bench`."""
    from onnxprune.runtime.bench import bench as run_bench

    return run_bench(models, **kw)


def bench_table(rows) -> str:
    from onnxprune.runtime.bench import table

    return table(rows)


def bench_plot(rows, path: str) -> None:
    from onnxprune.runtime.bench import plot

    plot(rows, path)


def latency_table(path: str) -> list[dict]:
    """The measured (MACs, latency) points a ``target_latency`` run kept (``latency_table=``)."""
    from onnxprune.plan.latency import load_table

    return load_table(path)


def latency_table_text(entries: list[dict]) -> str:
    from onnxprune.plan.latency import table_text

    return table_text(entries)


def latency_table_plot(entries: list[dict], path: str) -> None:
    from onnxprune.plan.latency import plot_table

    plot_table(entries, path)


def latency_widths(model, runtime: Runtime | None = None, latency_table: str | None = None, input_shapes=None,
                   progress=None) -> list[dict]:
    """Per isomorphic set of ``model``, the whole model's latency predicted by
    the per-node latency model (:meth:`Job.latency_model`: every node timed
    alone on ``runtime``, kept in ``latency_table``) when that set alone is
    narrowed to 75/50/25% (:func:`onnxprune.plan.latency.set_curves`)."""
    from onnxprune.plan.latency import ROUND_TO, set_curves

    job = analyze(model, input_shapes)
    rt = runtime or Runtime(input_shapes=_shapes(None, input_shapes) or None)
    return set_curves(job.latency_model(rt, latency_table, progress), job.sets, ROUND_TO.get(rt.provider, 8))


def latency_widths_text(rows: list[dict]) -> str:
    from onnxprune.plan.latency import curves_text

    return curves_text(rows)


def latency_widths_plot(rows: list[dict], path: str) -> None:
    from onnxprune.plan.latency import plot_curves

    plot_curves(rows, path)


def parse_input_shapes(spec) -> dict:
    """``{name: [dims]}`` from ``["name:1,3,640,640", ...]`` or a dict (see :func:`onnxprune.io.parse_input_shapes`)."""
    return io.parse_input_shapes(spec)


def refuse_overwrite(output: str, *inputs) -> None:
    """onnxprune never overwrites its input: a :class:`UserError` when ``output`` is one of ``inputs``."""
    io.refuse_overwrite(output, *inputs)


def model_run_error(model: str, input_shapes=None) -> str | None:
    """Why onnxruntime cannot run ``model`` on a random input (None when it can)."""
    return run_error(model, input_shapes)


def export_timm(name: str, output: str, *args, **kw):
    """Export a timm model to ONNX (:func:`onnxprune.torchbridge.export.export_timm`)."""
    from onnxprune.torchbridge.export import export_timm as run

    return run(name, output, *args, **kw)


def finetune(model: str, norm: str | None = None, **options) -> dict:
    """Fine-tune an ONNX model in PyTorch and write the trained tensors back
    (options: :class:`onnxprune.torchbridge.train.Options`; ``norm``: how the
    model expects the pixels of folder images, as ``calib_norm`` of :func:`prune`)."""
    if norm is not None:
        from onnxprune.plan.importance.calib import folder_norm

        options["mean"], options["std"] = folder_norm(str(options.get("data", "")), norm, "--data-norm")
    try:
        from onnxprune.torchbridge.train import Options, finetune as run
    except ImportError as e:
        raise UserError(f"finetune needs torch, timm and onnx2torch: pip install 'onnxprune[finetune]' ({e})") from None
    return run(model, Options(**options))


def make_dataset(output: str, *args, **kw) -> dict:
    """A synthetic labelled image dataset (:func:`onnxprune.torchbridge.data.make_synthetic`)."""
    from onnxprune.torchbridge.data import make_synthetic

    return make_synthetic(output, *args, **kw)


__all__ = ["analyze", "prune", "verify", "validate", "save_pruned", "load_plan", "resolve_plan", "load_ratios",
           "calibration", "scores", "bench", "why_nothing", "PruneResult", "Job", "Runtime",
           "latency_widths", "latency_widths_text", "latency_widths_plot"]

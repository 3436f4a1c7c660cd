"""One pipeline: load -> analyse -> plan -> rewrite -> validate.

A :class:`Job` is one model, loaded and analysed **once** (weights
memory-mapped, shapes inferred on a weight-less skeleton). Every stage reads
from it: importance scores, the plan (the only place ratios become a plan,
budgets included), params/MACs, the oracle (which zeroes and rewrites the same
analysed model under an undo journal, once per isomorphic set), the rewrite,
and writing the result. Nothing re-reads the input file.
"""
from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune import io
from onnxprune.core.analysis import Analysis, run_analysis
from onnxprune.core.registry import Registry
from onnxprune.rules import default_registry
from onnxprune.core.groups import Group, build_groups, isomorphic_sets
from onnxprune.validate.checks import feed_text, run_failure, validate
from onnxprune.errors import UserError
from onnxprune.plan import Plan, Ratios, compute_scores, make_plan, plannable

log = logging.getLogger(__name__)


def _plan_key(keep: dict) -> tuple:
    """A plan (group id -> kept indices) as a dict key."""
    return tuple(sorted((gid, np.asarray(k, np.int64).tobytes()) for gid, k in keep.items()))


def _fastest(fn, *args, times: int | None = None):
    """``fn(*args)`` run ``times`` times (default :data:`damage.TIMINGS
    <onnxprune.plan.damage.TIMINGS>`): the last result and the fastest run's seconds."""
    import time

    from onnxprune.plan import damage

    best, out = float("inf"), None
    for _ in range(max(damage.TIMINGS if times is None else times, 1)):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return out, best


class Job:
    """A loaded, normalised and analysed model, and everything derived from it."""

    def __init__(self, model: ir.Model, source: str | None = None, rules: Registry | None = None) -> None:
        self.model = model
        self.source = source
        self.ctx: Analysis = run_analysis(model, rules if rules is not None else default_registry())
        self.groups: list[Group] = build_groups(self.ctx)
        self._estimator = None
        self._original: onnx.ModelProto | None = None
        self.rewritten = False
        self.plan_keep: dict | None = None  # the plan rewrite() applied (recovery reads it)

    @classmethod
    def open(cls, model: str | onnx.ModelProto | ir.Model, input_shapes=None, rules: Registry | None = None) -> "Job":
        """Load and analyse. ``input_shapes`` (``{name: [dims]}`` or ``["name:1,3,640,640"]``)
        fixes dynamic input dims; any dim but the batch must be known. ``rules``: the
        coupling rules (default: :func:`onnxprune.rules.default_registry`)."""
        shapes = io.parse_input_shapes(input_shapes)
        if isinstance(model, str):
            job = cls(io.load(model, shapes), model, rules)
        elif isinstance(model, onnx.ModelProto):
            job = cls(io.to_ir(model, shapes), rules=rules)
            job._original = model
        else:
            io.set_input_shapes(model, shapes)
            job = cls(io.normalised(model), rules=rules)
        return job

    # -- facts --------------------------------------------------------------------------
    @property
    def sets(self) -> dict[str, list[Group]]:
        return isomorphic_sets(self.groups)

    @property
    def estimator(self):
        """Params/MACs of this model under any plan (one batch-1 shape inference, on a skeleton)."""
        if self._estimator is None:
            from onnxprune.plan.budget import Estimator

            self._estimator = Estimator(self.ctx, io.skeleton(self.model))
        return self._estimator

    def counts(self, plan: Plan | None = None) -> dict[str, int]:
        return self.estimator.estimate(plan.keep if plan is not None else {})

    def skeleton(self) -> onnx.ModelProto:
        return io.skeleton(self.model)

    def data_proto(self) -> onnx.ModelProto:
        """A full copy with weights (for ORT sessions in memory): only data-driven
        criteria and the oracle ask for it."""
        return io.full_proto(self.model)

    # -- plan ---------------------------------------------------------------------------
    def scores(self, ratios: Ratios, calib=None):
        from onnxprune.plan.importance.criteria import DATA_CRITERIA, criterion_for

        spec = ratios.importance_spec
        needs_data = any(criterion_for(spec, g.kind) in DATA_CRITERIA for g in self.groups if not g.frozen)
        proto = self.data_proto() if needs_data and calib is not None else None
        read = [0]

        def upkeep(g: Group) -> None:  # scoring reads every weight: drop the pages read every 64 MB
            read[0] += sum(m.value.const_value.nbytes for m in g.tensors if m.value.const_value is not None)
            if read[0] > 64 << 20:
                read[0] = 0
                io.release(self.model)

        s = compute_scores(self.ctx, self.groups, ratios, proto, calib, upkeep)
        io.release(self.model)
        return s

    def unit_costs(self, metric: str = "macs") -> dict[int, float]:
        """Per prunable group: the ``metric`` (MACs or params) removing one of
        its channels saves (scope ``cost`` ranks channels by score per unit)."""
        est = self.estimator
        base = est.before[metric]
        return {g.id: float(base - est.estimate({g.id: np.arange(g.width - 1)})[metric])
                for g in self.groups if not g.frozen and g.width > 1}

    def plan(self, ratios: Ratios, calib=None, scores=None, runtime=None, latency_table: str | None = None,
             progress=None, recovered: bool = True) -> Plan:
        """The plan ``ratios`` make on this model (a budget is solved here). A
        ``target_latency`` is met by timing candidates on ``runtime``
        (:class:`onnxprune.plan.latency.Runtime`; default: CPU), measured points
        kept in ``latency_table`` (a JSON file) when given. ``recovered``: the
        plan will be recovered (scope ``damage`` then measures its candidates
        with the means recovery gives back; otherwise as they will be written)."""
        if isinstance(calib, str):
            from onnxprune.plan.importance.calib import load as load_calib

            calib = load_calib(calib, self.skeleton())
        if scores is None:
            scores = self.scores(ratios, calib)
        if ratios.target_latency is not None:
            return self._latency_plan(ratios, calib, scores, runtime, latency_table, progress, recovered)
        if ratios.scope == "cost" and not scores.unit:
            scores.unit = self.unit_costs(ratios.target[0] if ratios.target else "macs")
        if ratios.scope == "damage":
            plan = self._damage_plan(ratios, calib, scores, progress, recovered)
        elif ratios.target is None:
            plan = make_plan(self.ctx, self.groups, ratios, scores=scores)
        else:
            from onnxprune.plan.budget import parse_target, solve

            est = self.estimator
            metric, requested = ratios.target
            target = parse_target(requested, est.before[metric], metric)
            _, plan, _, info = solve(self.ctx, self.groups, ratios, target, est, scores)
            plan.target = info
        plan.criteria = {g.kind: c for g in self.groups if g.id in scores.used for c in [scores.used[g.id]]}
        plan.ratios_given = ratios.to_dict()
        return plan

    def _damage_plan(self, ratios: Ratios, calib, scores, progress, recovered: bool = True) -> Plan:
        """Scope ``damage`` (:mod:`onnxprune.plan.damage`): candidates rewritten in
        memory and measured against the original on calibration samples."""
        from onnxprune.plan.budget import parse_target

        if ratios.target is None:
            raise UserError("scope 'damage' spends a budget: give target_macs or target_params in the ratios")
        metric, requested = ratios.target
        est = self.estimator
        target = parse_target(requested, est.before[metric], metric)
        search = self._damage_search(ratios, calib, scores, progress, recovered)
        plan, info = search(est.estimate, metric, target.value)
        achieved = est.estimate(plan.keep)[metric]
        plan.target = {"metric": metric, "requested": requested, "target": target.value, "achieved": achieved,
                       "before": est.before[metric], "error": (achieved - target.value) / target.value,
                       "scope": "damage", **info}
        if not info["met"] and plan.keep:  # a plan that removes nothing is refused in one line by the caller
            log.warning("target_%s: not reached with scope 'damage' (every group at its limit)", metric)
        return plan

    def _damage_search(self, ratios: Ratios, calib, scores, progress, recovered: bool = True):
        """``search(estimate, metric, target) -> (plan, info)``: the greedy of
        :func:`onnxprune.plan.damage.allocate` on this model's groups, each
        candidate measured on calibration samples (prepared once here), with
        the removed channels' means folded back when the plan will be
        ``recovered``, else as it will be written."""
        import time

        from onnxprune.plan import damage
        from onnxprune.plan.compensate import MeanShift
        from onnxprune.report import Progress
        from onnxprune.runtime import session
        from onnxprune.runtime.capture import channel_sums

        if calib is None:
            raise UserError("scope 'damage' measures each candidate on calibration data: give --calib "
                            "(unlabelled inputs are enough: DIR, FILE.npy/.npz or 'synthetic')")
        base = ratios.base_for_target()
        skeleton = Plan({}, {}, {}, {}, importance=scores)
        scored = [(g, r) for g, r, _ in plannable(self.groups, base, skeleton)]
        pool = [g for g, r in scored if r > 0]  # a ratio of 0 written for a group keeps it whole
        feeds, n = self._damage_feeds(calib, damage.SAMPLES)
        threads = os.cpu_count() or 1
        proto, weights = io.session_parts(self.model)
        sess = session(proto, threads, externals=weights)

        def reference(fds, times=None, sess=sess):  # the original's outputs on the feeds, and how long they
            # took (the fastest of damage.TIMINGS runs: a fresh session's first run is slower, and
            # EfficientNet-Lite0's 32 samples sit near RUN_SECONDS: a single run gave 30, 31 or 32 samples
            # from call to call)
            return _fastest(lambda: [sess.run(None, fd) for fd in fds], times=times)

        ref, t_run = reference(feeds, times=1)
        if damage.TIMINGS > 1 and damage.WARM_GAIN * n * damage.RUN_SECONDS >= (damage.MIN_SAMPLES + 1) * t_run:
            # more runs only where one could change the count: a model so slow that a run damage.WARM_GAIN times as
            # fast would still get the fewest samples (a ViT-S with a dense decoder: 3.2 s on 32, 3.1 s warm)
            # is not run again
            ref, t_again = reference(feeds, times=damage.TIMINGS - 1)
            t_run = min(t_run, t_again)
        if t_run > damage.RUN_SECONDS and n > damage.MIN_SAMPLES:  # a slow model: fewer samples per candidate
            fewer, m = self._damage_feeds(calib, max(damage.MIN_SAMPLES, int(n * damage.RUN_SECONDS / t_run)))
            if m < n:
                feeds, n = fewer, m
                ref, t_run = reference(feeds, times=1)  # the time only shown: one run
        del sess, reference, proto, weights

        # candidates are measured with the removed channels' mean contribution
        # folded into their consumers' biases, as --recover gives it back
        # (onnxprune.plan.compensate)
        # a slow model (fewer samples per candidate) takes its means from the first batches that hold
        # damage.SAMPLES samples (a ViT-S with a dense decoder, 4 batches of 32: 2.5 s instead of 10 s)
        per_batch = max(len(calib.batches[0]), 1)
        mean_batches = len(calib.batches) if n >= damage.SAMPLES else \
            min(len(calib.batches), -(-damage.SAMPLES // per_batch))

        def sums(axes):  # per channel, over the calibration data, of the original's values
            ins = [i.name for i in io.data_inputs(self.skeleton())]
            return channel_sums(self.model, axes, (calib.feed(k, ins) for k in range(mean_batches)), threads)

        shift = MeanShift(self.ctx, pool, sums, every=[g for g in self.groups if not g.frozen]) if recovered else None

        def rewritten(keep) -> float:  # the candidate as it will be written
            with self.edited(keep, prune=True, shifts=shift.shifts(keep) if shift else (), parts=True) as (proto, weights):
                sess = session(proto, threads, externals=weights)
                got = [sess.run(None, fd) for fd in feeds]
                del sess
            return float(np.mean([damage.output_damage(r, g) for r, g in zip(ref, got)]))

        fed = self._fed_runs(pool, shift, feeds, ref, threads)

        def measure(keep) -> float:
            if fed is not None and fed.use and fed.covers(keep):
                d = fed(keep)
                if d is not None:
                    return d
            return rewritten(keep)

        order = {g.id: np.argsort(-scores.values[g.id], kind="stable") for g in pool}

        def search(estimate, metric: str, target: float):
            t0 = time.perf_counter()
            bar = Progress(enabled=progress is not None)  # one throttled status line, not a line per candidate
            bar.show(f"scope damage: {len(pool)} groups, each candidate run on {n} calibration samples "
                     f"(~{t_run:.1f}s a run; the sensitivity pass alone is {len(pool)} runs)", force=True)
            # what one measurement costs: a zeroed candidate at mid depth where candidates are zeroed and run
            # from their first edited node (else the zeroed probe's whole run), else a rewritten candidate timed
            # (the first group's first step); every timing that decides the search is the fastest of
            # damage.TIMINGS runs (one run's time moves between runs)
            t_one, timings, partial_off = 0.0, {}, False
            first = [(g, g.width - damage.step_size(g.width, g.kind, ratios.round_to)) for g in pool]
            first = [(g, k) for g, k in first if k >= 1]
            if fed is not None:
                # the zeroed model in one session stands in for the rewritten one only where both give the
                # same damage on the probe (every exact group of the pool one channel short), and only when
                # it is clearly faster (a CNN's convolutions lose prepacked kernels on fed weights: EfficientNet-Lite0's
                # whole zeroed probe is about as slow as a rewritten one)
                d_edit, t_edit = _fastest(measure, fed.probe)
                d_fed, t_fed = _fastest(fed, fed.probe)
                agree = d_fed is not None and abs(d_fed - d_edit) <= 1e-3 * abs(d_edit) + 1e-9
                t_zero, t_part = t_fed, None

                def from_mid_depth():  # the probe edits every group, so it runs the whole model; a zeroed
                    # candidate runs from the first node its edit reaches (Resume): one at mid depth is timed, as
                    # zeroed candidates run (the search's expected time: an average candidate, not the whole model)
                    mid = [(g, k) for g, k in first if g.id in fed.probe]  # first steps, in graph order
                    if mid:
                        fed.prepare()
                    if not mid or fed.resume() is None:
                        return None
                    g, k = mid[len(mid) // 2]
                    keep = {g.id: np.sort(order[g.id][:k])}
                    fed(keep)  # the first partial run is checked against the whole model's, untimed
                    if fed.resume() is None:
                        return None
                    timings["zeroed_from_mid_depth"] = _fastest(fed, keep)[1]
                    return timings["zeroed_from_mid_depth"]

                if agree and damage.ZEROED is None and damage.ZEROED_GAIN * t_edit < t_fed <= 2 * t_edit:
                    t_part = from_mid_depth()
                    t_zero = min(t_fed, t_part) if t_part is not None else t_fed
                faster = t_zero <= damage.ZEROED_GAIN * t_edit
                fed.use = agree and (faster if damage.ZEROED is None else damage.ZEROED)
                if fed.use:
                    fed.prepare()
                    if t_part is None:
                        t_part = from_mid_depth()
                    if t_part is not None and fed.resume() is not None and fed.resume().extended and t_part >= t_fed:
                        # pieces at ORT's extended level (the full one refused them) no faster than the whole
                        # zeroed model at the full level: whole runs (at the full level a piece does less work)
                        fed.resume().ok = False
                        t_part, partial_off = None, True
                else:
                    fed.discard()
                timings.update(rewritten=t_edit, zeroed=t_fed)
                log.debug("scope damage: the probe rewritten %.3fs (damage %.6g), zeroed in one session %.3fs (%s)%s: "
                          "candidates %s", t_edit, d_edit, t_fed, d_fed,
                          f", a candidate at mid depth zeroed {timings['zeroed_from_mid_depth']:.3f}s"
                          if "zeroed_from_mid_depth" in timings else "", "zeroed" if fed.use else "rewritten")
                if fed.use:
                    t_one = t_part if t_part is not None else t_fed
            if first and not (fed is not None and fed.use):
                g, k = first[0]
                _, t_one = _fastest(measure, {g.id: np.sort(order[g.id][:k])})
                timings["candidate"] = t_one
            steps, expected = damage.planned_steps(pool, estimate, metric, target, ratios.round_to, t_one)
            if steps != damage.STEPS:
                bar.show(f"scope damage: steps of 1/{steps} of a group (steps of 1/{damage.STEPS} would take about "
                         f"{expected[damage.STEPS]:.0f}s, over {damage.SEARCH_SECONDS:.0f}s)", force=True)
            # a search that even its coarsest steps are expected to take longer than damage.SEARCH_SECONDS gets
            # that budget in measurements (as deterministic as the step size: from the same timing); once spent,
            # the remaining steps are taken on the damages last measured (damage.allocate)
            cap = max(len(pool), int(damage.SEARCH_SECONDS / (t_one * damage.RUN_OVERHEAD))) \
                if t_one > 0 and expected[steps] > damage.SEARCH_SECONDS else None
            keep, info = damage.allocate(pool, order, measure, estimate, metric, target, round_to=ratios.round_to,
                                         progress=bar.show, steps_to_width=steps,
                                         settled=fed.settle if fed is not None and fed.use else None,
                                         max_measurements=cap)
            bar.show(f"scope damage: {info['measurements']} candidates measured"
                     + (f" (the budget of about {damage.SEARCH_SECONDS:.0f}s); the last {info['unmeasured']} steps taken on "
                        f"the damages last measured" if info["unmeasured"] else ""), force=True)
            zeroed = fed is not None and fed.use
            part = fed.resume() if zeroed else None
            if part is not None:
                info["partial_runs"] = part.runs
                log.debug("scope damage: %d candidates run from a later node (%d starting points, %d sessions; "
                          "the values moved on %d times, %d of them taken from the step's own run)", part.runs,
                          len(part.cross), len(part.sessions), part.rebased + part.reused, part.reused)
                fed.discard()  # its sessions and held values go before recovery needs the memory
            return self._keep_plan(skeleton, scored, keep), {"samples": n, "compensated": recovered,
                                                              "candidates": "zeroed" if zeroed else "rewritten",
                                                              **({"partial_runs_off": True} if partial_off else {}),
                                                              "timings": timings,
                                                              "seconds": time.perf_counter() - t0,
                                                              "measurement_seconds": t_one,
                                                              "expected_seconds": expected[steps],
                                                              "expected_by_steps": expected,
                                                              "max_measurements": cap, **info}

        search.scored, search.skeleton, search.order = scored, skeleton, order
        search.fed, search.rewritten = fed, rewritten
        return search

    def _fed_runs(self, pool: list[Group], shift, feeds: list[dict], ref: list, threads: int):
        """Candidates of the damage search measured without rewriting the model
        for each: one ORT session of the original whose edited initializers
        (the pool's member tensors and the biases the mean shift moves) are
        graph inputs, fed per candidate with the removed channels zeroed
        (:func:`rewrite.zero_removed`, which the oracle proves equal to
        cutting them out for every exact group) and the means folded in. On a
        ViT-S with a dense decoder a candidate took 0.64 s rewritten (0.38 s of
        it the run; the rest serialising and making its session), about 0.42 s
        here. Returns ``runs(keep) -> damage`` (None where the zeroed model's
        outputs are not finite: the caller rewrites instead), with
        ``runs.covers(keep)`` (only exact groups) and ``runs.use`` (the caller's
        choice, False until it is made); None when the model does not allow it:
        a quantized graph (its fused integer kernels need constant weights) or
        an edit that is not an in-place change of initializers."""
        from onnxprune.plan import damage
        from onnxprune.runtime import session
        from onnxprune.rewrite import ZeroMemo
        from onnxprune.runtime.capture import Resume

        exact = {g.id for g in pool if g.exact}
        graph = self.model.graph
        if not exact or any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph):
            return None
        width = {g.id: g.width for g in pool}

        def shifts(keep):
            return shift.shifts(keep, unpruned=True) if shift is not None else ()

        probe = {gid: np.arange(1, width[gid]) for gid in exact if width[gid] > 1}  # every exact group edited
        if not probe:
            return None
        before = {n: v.const_value for n, v in graph.initializers.items()}
        with self.edited(probe, zero=True, shifts=shifts(probe), read=()) as (_, names):
            inits = graph.initializers
            changed = frozenset(n for n in names if n not in before or inits[n].const_value is not before[n])
            if any(inits[n].is_graph_input() for n in changed):
                return None
            proto, weights = io.session_parts(self.model, fed=changed)
        sess = session(proto, threads, externals=weights)
        resume, prepared = None, False
        memo = ZeroMemo()  # candidate after candidate zeroes the current plan again: its tensors are kept

        def prepare() -> None:  # once zeroed candidates are chosen: they run from the first node their edits
            # reach, from the values the unedited model left there (runtime.capture.Resume); the first such run
            # is checked against the whole model's
            nonlocal resume, prepared
            if prepared:  # once: a Resume that failed its check stays off
                return
            prepared = True
            with self.edited({}, zero=True, shifts=shifts({}), read=changed) as (arrays, now):
                base = dict(arrays) if now == names and len(arrays) == len(changed) else None
            if base is not None and damage.RESUME:
                try:
                    resume = Resume(proto, weights, base, feeds, threads)
                except Exception as e:  # noqa: BLE001 - any surprise: every candidate runs the whole model
                    log.debug("scope damage: no partial runs (%s)", e)

        def whole(arrays):
            return [sess.run(None, {**fd, **arrays}) for fd in feeds]

        def runs(keep) -> float | None:
            nonlocal resume
            with self.edited(keep, zero=True, shifts=shifts(keep), read=changed, memo=memo) as (arrays, now):
                if now != names or len(arrays) != len(changed):
                    return None
                start = None
                if resume is not None and resume.ok:
                    start = resume.start(resume.changed(arrays))
                got = None
                if start is not None:
                    try:
                        got = resume.run(start, arrays, key=_plan_key(keep))
                    except Exception as e:  # noqa: BLE001 - a piece ORT refuses: the whole model, from now on
                        log.debug("scope damage: a partial run failed (%s): no partial runs", e)
                        resume, start = None, None
                if got is None:
                    got = whole(arrays)
                if start is not None and not resume.checked:  # the first partial run against the whole model
                    resume.checked = True
                    full = whole(arrays)
                    d_full, d_part = (np.mean([damage.output_damage(r, g) for r, g in zip(ref, o)]) for o in (full, got))
                    if not abs(d_part - d_full) <= 1e-3 * abs(d_full) + 1e-9:
                        log.debug("scope damage: a partial run gave damage %s, the whole model %s: no partial runs",
                                  d_part, d_full)
                        resume, got = None, full
            if not all(np.all(np.isfinite(y)) for out in got for y in out if np.issubdtype(y.dtype, np.floating)):
                return None  # a normalisation inside the zeroed channels (0/0): the rewritten model decides
            return float(np.mean([damage.output_damage(r, g) for r, g in zip(ref, got)]))

        runs.covers = lambda keep: all(gid in exact for gid in keep)
        runs.use, runs.probe = False, probe
        def settle(keep) -> None:  # the search moved to ``keep``: later candidates start from its values
            nonlocal resume
            if resume is None or not resume.ok:
                return
            with self.edited(keep, zero=True, shifts=shifts(keep), read=changed, memo=memo) as (arrays, now):
                if now != names or len(arrays) != len(changed):
                    return
                try:
                    resume.rebase(arrays, key=_plan_key(keep))
                except Exception as e:  # noqa: BLE001 - a piece ORT refuses: the whole model, from now on
                    log.debug("scope damage: partial runs could not move on (%s): no partial runs", e)
                    resume = None

        def discard() -> None:  # rewritten candidates chosen, or the search over: the held values go (a later
            # search prepares anew)
            nonlocal resume, prepared, memo
            resume, prepared, memo = None, False, ZeroMemo()

        runs.resume, runs.prepare, runs.settle, runs.discard = (lambda: resume), prepare, settle, discard
        return runs

    @staticmethod
    def _keep_plan(skeleton: Plan, scored: list, keep: dict[int, np.ndarray]) -> Plan:
        """A plan keeping ``keep`` (the damage search's result); ``scored``: the
        plannable groups and their ratios, ``skeleton``: what planning recorded (skipped groups)."""
        plan = Plan({}, {}, {}, dict(skeleton.skipped), importance=skeleton.importance)
        for g, r in scored:
            plan.scores[g.id] = skeleton.importance.values[g.id]
            if r <= 0:
                continue
            if g.id in keep:
                plan.keep[g.id] = keep[g.id]
                plan.ratios[g.id] = (1 - len(keep[g.id]) / g.width, "damage")
            else:
                plan.ratios[g.id] = (0.0, "damage")
        return plan

    def _damage_feeds(self, calib, want: int) -> tuple[list[dict], int]:
        """Calibration feeds for measuring candidates: ``want`` samples taken
        evenly from every batch, in one feed (a dynamic batch), or whole batches
        until there are at least ``want`` (a static one)."""
        skel = self.skeleton()
        names = [i.name for i in io.data_inputs(skel)]
        batches = [calib.feed(k, names) for k in range(len(calib.batches))]
        if io.static_batch(skel) is not None:
            feeds, n = [], 0
            for fd in batches:
                if n >= want:
                    break
                feeds.append(fd)
                n += len(next(iter(fd.values())))
            return feeds, n
        per = -(-want // len(batches))  # from each batch, its first samples
        feed = {k: np.concatenate([fd[k][:per] for fd in batches])[:want] for k in names}
        return [feed], len(next(iter(feed.values())))

    def _latency_plan(self, ratios: Ratios, calib, scores, runtime, table, progress, recovered: bool = True) -> Plan:
        from onnxprune.plan import latency
        from onnxprune.runtime.bench import bench

        rt = runtime or latency.Runtime()
        original = self.data_proto()
        macs0 = self.counts()["macs"]
        inner = Ratios(**{**ratios.__dict__, "target_latency": None})
        if "round_to" not in ratios.given:  # widths the provider's kernels run well (plan.latency.ROUND_TO)
            inner.round_to = latency.ROUND_TO.get(rt.provider, 1)

        def macs_plan_at(f: float):
            inner.target_macs = f
            p = self.plan(inner, calib, scores, recovered=recovered)
            return p, self.counts(p)["macs"] / macs0

        plan_at = macs_plan_at
        digest = latency.model_key(original)
        keyed = {k: v for k, v in inner.to_dict().items() if k not in ("target_latency", "target_macs")}
        if inner.scope == "damage":  # damage per predicted millisecond, the budget then met by measuring
            plan_at = self._damage_ms_path(inner, calib, scores, rt, table, progress, macs0, original, digest,
                                           recovered)
            keyed["search"] = "predicted ms"

        def measure(p: Plan) -> tuple[float, float, float]:
            with self.edited(p.keep, prune=True) as proto:
                rows = bench([("original", original), ("candidate", proto)], batch=rt.batch, provider=rt.provider,
                             threads=rt.threads, warmup=rt.warmup, runs=rt.runs, progress=False,
                             input_shapes=rt.input_shapes)
            paired = np.asarray(rows[1].times_ms) / np.asarray(rows[0].times_ms)  # run r of each, side by side
            return rows[0].median_ms, rows[1].median_ms, float(np.median(paired)) * rows[0].batch / rows[1].batch

        plan, info = latency.solve(plan_at, measure, ratios.target_latency, rt, table, digest, keyed, progress)
        info["round_to"] = inner.round_to
        if inner.scope == "damage":
            info["search"] = "predicted ms"
            info["scope"] = "damage"
        plan.target = info
        plan.ratios_given = ratios.to_dict()
        return plan

    def latency_model(self, rt=None, table: str | None = None, progress=None, original: onnx.ModelProto | None = None,
                      key: str | None = None):
        """The per-node latency model of this model on ``rt``
        (:class:`onnxprune.plan.latency.NodeModel`): every node timed alone at
        full width and with every group halved; kept in ``table`` when given."""
        from onnxprune.plan import latency
        from onnxprune.runtime import random_inputs
        from onnxprune.runtime.bench import DEFAULT_BATCH, with_shapes
        from onnxprune.runtime.nodetime import node_times

        rt = rt or latency.Runtime()
        nodes = list(self.ctx.graph)
        ref_keep = latency.reference_keep(self.groups, latency.ROUND_TO.get(rt.provider, 8))
        ref_work = self.estimator.node_work(ref_keep)
        original = original if original is not None else self.data_proto()
        key = latency.nodes_key(key or latency.model_key(original), rt)
        cached = latency.read_nodes(table, key, len(nodes))
        if cached is None:
            proto = with_shapes(original, rt.input_shapes) if rt.input_shapes else original
            batch = io.static_batch(proto) or rt.batch or DEFAULT_BATCH.get(rt.provider, 8)
            feed = random_inputs(proto, batch=batch)
            threads = rt.key()["threads"]
            if progress:
                progress(f"latency model: timing {len(nodes)} nodes alone, at full width and with every group halved")
            full = node_times(proto, feed, rt.provider, threads, progress=progress)
            index = {id(n): j for j, n in enumerate(nodes)}
            ref: list = [None] * len(nodes)
            with self.edited(ref_keep, prune=True) as edited:
                now = list(self.ctx.graph)
                if rt.input_shapes:
                    edited = with_shapes(edited, rt.input_shapes)
                said = (lambda m: progress(f"{m} (every group halved)")) if progress else None
                for n, t in zip(now, node_times(edited, feed, rt.provider, threads, progress=said)):
                    if id(n) in index:
                        ref[index[id(n)]] = t
            latency.write_nodes(table, key, full, ref)
        else:
            full, ref = cached
        return latency.NodeModel(self.estimator, full, ref, ref_work)

    def _damage_ms_path(self, ratios: Ratios, calib, scores, rt, table, progress, macs0: float, original, digest: str,
                        recovered: bool = True):
        """``plan_at(f)`` for the latency search under scope ``damage``: the plan
        after the damage search's steps (damage per *predicted* millisecond
        saved, :meth:`latency_model`) up to a predicted time of ``f`` of the
        original's. One greedy run serves every ``f`` it went past; a lower
        ``f`` runs it again, further."""
        model = self.latency_model(rt, table, progress, original, digest)
        search = self._damage_search(ratios, calib, scores, progress, recovered)
        ms0 = model.before_ms
        if ms0 <= 0:
            raise UserError("latency model: no node of this model could be timed alone")
        width = {g.id: g.width for g, _ in search.scored}
        run = {"floor": None, "history": [], "met": True}

        def plan_at(f: float):
            goal = f * ms0
            if run["floor"] is None or (goal < run["floor"] and run["met"]):  # not gone this far yet: run it further
                _, info = search(model.estimate, "ms", max(goal - 0.1 * ms0, 0.02 * ms0))
                run.update(floor=info["history"][-1]["ms"] if info["history"] else ms0, history=info["history"],
                           met=info["met"])
            removed: dict[int, int] = {}
            for step in run["history"]:  # the shortest prefix of the steps that reaches the goal
                removed[step["group"]] = step["removed"]
                if step["ms"] <= goal:
                    break
            keep = {gid: np.sort(search.order[gid][: width[gid] - n]) for gid, n in removed.items() if n}
            plan = self._keep_plan(search.skeleton, search.scored, keep)
            return plan, model.ms(keep) / ms0, self.counts(plan)["macs"] / macs0

        return plan_at

    # -- edits --------------------------------------------------------------------------
    def rewrite(self, plan: Plan) -> ir.Model:
        """Apply ``plan`` to this job's model, in place (once)."""
        from onnxprune.rewrite import apply_plan

        if self.rewritten:
            raise RuntimeError("this job's model was already rewritten")
        apply_plan(self.ctx, plan.keep)
        self.rewritten = True
        self.plan_keep = plan.keep
        return self.model

    def recover(self, original: onnx.ModelProto, calib, method: str = "ridge", progress: bool = False, **options):
        """The recovery stage (:mod:`onnxprune.recover`): re-fit the rewritten
        model against ``original`` (this job's model before :meth:`rewrite`) on
        ``calib``; the new weights go into this job's model through the
        rewriter (all undone when the result is refused). Returns the per-layer
        rows and the stats (time split, the whole-model check on kept-out sources).
        ``options`` go to :func:`onnxprune.recover.recover_model`."""
        from onnxprune.recover import recover_model

        if not self.rewritten or self.plan_keep is None:
            raise RuntimeError("recover() follows rewrite()")
        stats: dict = {}
        rows = recover_model(original, self.model, self.ctx, self.plan_keep, calib, method=method,
                             progress=progress, stats=stats, **options)
        return rows, stats

    @contextmanager
    def edited(self, keep: dict[int, np.ndarray], zero: bool = False, prune: bool = False, consumer_only=frozenset(),
               shifts=(), parts: bool = False, read=None, memo=None):
        """Temporarily zero the removed channels (see :func:`rewrite.zero_removed`)
        and/or rewrite by ``keep``, then move layers' outputs by ``shifts``
        (``[(node, per-channel shift)]``, :func:`rewrite.shift_output`); yields a
        full proto of the edited model (``parts``: the proto and its weights
        apart, :func:`io.session_parts`, for a session only; ``read``: names of
        initializers, for their arrays ``{name: array}`` and the names of every
        initializer then; ``memo``: a :class:`rewrite.ZeroMemo` the zeroing reuses), then undoes every edit."""
        from onnxprune.rewrite import Journal, apply_plan, shift_output, zero_removed

        j = Journal()
        try:
            if zero:
                zero_removed(self.ctx, [g for g in self.groups if g.id in keep], keep, j, consumer_only, memo)
            if prune:
                apply_plan(self.ctx, keep, j)
            for node, shift in shifts:
                shift_output(node, shift, j)
            if read is not None:
                inits = self.model.graph.initializers
                yield {n: inits[n].const_value.numpy() for n in read if n in inits}, frozenset(inits)
            else:
                yield io.session_parts(self.model) if parts else io.full_proto(self.model)
        finally:
            j.undo()

    # -- output -------------------------------------------------------------------------
    def save(self, path: str, check: bool = True, inputs: tuple = ()) -> dict:
        """Write the (rewritten) model to ``path`` by streaming its tensors, then
        validate the written file; nothing is left at ``path`` if that fails.
        ``path`` may be neither the input nor any of ``inputs``. Returns the validation facts."""
        io.refuse_overwrite(path, self.source, *inputs)
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".onnxprune-", suffix=".onnx", dir=d)
        os.close(fd)
        data = None
        try:
            external = True if self._has_external_input() else None
            data = io.save_model(self.model, tmp, external=external, data_name=os.path.basename(path) + ".data")
            checks = self.validate(tmp) if check else {}
            os.replace(tmp, path)
        except Exception:
            for f in (tmp, os.path.join(d, data) if data else None):
                if f and os.path.exists(f):
                    os.remove(f)
            raise
        return checks

    def validate(self, pruned: str | onnx.ModelProto) -> dict:
        """:func:`validate` the pruned model; if ORT cannot run it, run the original on
        the same feed first: a feed the original cannot run is the user's to fix."""
        try:
            return validate(pruned, feed_model=self._feed_model())
        except Exception as e:
            if isinstance(e, UserError):
                raise
            original = self.source or self._original
            why = run_failure(original, self._feed_model()) if original is not None else None
            if why is not None:
                raise UserError("the original model cannot run on the validation input either "
                                f"({feed_text(self._feed_model())}: {why}); if it takes other sizes, give its input "
                                "shape with --input-shape NAME:d1,d2,...") from None
            raise RuntimeError(f"pruned model failed validation: {e}") from e

    def _feed_model(self) -> onnx.ModelProto:
        """A weight-less proto with the inputs as analysed (and the tables integer inputs index)."""
        return io.skeleton(self.model)

    def _has_external_input(self) -> bool:
        """True when the input kept its weights in a separate file."""
        return bool(self.model.graph.meta.get("external_input"))

"""``onnxprune [prune]``, ``analyze`` and ``verify``: the pruning pipeline's commands."""
from __future__ import annotations

import json
import logging
import os
import time

from onnxprune.cli.common import Failed, check_paths, default_model, default_ratios, say, shapes
from onnxprune.errors import UserError

log = logging.getLogger("onnxprune")


def cmd_prune(args) -> str:
    from onnxprune import api, report
    from onnxprune.pipeline import Job
    from onnxprune.plan import Ratios
    from onnxprune.validate.oracle import oracle

    model = args.model or default_model()
    if args.plan and args.ratios:
        raise UserError("give --ratios or --plan, not both")
    ratios_src = args.ratios or (default_ratios() if not args.model and not args.plan else None)
    if ratios_src is None and not args.plan:
        raise UserError("--ratios is required (a ratios.json file or inline JSON), or --plan to replay a saved plan")
    ratios = Ratios.load(ratios_src) if ratios_src else None
    out = args.output or os.path.basename(os.path.splitext(model)[0]) + ".pruned.onnx"
    check_paths(model, out)
    for extra in (args.report, args.save_plan):
        if extra and os.path.abspath(extra) in (os.path.abspath(model), os.path.abspath(out)):
            raise UserError("--report / --save-plan must not be the model or output path")
    say(args, f"analysing {model}")
    job = Job.open(model, shapes(args, ratios))
    calib = calib_data(args, job)
    if calib is not None:
        say(args, f"calibration: {calib.source}, {len(calib.batches)} batches of {len(calib.batches[0])}")
    if args.recover and calib is None:
        raise UserError("--recover needs --calib (unlabelled inputs are enough: DIR, FILE.npy/.npz or 'synthetic')")
    if args.recover and ratios is not None:
        ratios, note = ratios.for_recovery()
        if note:
            say(args, note)
    rt = None
    if ratios is not None and ratios.target_latency is not None:
        from onnxprune.plan.latency import Runtime

        args.bench = True  # a latency target ends with the measured speed-up of the written file
        rt = Runtime(args.provider, args.batch, args.threads, args.warmup, args.runs, shapes(args, ratios) or None)
        say(args, f"latency search on {args.provider} (batch {rt.key()['batch']}, {rt.key()['threads']} threads) ...")
    plan = api.resolve_plan(job, ratios, args.plan, calib, rt, args.latency_table, lambda m: say(args, m))
    if not plan.keep:
        raise UserError(f"nothing to prune: {why_nothing(job, plan)}")
    if args.save_plan:
        with open(args.save_plan, "w") as f:
            json.dump(plan.to_json(job.groups, os.path.basename(model)), f, indent=1)
    groups = job.groups
    say(args, report.sets_table(groups, plan.keep))
    frozen = [g for g in groups if g.frozen]
    if frozen:
        say(args, f"\nfrozen groups ({len(frozen)}):\n" + report.frozen_table(groups))
    if plan.target:
        say(args, "\n" + target_text(plan.target))
        if plan.target.get("metric") == "latency" and not plan.target["met"]:
            log.warning("target_latency not met: %s", target_text(plan.target))
    b, a = job.counts(), job.counts(plan)
    say(args, "\n" + report.table(
        [["params", report.human(b["params"]), report.human(a["params"]), ratio(a["params"], b["params"])],
         ["MACs (batch 1)", report.human(b["macs"]), report.human(a["macs"]), ratio(a["macs"], b["macs"])]],
        ["", "before", "after", "ratio"]))
    rows = []
    if args.verify:
        from onnxprune.validate.oracle import require_checks

        rows = oracle(job, plan=plan)
        say(args, "\n" + oracle_table(rows))
        require_checks(rows, plan)
    t0 = time.perf_counter()
    original = job.data_proto() if args.recover else None
    job.rewrite(plan)
    recovery = []
    if args.recover:
        recovery = run_recovery(args, job, original, calib)
    checks = job.save(out)
    res = api.PruneResult(job, plan, b, a, checks, time.perf_counter() - args.t0)
    latency = []
    if args.bench:
        from onnxprune.runtime.bench import bench, table

        say(args, f"\nbenchmarking original vs pruned ({args.provider}, {args.runs} interleaved runs each) ...")
        latency = bench([model, ("pruned", out)], batch=args.batch, provider=args.provider, threads=args.threads,
                        warmup=args.warmup, runs=args.runs, progress=not args.quiet, input_shapes=shapes(args, ratios))
        say(args, table(latency))
        eff = latency[1].speedup * a["macs"] / b["macs"] if b["macs"] else 1.0  # the speed-up / the MACs reduction
        t = plan.target or {}
        if t.get("metric") == "latency" and 1 / latency[1].speedup > 1.1 * t["target_ratio"]:
            log.warning("the written model measured %.1f%% of the original's time, more than 10%% over the target %.1f%% "
                        "(the search measured %.1f%%): timings on this machine vary; --runs N times longer",
                        100 / latency[1].speedup, 100 * t["target_ratio"], 100 * t["achieved_ratio"])
        odd = sorted({len(k) for k in plan.keep.values() if len(k) % 8})
        if odd and eff < 0.7:  # the shape of the peers' "pruned but not faster" reports
            log.warning("the speed-up is %.0f%% of the MACs reduction; %d kept widths are not multiples of 8 (e.g. %s), "
                        "which the %s kernels run slowly: try \"round_to\": 8 in the ratios", 100 * eff, len(odd),
                        ", ".join(map(str, odd[:4])), args.provider.upper())
    log.debug("rewrite + write + validate: %.2fs", time.perf_counter() - t0)
    if args.report:
        report.write_prune_report(args.report, job, res, model, out, ratios.to_dict() if ratios else plan.ratios_given,
                                  args.plan, oracle=rows, latency=latency, recovery=recovery)
    if any(r.status == "FAIL" for r in rows):
        raise Failed(f"oracle failed; model written to {out}")
    removed = sum(g.width - len(plan.keep[g.id]) for g in groups if g.id in plan.keep)
    speed = f", speed-up {latency[1].speedup:.2f}x (efficiency {eff:.2f})" if latency else ""
    return f"{removed} channels removed in {len(plan.keep)} groups, MACs {ratio(a['macs'], b['macs'])}{speed} -> {out}"


def calib_data(args, job):
    if not getattr(args, "calib", None):
        return None
    from onnxprune.plan.importance.calib import load

    return load(args.calib, job.skeleton(), args.calib_batches, args.calib_batch_size)


def run_recovery(args, job, original, calib) -> list:
    """Closed-form recovery of the rewritten model in ``job`` (see onnxprune.recover)."""
    from onnxprune.recover import format_rows

    say(args, f"\nrecovery ({args.recover}) from {calib.source} ...")
    rows, stats = job.recover(original, calib, method=args.recover, progress=not args.quiet)
    say(args, format_rows(rows))
    if "run_s" in stats:
        say(args, f"recovery time: {stats['run_s']:.1f}s in ONNX Runtime ({stats['levels']} levels, "
                  f"{stats['passes']} partial passes), {stats['fit_s']:.1f}s statistics and solves")
    say(args, held_out_text(stats.get("held_out")))
    return rows


def held_out_text(h) -> str:
    """One line on the whole model against the original on calibration sources no fit saw."""
    if not h:
        return "held-out check: fewer than 8 calibration sources, none kept out (the per-layer held-out errors still apply)"
    agree = (f"; top-1 agreement {h['agree_pruned']:.1f}% -> {h['agree_recovered']:.1f}%, "
             f"KL {h['kl_pruned']:.3g} -> {h['kl_recovered']:.3g}" if "agree_pruned" in h else "")
    kept = " (worse: kept the pruned weights)" if h["worse"] else ""
    return (f"held-out check ({h['samples']} samples from sources no fit saw): output error vs the original "
            f"{h['err_pruned']:.4f} pruned -> {h['err_recovered']:.4f} recovered{agree}{kept}")


def why_nothing(job, plan=None) -> str:
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


def ratio(after: int, before: int) -> str:
    return f"{after / before:.3f}x" if before else "n/a (nothing counted)"


def target_text(t: dict) -> str:
    from onnxprune.report import human

    if t.get("metric") == "latency":
        from onnxprune.plan.latency import target_text as latency_text

        return latency_text(t)
    if t.get("scope") == "damage":
        from onnxprune.plan.damage import target_text as damage_text

        return damage_text(t)
    used = t["ratios_used"]
    parts = [f"default {used['default']:.4f}"] if used.get("default") else []
    for key in ("kinds", "sets", "layers"):
        parts += [f"{key}[{k}] {v:.4f}" for k, v in used.get(key, {}).items()]
    return (f"target_{t['metric']} {t['requested']}: {human(t['target'])} wanted, {human(t['achieved'])} reached "
            f"({100 * t['error']:+.2f}%), ratios x{t['scale']:.4f}: {', '.join(parts) or 'none'}")


def oracle_table(rows) -> str:
    from onnxprune.report import table

    return "zero-contribution oracle (max relative error, tolerance 1e-4):\n" + table(
        [[r.scope, r.kind, r.groups, r.removed, "-" if r.max_rel_err is None else f"{r.max_rel_err:.2e}", r.status] for r in rows],
        ["set", "kind", "groups", "removed", "max rel err", "status"])


def cmd_analyze(args) -> str:
    from onnxprune import report

    from onnxprune.pipeline import Job

    a = Job.open(args.model, shapes(args))
    say(args, report.sets_table(a.groups))
    scores = None
    if args.scores or args.plot:
        from onnxprune.plan import Ratios

        imp = json.loads(args.importance) if args.importance.lstrip().startswith("{") else args.importance
        r = Ratios.from_dict({"importance": imp})
        scores = a.scores(r, calib_data(args, a))
        say(args, "\nimportance per isomorphic set:\n" + report.scores_table(a.groups, scores))
        if args.plot:
            report.plot_scores(a.groups, scores, args.plot)
    say(args, "\nfrozen groups:\n" + report.frozen_table(a.groups))
    if args.members:
        for g in a.groups:
            say(args, f"\ngroup {g.id} [{g.kind}] width {g.width} set {g.set_name or '-'}")
            for m in g.tensors:
                say(args, f"   {m.role:5s} {m.node.op_type:12s} {m.value.name} axis {m.axis}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.groups_json(a.groups, scores=scores), f, indent=1)
    n = sum(1 for g in a.groups if not g.frozen)
    if not n:  # say why, as a prune run would
        return f"nothing is prunable: {why_nothing(a)}"
    return f"{n} prunable groups in {len(a.sets)} isomorphic sets, {len(a.groups) - n} frozen"


def cmd_verify(args) -> str:
    from onnxprune import api
    from onnxprune.pipeline import Job
    from onnxprune.plan import Ratios
    from onnxprune.validate.oracle import oracle, require_checks

    if bool(args.ratios) == bool(args.plan):
        raise UserError("give --ratios (the plan a prune run would make) or --plan (a saved plan), one of them")
    if not os.path.isfile(args.model):
        raise UserError(f"no such model file: {args.model}")
    ratios = Ratios.load(args.ratios) if args.ratios else None
    job = Job.open(args.model, shapes(args, ratios))
    plan = api.resolve_plan(job, ratios, args.plan, None if args.plan else calib_data(args, job))
    rows = oracle(job, plan=plan, per_set=not args.no_per_set)
    say(args, oracle_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=1)
    require_checks(rows, plan)
    tested = [r for r in rows if r.max_rel_err is not None]
    if any(r.status == "FAIL" for r in rows):
        raise Failed("oracle mismatch")
    worst = max((r.max_rel_err for r in tested), default=0.0)
    return f"{len(tested)} checks, max relative error {worst:.2e}"

"""``onnxprune [prune]``, the default command: plan, rewrite and write a pruned model (with --verify, --recover, --bench)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

from onnxprune.cli import COMMANDS
from onnxprune.cli.common import (Failed, bench_opts, calib_data, calib_opts, check_paths, common, default_model, default_ratios,
                                  oracle_table, say, shape_opt, shapes, why_nothing)
from onnxprune.errors import UserError

log = logging.getLogger("onnxprune")

NAME = "prune"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxprune", description="Structural pruning of ONNX models.",
                                epilog=f"subcommands: {', '.join(c for c in COMMANDS if c != NAME)} (onnxprune SUBCOMMAND -h)")
    p.add_argument("model", nargs="?", help="input .onnx (default: the built-in demo ResNet)")
    p.add_argument("--ratios", help="ratios.json path or inline JSON (default: built-in demo ratios)")
    p.add_argument("-o", "--output", help="pruned model path (default: MODEL stem + '.pruned.onnx' in the current directory)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--verify", action="store_true", help="run the zero-contribution oracle on this plan")
    p.add_argument("--recover", nargs="?", const="ridge", choices=["bias", "stats", "ridge"],
                   help="closed-form recovery from --calib data, no labels: re-fit every layer that reads pruned channels "
                   "(ridge, the default), match per-channel output statistics (stats), or fold the removed channels' mean "
                   "into the bias (bias). Fits are judged on calibration sources they did not see (a 'source' array "
                   "in an .npz, else groups of look-alike images); a quarter of the sources checks the whole model")
    p.add_argument("--plan", help="replay a plan file saved by --save-plan (instead of --ratios)")
    p.add_argument("--save-plan", help="write the plan (groups by member names, kept indices) as JSON here")
    shape_opt(p)
    calib_opts(p)
    p.add_argument("--bench", action="store_true", help="measure ORT latency before and after (interleaved; see 'onnxprune bench')")
    bench_opts(p, runs=30, warmup=5)
    p.add_argument("--latency-table", help="with target_latency in the ratios: keep the measured (MACs, latency) points "
                   "in this JSON file and start later searches from them")
    common(p)
    return p


def run(args) -> str:
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

"""``onnxprune [prune]``, the default command: plan, rewrite and write a pruned model (with --verify, --recover, --bench)."""
from __future__ import annotations

import argparse
import logging
import os

from onnxprune.cli import COMMANDS
from onnxprune.cli.common import (Failed, bench_opts, calib_opts, common, default_model, default_ratios, say, shape_opt,
                                  shapes)
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
                   "in an .npz, else groups of look-alike images); an eighth of the sources checks the whole model")
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
    """Parse what the user gave, call :func:`onnxprune.api.prune`, print what it returns."""
    from onnxprune import api, report

    model = args.model or default_model()
    if args.plan and args.ratios:
        raise UserError("give --ratios or --plan, not both")
    ratios_src = args.ratios or (default_ratios() if not args.model and not args.plan else None)
    if ratios_src is None and not args.plan:
        raise UserError("--ratios is required (a ratios.json file or inline JSON), or --plan to replay a saved plan")
    ratios = api.load_ratios(ratios_src) if ratios_src else None
    out = args.output or os.path.basename(os.path.splitext(model)[0]) + ".pruned.onnx"
    if not os.path.isfile(model):
        raise UserError(f"model file not found: {model}")
    for extra in (args.report, args.save_plan):
        if extra and os.path.abspath(extra) in (os.path.abspath(model), os.path.abspath(out)):
            raise UserError("--report / --save-plan must not be the model or output path")
    if args.recover and not args.calib:
        raise UserError("--recover needs --calib (unlabelled inputs are enough: DIR, FILE.npy/.npz or 'synthetic')")
    say(args, f"analysing {model}")
    latency_target = ratios is not None and ratios.target_latency is not None
    rt = None
    if args.bench or latency_target:
        rt = api.Runtime(args.provider, args.batch, args.threads, args.warmup, args.runs, shapes(args, ratios) or None)
    res = api.prune(model, ratios, calib=args.calib, calib_batches=args.calib_batches,
                    calib_batch_size=args.calib_batch_size, calib_norm=args.calib_norm, plan=args.plan, input_shapes=args.input_shape,
                    runtime=rt, latency_table=args.latency_table, recover=args.recover, verify=args.verify,
                    bench=args.bench or latency_target, output=out,
                    progress=None if args.quiet else (lambda m: say(args, m)))
    job = res.job
    b, a, plan = res.before, res.after, res.plan
    if args.save_plan:
        res.save_plan(args.save_plan)
    say(args, "\n" + report.sets_table(job.groups, plan.keep))
    if any(g.frozen for g in job.groups):
        say(args, f"\nfrozen groups ({sum(1 for g in job.groups if g.frozen)}):\n" + report.frozen_table(job.groups))
    if plan.target:
        say(args, "\n" + res.target_text())
    say(args, "\n" + report.table(
        [["params", report.human(b["params"]), report.human(a["params"]), ratio(a["params"], b["params"])],
         ["MACs (batch 1)", report.human(b["macs"]), report.human(a["macs"]), ratio(a["macs"], b["macs"])]],
        ["", "before", "after", "ratio"]))
    if res.oracle:
        say(args, "\n" + report.oracle_table(res.oracle))
    if args.recover:
        say(args, "\n" + res.recovery_text())
    if res.latency:
        say(args, "\n" + api.bench_table(res.latency))
    if args.report:
        res.write_report(args.report)
    if res.failed:
        raise Failed(f"oracle failed; model written to {out}")
    speed = f", speed-up {res.speedup:.2f}x (efficiency {res.efficiency:.2f})" if res.latency else ""
    return f"{res.removed} channels removed in {len(plan.keep)} groups, MACs {ratio(a['macs'], b['macs'])}{speed} -> {out}"


def ratio(after: int, before: int) -> str:
    return f"{after / before:.3f}x" if before else "n/a (nothing counted)"

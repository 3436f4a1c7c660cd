"""Command line: ``onnxprune MODEL --ratios R -o OUT`` and subcommands.

    onnxprune                                   prune the built-in default model
    onnxprune MODEL --ratios R -o OUT [--report REP] [--verify]
    onnxprune analyze MODEL [--json F]
    onnxprune verify MODEL --ratios R
    onnxprune export timm:NAME -o OUT [--exporter dynamo|legacy] [--opset N] [--dynamic-batch] [--checkpoint F]
    onnxprune bench MODEL [MORE ...] [--batch N] [--provider cpu|cuda|tensorrt] [--threads N] [--warmup N] [--runs N] [--json F] [--plot F.png]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib import resources

from .errors import UserError

SUBCOMMANDS = ("analyze", "verify", "export", "prune", "bench", "finetune", "data", "gohsp")
log = logging.getLogger("onnxprune")


def default_model() -> str:
    return str(resources.files("onnxprune") / "data" / "default_resnet.onnx")


def default_ratios() -> str:
    return str(resources.files("onnxprune") / "data" / "default_ratios.json")


def _shape_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="fix an input's dims (repeatable), e.g. images:1,3,640,640; a name keeps a dim symbolic "
                   "(N,3,640,640); needed when a dim other than the batch is dynamic")


def _shapes(args, ratios=None) -> dict:
    from .io import parse_input_shapes

    return {**(ratios.input_shapes if ratios is not None else {}), **parse_input_shapes(getattr(args, "input_shape", []))}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="only the verdict line")


def _prune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxprune", description="Structural pruning of ONNX models.",
                                epilog="subcommands: analyze, verify, export, bench, finetune, gohsp, data (onnxprune SUBCOMMAND -h)")
    p.add_argument("model", nargs="?", help="input .onnx (default: the built-in demo ResNet)")
    p.add_argument("--ratios", help="ratios.json path or inline JSON (default: built-in demo ratios)")
    p.add_argument("-o", "--output", help="pruned model path (default: MODEL stem + '.pruned.onnx' in the current directory)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--verify", action="store_true", help="run the zero-contribution oracle on this plan")
    p.add_argument("--recover", nargs="?", const="ridge", choices=["bias", "stats", "ridge"],
                   help="closed-form recovery from --calib data, no labels: re-fit every layer that reads pruned channels "
                   "(ridge, the default), match per-channel output statistics (stats), or fold the removed channels' mean "
                   "into the bias (bias)")
    p.add_argument("--plan", help="replay a plan file saved by --save-plan (instead of --ratios)")
    p.add_argument("--save-plan", help="write the plan (groups by member names, kept indices) as JSON here")
    _shape_opt(p)
    _calib_opts(p)
    p.add_argument("--bench", action="store_true", help="measure ORT latency before and after (interleaved; see 'onnxprune bench')")
    _bench_opts(p, runs=30, warmup=5)
    _common(p)
    return p


def _calib_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", help="calibration data for data-driven importance: DIR (ImageFolder), FILE.npy/.npz, or 'synthetic'")
    p.add_argument("--calib-batches", type=int, default=4, help="calibration batches (default 4)")
    p.add_argument("--calib-batch-size", type=int, default=32, help="samples per batch (default 32; a static-batch model uses its own)")


def _calib(args, job):
    if not getattr(args, "calib", None):
        return None
    from .importance.calib import load

    return load(args.calib, job.skeleton(), args.calib_batches, args.calib_batch_size)


def _bench_opts(p: argparse.ArgumentParser, runs: int = 100, warmup: int = 20) -> None:
    p.add_argument("--batch", type=int, help="batch size for timing (default: 8 on CPU, 256 on GPU)")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    p.add_argument("--threads", type=int, help="ORT intra-op threads (default: the number of CPU cores)")
    p.add_argument("--warmup", type=int, default=warmup, help=f"warm-up runs per model (default {warmup})")
    p.add_argument("--runs", type=int, default=runs, help=f"timed runs per model (default {runs})")


def _sub_parsers() -> dict[str, argparse.ArgumentParser]:
    a = argparse.ArgumentParser(prog="onnxprune analyze", description="List groups, isomorphic sets and what is frozen.")
    a.add_argument("model")
    a.add_argument("--json", help="write groups as JSON here")
    _shape_opt(a)
    a.add_argument("--members", action="store_true", help="print every group with its members")
    a.add_argument("--scores", action="store_true", help="score every group and summarise each isomorphic set")
    a.add_argument("--importance", default="l2", help="criterion for --scores, or JSON {kind: criterion} (default l2)")
    a.add_argument("--plot", help="with --scores: draw the score distribution of each isomorphic set (PNG)")
    _calib_opts(a)
    _common(a)
    v = argparse.ArgumentParser(prog="onnxprune verify", description="Zero-contribution oracle on your model and plan.")
    v.add_argument("model")
    v.add_argument("--ratios", help="ratios.json or inline JSON: checks the plan a prune run would make")
    v.add_argument("--plan", help="a plan file saved by --save-plan")
    _shape_opt(v)
    _calib_opts(v)
    v.add_argument("--no-per-set", action="store_true", help="one combined check only")
    v.add_argument("--json", help="write the rows as JSON here")
    _common(v)
    e = argparse.ArgumentParser(prog="onnxprune export", description="Export a timm model to ONNX (random init unless --checkpoint).")
    e.add_argument("name", help="timm:<model name>")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    e.add_argument("--opset", type=int)
    e.add_argument("--dynamic-batch", action="store_true")
    e.add_argument("--checkpoint")
    e.add_argument("--img-size", type=int, help="input size (transformers are built for it: position embeddings, windows)")
    e.add_argument("--num-classes", type=int, help="classifier width (default: the model's, 1000 for most timm models)")
    e.add_argument("--batch", type=int, help="static batch size of the export (default 1; ignored shape-wise with --dynamic-batch)")
    _common(e)
    b = argparse.ArgumentParser(prog="onnxprune bench", description="ORT latency, throughput, params, MACs and speed-up "
                                "against the first model; runs are interleaved across models.")
    b.add_argument("models", nargs="+")
    _bench_opts(b)
    b.add_argument("--json", help="write the rows (with every timing) as JSON here")
    b.add_argument("--plot", help="write a latency-vs-MACs plot (PNG) here")
    _shape_opt(b)
    _common(b)
    f = argparse.ArgumentParser(prog="onnxprune finetune", description="Fine-tune a (pruned) ONNX model in PyTorch via onnx2torch "
                                "and write the trained tensors back into the same graph.")
    f.add_argument("model", help="the ONNX model to train (e.g. the pruned one)")
    f.add_argument("--data", required=True, help="ImageFolder root with train/<class>/ and val/<class>/ (labelled), or, with "
                   "--teacher, unlabelled data: a folder of images (any layout) or FILE.npy / FILE.npz (one array per input name)")
    f.add_argument("-o", "--output", required=True)
    f.add_argument("--teacher", help="unpruned ONNX model: distil from its logits")
    f.add_argument("--recipe", help="deit | convnext | resnet | mobilenet | swin (the Isomorphic Pruning paper's training recipes) | "
                   "quick | distill (default: quick with labels, distill without: lr 1e-4, no weight decay)")
    f.add_argument("--epochs", type=int)
    f.add_argument("--lr", type=float, help="learning rate (default: the recipe's base lr scaled by batch size)")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--workers", type=int, default=2)
    f.add_argument("--resume", nargs="?", const="auto", help="resume from OUTPUT.ckpt (or the given checkpoint)")
    f.add_argument("--kd-alpha", type=float, default=0.5)
    f.add_argument("--kd-temperature", type=float, default=4.0)
    f.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    f.add_argument("--keep-worse", action="store_true", help="without labels: write the trained weights even when they are "
                   "further from the teacher on the held-out samples than the input's (default: keep the input's)")
    f.add_argument("--minutes", type=float, help="train for this long (the lr schedule is fitted to it; --epochs then unset)")
    f.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--bn-reinsert", choices=["auto", "on", "off"], default="auto",
                   help="train with BatchNorm re-inserted after convolutions, folded back on write-back "
                   "(auto: for CNNs whose BatchNorm was folded away)")
    _common(f)
    d = argparse.ArgumentParser(prog="onnxprune data", description="Generate datasets.")
    d.add_argument("kind", choices=["synthetic"])
    d.add_argument("output")
    d.add_argument("--classes", type=int, default=10)
    d.add_argument("--train", type=int, default=300, help="training images per class")
    d.add_argument("--val", type=int, default=60, help="validation images per class")
    d.add_argument("--size", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    _common(d)
    h = argparse.ArgumentParser(prog="onnxprune gohsp", description="GOHSP (Yin et al., GOHSP: A Unified Framework of Graph and Optimization-Based Heterogeneous "
                                "Structured Pruning for Vision Transformer): graph-based head ranking, ADMM soft pruning "
                                "toward head/column sparsity, hard pruning by the rewriter, fine-tuning.")
    h.add_argument("model")
    h.add_argument("--data", required=True, help="ImageFolder root with train/ and val/ (also the calibration data)")
    h.add_argument("--ratios", help="kind ratios: heads (mask), head_dim and mlp (columns)")
    h.add_argument("--plan", help="a plan file (--save-plan): its kept heads and columns are the ADMM targets")
    h.add_argument("--sparsity", type=float, help="one overall column sparsity for head_dim and mlp, distributed over "
                   "the layers by Erdos-Renyi as GOHSP does (replaces their ratios; heads still from --ratios)")
    h.add_argument("-o", "--output", required=True)
    h.add_argument("--rho", type=float, default=1e-3, help="ADMM penalty (paper: 0.001)")
    h.add_argument("--lambda", dest="lam", type=float, default=1e-2, help="weight of the masked-heads quadratic term")
    h.add_argument("--admm-epochs", type=int, default=2)
    h.add_argument("--admm-interval", type=int, help="steps between Z/U updates (default: one epoch)")
    h.add_argument("--finetune-epochs", type=int, default=1)
    h.add_argument("--lr", type=float, help="lr of the ADMM phase (default: 0.01 for 'paper', as on ImageNet; for 'quick' finetune's: 1e-3 x batch/64)")
    h.add_argument("--admm-recipe", choices=["paper", "quick"], default="paper",
                   help="ADMM-phase training: 'paper' = SGD momentum 0.9, no weight decay, cross-entropy (as in the GOHSP paper); "
                   "'quick' = finetune's quick recipe (optimiser, lr, label smoothing) with KD from --teacher")
    h.add_argument("--batch-size", type=int, default=64)
    h.add_argument("--teacher", help="distil the fine-tuning from this ONNX model")
    h.add_argument("--max-steps", type=int)
    h.add_argument("--workers", type=int, default=2)
    h.add_argument("--plot", help="plot loss, ||(1-M)W||, ||W-Z|| and accuracy per ADMM epoch (PNG)")
    _common(h)
    return {"analyze": a, "verify": v, "export": e, "bench": b, "finetune": f, "data": d, "gohsp": h}


def _setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # root stays at WARNING so that other libraries' INFO chatter (the torch exporter's
    # optimiser logs every initializer it deduplicates) does not drown our progress lines
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(level)


def _say(args, text: str = "") -> None:
    if not getattr(args, "quiet", False):
        print(text)


def cmd_prune(args) -> str:
    from . import api, report
    from .pipeline import Job
    from .plan import Ratios
    from .verify import oracle

    model = args.model or default_model()
    if args.plan and args.ratios:
        raise UserError("give --ratios or --plan, not both")
    ratios_src = args.ratios or (default_ratios() if not args.model and not args.plan else None)
    if ratios_src is None and not args.plan:
        raise UserError("--ratios is required (a ratios.json file or inline JSON), or --plan to replay a saved plan")
    ratios = Ratios.load(ratios_src) if ratios_src else None
    out = args.output or os.path.basename(os.path.splitext(model)[0]) + ".pruned.onnx"
    _check_paths(model, out)
    for extra in (args.report, args.save_plan):
        if extra and os.path.abspath(extra) in (os.path.abspath(model), os.path.abspath(out)):
            raise UserError("--report / --save-plan must not be the model or output path")
    _say(args, f"analysing {model}")
    job = Job.open(model, _shapes(args, ratios))
    calib = _calib(args, job)
    if calib is not None:
        _say(args, f"calibration: {calib.source}, {len(calib.batches)} batches of {len(calib.batches[0])}")
    if args.recover and calib is None:
        raise UserError("--recover needs --calib (unlabelled inputs are enough: DIR, FILE.npy/.npz or 'synthetic')")
    if args.recover and ratios is not None:
        ratios, note = ratios.for_recovery()
        if note:
            _say(args, note)
    if args.plan:
        plan = api.load_plan(args.plan, job)
    else:
        plan = job.plan(ratios, calib)
    if not plan.keep:
        raise UserError(f"nothing to prune: {_why_nothing(job, plan)}")
    if args.save_plan:
        with open(args.save_plan, "w") as f:
            json.dump(plan.to_json(job.groups, os.path.basename(model)), f, indent=1)
    groups = job.groups
    _say(args, report.sets_table(groups, plan.keep))
    frozen = [g for g in groups if g.frozen]
    if frozen:
        _say(args, f"\nfrozen groups ({len(frozen)}):\n" + report.frozen_table(groups))
    if plan.target:
        _say(args, "\n" + _target_text(plan.target))
    b, a = job.counts(), job.counts(plan)
    _say(args, "\n" + report.table(
        [["params", report.human(b["params"]), report.human(a["params"]), _ratio(a["params"], b["params"])],
         ["MACs (batch 1)", report.human(b["macs"]), report.human(a["macs"]), _ratio(a["macs"], b["macs"])]],
        ["", "before", "after", "ratio"]))
    rows = []
    if args.verify:
        from .verify import require_checks

        rows = oracle(job, plan=plan)
        _say(args, "\n" + _oracle_table(rows))
        require_checks(rows, plan)
    t0 = time.perf_counter()
    original = job.data_proto() if args.recover else None
    job.rewrite(plan)
    recovery = []
    if args.recover:
        recovery = _recover(args, job, plan, original, calib)
    checks = job.save(out)
    res = api.PruneResult(job, plan, b, a, checks, time.perf_counter() - _T0)
    latency = []
    if args.bench:
        from .bench import bench, table

        _say(args, f"\nbenchmarking original vs pruned ({args.provider}, {args.runs} interleaved runs each) ...")
        latency = bench([model, ("pruned", out)], batch=args.batch, provider=args.provider, threads=args.threads,
                        warmup=args.warmup, runs=args.runs, progress=not args.quiet, input_shapes=_shapes(args, ratios))
        _say(args, table(latency))
    log.debug("rewrite + write + validate: %.2fs", time.perf_counter() - t0)
    if args.report:
        report.write_prune_report(args.report, job, res, model, out, ratios.to_dict() if ratios else plan.ratios_given,
                                  args.plan, oracle=rows, latency=latency, recovery=recovery)
    if any(r.status == "FAIL" for r in rows):
        raise SystemExit(_verdict("FAILED", f"oracle failed; model written to {out}", 2))
    removed = sum(g.width - len(plan.keep[g.id]) for g in groups if g.id in plan.keep)
    speed = f", speed-up {latency[1].speedup:.2f}x" if latency else ""
    return f"{removed} channels removed in {len(plan.keep)} groups, MACs {_ratio(a['macs'], b['macs'])}{speed} -> {out}"


def _recover(args, job, plan, original, calib) -> list:
    """Closed-form recovery of the rewritten model in ``job`` (see onnxprune.recover)."""
    import onnx_ir as ir

    from . import io
    from .recover import format_rows, recover

    _say(args, f"\nrecovery ({args.recover}) from {calib.source} ...")
    rec, rows = recover(original, io.full_proto(job.model), job.ctx, plan.keep, calib, method=args.recover,
                        progress=not args.quiet)
    job.model = ir.serde.deserialize_model(rec)
    _say(args, format_rows(rows))
    return rows


def _why_nothing(job, plan) -> str:
    """One line: why a plan removes nothing."""
    live = [g for g in job.groups if not g.frozen]
    parts = []
    if not job.groups:
        parts.append("no prunable channel group was found")
    elif not live:
        reasons = sorted({g.frozen[0].split(" at ")[0] for g in job.groups if g.frozen})
        parts.append(f"all {len(job.groups)} groups are frozen ({'; '.join(reasons[:3])})")
    elif all(plan.ratios.get(g.id, (0,))[0] <= 0 or g.id in plan.skipped for g in live):
        parts.append(f"the ratios remove nothing from the {len(live)} prunable groups")
    else:
        parts.append(f"the ratios round to zero channels in the {len(live)} prunable groups")
    if job.ctx.unhandled:
        ops = sorted(job.ctx.unhandled.items(), key=lambda kv: -kv[1])
        parts.append("ops without a rule: " + ", ".join(f"{op} x{n}" for op, n in ops[:6]))
    return "; ".join(parts)


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.3f}x" if before else "n/a (nothing counted)"


def _target_text(t: dict) -> str:
    from .report import human

    used = t["ratios_used"]
    parts = [f"default {used['default']:.4f}"] if used.get("default") else []
    for key in ("kinds", "sets", "layers"):
        parts += [f"{key}[{k}] {v:.4f}" for k, v in used.get(key, {}).items()]
    return (f"target_{t['metric']} {t['requested']}: {human(t['target'])} wanted, {human(t['achieved'])} reached "
            f"({100 * t['error']:+.2f}%), ratios x{t['scale']:.4f}: {', '.join(parts) or 'none'}")


def _oracle_table(rows) -> str:
    from .report import table

    return "zero-contribution oracle (max relative error, tolerance 1e-4):\n" + table(
        [[r.scope, r.kind, r.groups, r.removed, "-" if r.max_rel_err is None else f"{r.max_rel_err:.2e}", r.status] for r in rows],
        ["set", "kind", "groups", "removed", "max rel err", "status"])


def cmd_analyze(args) -> str:
    from . import report

    from .pipeline import Job

    a = Job.open(args.model, _shapes(args))
    _say(args, report.sets_table(a.groups))
    scores = None
    if args.scores or args.plot:
        from .plan import Ratios

        imp = json.loads(args.importance) if args.importance.lstrip().startswith("{") else args.importance
        r = Ratios.from_dict({"importance": imp})
        scores = a.scores(r, _calib(args, a))
        _say(args, "\nimportance per isomorphic set:\n" + report.scores_table(a.groups, scores))
        if args.plot:
            report.plot_scores(a.groups, scores, args.plot)
    _say(args, "\nfrozen groups:\n" + report.frozen_table(a.groups))
    if args.members:
        for g in a.groups:
            _say(args, f"\ngroup {g.id} [{g.kind}] width {g.width} set {g.set_name or '-'}")
            for m in g.tensors:
                _say(args, f"   {m.role:5s} {m.node.op_type:12s} {m.value.name} axis {m.axis}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.groups_json(a.groups, scores=scores), f, indent=1)
    n = sum(1 for g in a.groups if not g.frozen)
    return f"{n} prunable groups in {len(a.sets)} isomorphic sets, {len(a.groups) - n} frozen"


def cmd_verify(args) -> str:
    from . import api
    from .pipeline import Job
    from .plan import Ratios
    from .verify import oracle, require_checks

    if bool(args.ratios) == bool(args.plan):
        raise UserError("give --ratios (the plan a prune run would make) or --plan (a saved plan), one of them")
    if not os.path.isfile(args.model):
        raise UserError(f"no such model file: {args.model}")
    ratios = Ratios.load(args.ratios) if args.ratios else None
    job = Job.open(args.model, _shapes(args, ratios))
    if args.plan:
        plan = api.load_plan(args.plan, job)
    else:
        plan = job.plan(ratios, _calib(args, job))
    rows = oracle(job, plan=plan, per_set=not args.no_per_set)
    _say(args, _oracle_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=1)
    require_checks(rows, plan)
    tested = [r for r in rows if r.max_rel_err is not None]
    if any(r.status == "FAIL" for r in rows):
        raise SystemExit(_verdict("FAILED", "oracle mismatch", 2))
    worst = max((r.max_rel_err for r in tested), default=0.0)
    return f"{len(tested)} checks, max relative error {worst:.2e}"


def cmd_export(args) -> str:
    from .export import export_timm

    export_timm(args.name, args.output, args.exporter, args.opset, args.dynamic_batch, args.checkpoint, args.img_size, batch=args.batch, num_classes=args.num_classes)
    return f"exported {args.name} -> {args.output}"


def cmd_bench(args) -> str:
    from .bench import bench, plot, table

    for m in args.models:
        if not os.path.isfile(m):
            raise UserError(f"no such model file: {m}")
    rows = bench(args.models, batch=args.batch, provider=args.provider, threads=args.threads,
                 warmup=args.warmup, runs=args.runs, progress=not args.quiet, input_shapes=_shapes(args))
    _say(args, table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict(with_times=True) for r in rows], f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    best = max(rows, key=lambda r: r.speedup)
    return f"{len(rows)} models, {rows[0].provider} batch {rows[0].batch}, best speed-up {best.speedup:.2f}x ({best.name})"


def _check_paths(model: str, output: str, *other_inputs) -> None:
    if not os.path.isfile(model):
        raise UserError(f"model file not found: {model}")
    if os.path.abspath(output) in {os.path.abspath(p) for p in (model, *other_inputs) if p}:
        raise UserError("output path equals an input path; onnxprune never overwrites its input")


def cmd_finetune(args) -> str:
    try:
        from .finetune.train import Options, finetune
    except ImportError as e:
        raise UserError(f"finetune needs torch, timm and onnx2torch: pip install 'onnxprune[finetune]' ({e})") from None
    _check_paths(args.model, args.output, args.teacher)
    opts = Options(data=args.data, output=args.output, teacher=args.teacher, recipe=args.recipe, epochs=args.epochs, lr=args.lr,
                   batch_size=args.batch_size, workers=args.workers, resume=args.resume, kd_alpha=args.kd_alpha,
                   kd_temperature=args.kd_temperature, max_steps=args.max_steps, minutes=args.minutes, keep_worse=args.keep_worse, device=args.device, seed=args.seed,
                   progress=not args.quiet, bn_reinsert=args.bn_reinsert)
    r = finetune(args.model, opts)
    if "teacher_after" in r:
        b, a = r["teacher_before"], r["teacher_after"]
        what = (f"agreement with the teacher {b['agreement']:.1f}% -> {a['agreement']:.1f}%, KL {b['kl']:.4f} -> {a['kl']:.4f}"
                if "agreement" in a else "output nMSE " + ", ".join(f"{k} {b['outputs'][k]['nmse']:.4f} -> {v['nmse']:.4f}"
                                                                    for k, v in a["outputs"].items()))
        kept = f"; {r['kept_input']}" if r.get("kept_input") else ""
        return f"{r['steps']} steps in {r['train_seconds']:.0f}s (no labels), {what}{kept} -> {args.output}"
    if "top1_after" not in r:
        return f"worker finished ({r['steps']} steps)"
    teacher = f", teacher {r['top1_teacher']:.1f}%" if "top1_teacher" in r else ""
    return (f"{r['steps']} steps in {r['train_seconds']:.0f}s, top-1 {r['top1_before']:.1f}% -> {r['top1_after']:.1f}%{teacher} "
            f"-> {args.output}")


def cmd_gohsp(args) -> str:
    try:
        from .finetune.admm import GohspOptions, gohsp, plot_history
    except ImportError as e:
        raise UserError(f"gohsp needs torch, timm and onnx2torch: pip install 'onnxprune[finetune]' ({e})") from None
    from .plan import Ratios

    _check_paths(args.model, args.output, args.teacher)
    if args.ratios is None and args.sparsity is None and args.plan is None:
        raise UserError("gohsp needs --ratios (heads, head_dim, mlp), --sparsity, or --plan")
    text = args.ratios or "{}"
    if not text.lstrip().startswith("{"):
        with open(text) as fh:
            text = fh.read()
    rd = json.loads(text)
    Ratios.from_dict(rd)  # validate
    r = gohsp(args.model, GohspOptions(data=args.data, output=args.output, ratios=rd, rho=args.rho, lam=args.lam,
                                       admm_epochs=args.admm_epochs, finetune_epochs=args.finetune_epochs,
                                       admm_interval=args.admm_interval, lr=args.lr, batch_size=args.batch_size,
                                       teacher=args.teacher, max_steps=args.max_steps, workers=args.workers, progress=not args.quiet,
                                       sparsity=args.sparsity, admm_recipe=args.admm_recipe, plan=args.plan))
    if args.plot:
        plot_history(r["history"], args.plot, f"GOHSP rho={args.rho} lambda={args.lam}")
    h0, h1 = r["history"][0], r["history"][-1]
    return (f"{r['admm_steps']} ADMM steps: ||(1-M)W|| {h0['masked_norm']:.3g} -> {h1['masked_norm']:.3g}, soft vs hard "
            f"{r['soft_vs_hard_max_rel']:.2e}, top-1 soft {r['top1_soft']:.1f}% hard {r['top1_hard']:.1f}% final {r['top1_final']:.1f}%, "
            f"MACs {r['macs']['after'] / r['macs']['before']:.3f}x -> {args.output}")


def cmd_data(args) -> str:
    from .finetune.data import make_synthetic

    m = make_synthetic(args.output, args.classes, args.train, args.val, args.size, args.seed, progress=not args.quiet)
    return f"{m['classes']} classes, {m['train']} train / {m['val']} val images of {m['size']}px ({m['fonts']} fonts) -> {args.output}"


def _verdict(status: str, what: str, code: int = 0) -> int:
    print(f"{status} | Runtime: {time.perf_counter() - _T0:.1f}s | {what} | Command: onnxprune {' '.join(sys.argv[1:])}".rstrip())
    return code


_T0 = time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    global _T0
    _T0 = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        sub = argv.pop(0)
        parser = _prune_parser() if sub == "prune" else _sub_parsers()[sub]
        fn = {"analyze": cmd_analyze, "verify": cmd_verify, "export": cmd_export, "prune": cmd_prune, "bench": cmd_bench,
              "finetune": cmd_finetune, "data": cmd_data, "gohsp": cmd_gohsp}[sub]
    else:
        parser, fn = _prune_parser(), cmd_prune
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        msg = fn(args)
    except UserError as e:
        print(f"onnxprune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # never a traceback for a file that loads: one line, exit 1 (-v shows it)
        if args.verbose:
            log.exception("internal error")
        text = " ".join(str(e).split())[:400]
        print(f"onnxprune: error: {type(e).__name__}: {text} (this is a bug in onnxprune; -v shows where)", file=sys.stderr)
        return 1
    return _verdict("PASSED", msg)


if __name__ == "__main__":
    raise SystemExit(main())

"""``finetune``, ``gohsp`` and ``data``: training in PyTorch (needs the ``finetune`` extra)."""
from __future__ import annotations

import json

from onnxprune.cli.common import check_paths
from onnxprune.errors import UserError


def cmd_finetune(args) -> str:
    try:
        from onnxprune.torchbridge.train import Options, finetune
    except ImportError as e:
        raise UserError(f"finetune needs torch, timm and onnx2torch: pip install 'onnxprune[finetune]' ({e})") from None
    check_paths(args.model, args.output, args.teacher)
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
        from onnxprune.methods.gohsp import GohspOptions, gohsp, plot_history
    except ImportError as e:
        raise UserError(f"gohsp needs torch, timm and onnx2torch: pip install 'onnxprune[finetune]' ({e})") from None
    from onnxprune.plan import Ratios

    check_paths(args.model, args.output, args.teacher)
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
    from onnxprune.torchbridge.data import make_synthetic

    m = make_synthetic(args.output, args.classes, args.train, args.val, args.size, args.seed, progress=not args.quiet)
    return f"{m['classes']} classes, {m['train']} train / {m['val']} val images of {m['size']}px ({m['fonts']} fonts) -> {args.output}"

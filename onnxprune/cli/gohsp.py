"""``onnxprune gohsp``: GOHSP pruning of a vision transformer, ADMM then fine-tuning (needs the ``finetune`` extra)."""
from __future__ import annotations

import argparse

from onnxprune.cli.common import check_paths, common
from onnxprune.errors import UserError

NAME = "gohsp"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxprune gohsp", description="GOHSP (Yin et al., GOHSP: A Unified Framework of Graph and Optimization-Based Heterogeneous "
                                "Structured Pruning for Vision Transformer): graph-based head ranking, ADMM soft pruning "
                                "toward head/column sparsity, hard pruning by the rewriter, fine-tuning.")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/ (also the calibration data)")
    p.add_argument("--data-norm", metavar="NORM", help="how the model expects the pixels of --data images: imagenet "
                   "(the default), inception, unit, raw or MEAN,MEAN,MEAN/STD,STD,STD (as --calib-norm)")
    p.add_argument("--ratios", help="kind ratios: heads (mask), head_dim and mlp (columns)")
    p.add_argument("--plan", help="a plan file (--save-plan): its kept heads and columns are the ADMM targets")
    p.add_argument("--sparsity", type=float, help="one overall column sparsity for head_dim and mlp, distributed over "
                   "the layers by Erdos-Renyi as GOHSP does (replaces their ratios; heads still from --ratios)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--rho", type=float, default=1e-3, help="ADMM penalty (paper: 0.001)")
    p.add_argument("--lambda", dest="lam", type=float, default=1e-2, help="weight of the masked-heads quadratic term")
    p.add_argument("--admm-epochs", type=int, default=2)
    p.add_argument("--admm-interval", type=int, help="steps between Z/U updates (default: one epoch)")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, help="lr of the ADMM phase (default: 0.01 for 'paper', as on ImageNet; for 'quick' finetune's: 1e-3 x batch/64)")
    p.add_argument("--admm-recipe", choices=["paper", "quick"], default="paper",
                   help="ADMM-phase training: 'paper' = SGD momentum 0.9, no weight decay, cross-entropy (as in the GOHSP paper); "
                   "'quick' = finetune's quick recipe (optimiser, lr, label smoothing) with KD from --teacher")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--teacher", help="distil the fine-tuning from this ONNX model")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--plot", help="plot loss, ||(1-M)W||, ||W-Z|| and accuracy per ADMM epoch (PNG)")
    common(p)
    return p


def run(args) -> str:
    try:
        from onnxprune.methods.gohsp import GohspOptions, gohsp, plot_history
    except ImportError as e:
        raise UserError(f"gohsp needs torch, timm and onnx2torch: pip install 'onnxprune[finetune]' ({e})") from None
    from onnxprune import api

    check_paths(args.model, args.output, args.teacher)
    if args.ratios is None and args.sparsity is None and args.plan is None:
        raise UserError("gohsp needs --ratios (heads, head_dim, mlp), --sparsity, or --plan")
    rd = api.read_json(args.ratios or "{}", "ratios")  # a file or inline JSON; a bad one is the user's error
    api.load_ratios(rd)  # validate
    r = gohsp(args.model, GohspOptions(data=args.data, output=args.output, ratios=rd, rho=args.rho, lam=args.lam,
                                       admm_epochs=args.admm_epochs, finetune_epochs=args.finetune_epochs,
                                       admm_interval=args.admm_interval, lr=args.lr, batch_size=args.batch_size,
                                       teacher=args.teacher, max_steps=args.max_steps, workers=args.workers, progress=not args.quiet,
                                       sparsity=args.sparsity, admm_recipe=args.admm_recipe, plan=args.plan,
                                       norm=args.data_norm))
    if args.plot:
        plot_history(r["history"], args.plot, f"GOHSP rho={args.rho} lambda={args.lam}")
    h0, h1 = r["history"][0], r["history"][-1]
    return (f"{r['admm_steps']} ADMM steps: ||(1-M)W|| {h0['masked_norm']:.3g} -> {h1['masked_norm']:.3g}, soft vs hard "
            f"{r['soft_vs_hard_max_rel']:.2e}, top-1 soft {r['top1_soft']:.1f}% hard {r['top1_hard']:.1f}% final {r['top1_final']:.1f}%, "
            f"MACs {r['macs']['after'] / r['macs']['before']:.3f}x -> {args.output}")

"""``onnxprune finetune``: train an ONNX model in PyTorch and write the tensors back (needs the ``finetune`` extra)."""
from __future__ import annotations

import argparse

from onnxprune.cli.common import check_paths, common

NAME = "finetune"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxprune finetune", description="Fine-tune a (pruned) ONNX model in PyTorch via onnx2torch "
                                "and write the trained tensors back into the same graph.")
    p.add_argument("model", help="the ONNX model to train (e.g. the pruned one)")
    p.add_argument("--data", required=True, help="ImageFolder root with train/<class>/ and val/<class>/ (labelled), or, with "
                   "--teacher, unlabelled data: a folder of images (any layout) or FILE.npy / FILE.npz (one array per input name)")
    p.add_argument("--data-norm", metavar="NORM",
                   help="how the model expects the pixels of --data images: imagenet (the default), inception ([-1, 1]), "
                   "unit ([0, 1]), raw ([0, 255]) or MEAN,MEAN,MEAN/STD,STD,STD on pixels in [0, 1] (as --calib-norm)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--teacher", help="unpruned ONNX model: distil from its logits")
    p.add_argument("--recipe", help="deit | convnext | resnet | mobilenet | swin (the Isomorphic Pruning paper's training recipes) | "
                   "quick | distill (default: quick with labels, distill without: lr 1e-4, no weight decay)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's base lr scaled by batch size)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resume", nargs="?", const="auto", help="resume from OUTPUT.ckpt (or the given checkpoint)")
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--keep-worse", action="store_true", help="without labels: write the trained weights even when they are "
                   "further from the teacher on the held-out samples than the input's (default: keep the input's)")
    p.add_argument("--minutes", type=float, help="train for this long (the lr schedule is fitted to it; --epochs then unset)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bn-reinsert", choices=["auto", "on", "off"], default="auto",
                   help="train with BatchNorm re-inserted after convolutions, folded back on write-back "
                   "(auto: with labels, for CNNs whose BatchNorm was folded away; label-free distillation keeps the "
                   "folded statistics)")
    p.add_argument("--mix", type=float, default=0.0, metavar="ALPHA",
                   help="without labels: train on mixtures of two images of a batch (weight ~ Beta(ALPHA, ALPHA)); "
                   "the teacher sees the same mixtures (default 0: off)")
    p.add_argument("--feature-weight", type=float, default=1.0, metavar="W",
                   help="without labels: also match the outputs of the layers that lost input channels to the teacher's "
                   "(normalised MSE, weight W; 0: logits/outputs only)")
    common(p)
    return p


def run(args) -> str:
    from onnxprune import api

    check_paths(args.model, args.output, args.teacher)
    r = api.finetune(args.model, data=args.data, output=args.output, teacher=args.teacher, recipe=args.recipe, epochs=args.epochs, lr=args.lr,
                   batch_size=args.batch_size, workers=args.workers, resume=args.resume, kd_alpha=args.kd_alpha,
                   kd_temperature=args.kd_temperature, max_steps=args.max_steps, minutes=args.minutes, keep_worse=args.keep_worse, device=args.device, seed=args.seed,
                   progress=not args.quiet, bn_reinsert=args.bn_reinsert, mix=args.mix,
                   feature_weight=args.feature_weight, norm=args.data_norm)
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

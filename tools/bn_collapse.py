"""The failing case, small: fine-tuning a BN-folded CNN pruned to chance.

    python tools/bn_collapse.py [--train-epochs 8] [--ft-epochs 3] [--per-class 100] [--arms off,off-lr1e-4,auto]

Synthetic glyphs (10 classes, 32 px; ``--per-class`` training images per class,
50 val), a timm resnet18 trained in plain PyTorch, exported with ``onnxprune
export --checkpoint`` (BatchNorm folded into the convolutions), pruned with
``{"kinds": {"channels": 0.6, "embed": 0.4}}``, then ``onnxprune finetune
--teacher`` (recipe quick, default lr) with and without BatchNorm re-insertion
(``--bn-reinsert off|auto``). Writes tools/results/bn_collapse.md.

    python tools/bn_collapse.py --reference [--arms off,auto]

runs the same arms on the glyph reference CNN (``models/ref_cnn.onnx``, BN-folded,
on its own regenerated 64 px glyph set, 300 train / 60 val images per class):
the numbers the README quotes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from common import cli, md, one_cycle, train_classifier, write_results  # noqa: E402

RATIOS = '{"kinds": {"channels": 0.6, "embed": 0.4}}'


def subset(src: str, dst: str, per_class: int) -> None:
    """``dst``: the first ``per_class`` training images per class of ``src`` (symlinks), and all of val."""
    for split in ("train", "val"):
        for c in sorted(os.listdir(os.path.join(src, split))):
            os.makedirs(os.path.join(dst, split, c), exist_ok=True)
            files = sorted(os.listdir(os.path.join(src, split, c)))
            for f in files[:per_class] if split == "train" else files:
                os.symlink(os.path.join(src, split, c, f), os.path.join(dst, split, c, f))
    with open(os.path.join(src, "onnxprune_dataset.json")) as f, open(os.path.join(dst, "onnxprune_dataset.json"), "w") as g:
        g.write(f.read())


def train_torch(data: str, epochs: int, out: str) -> float:
    import timm
    import torch

    from onnxprune.torchbridge.data import image_folder
    from onnxprune.torchbridge.recipes import get

    torch.manual_seed(0)
    m = timm.create_model("resnet18", num_classes=10)
    ds = image_folder(data, "train", 32, True, get("quick", hflip=0.0))
    secs = train_classifier(m, ds, epochs=epochs, lr=2e-3, batch=64, lr_at=one_cycle(2e-3))
    torch.save(m.state_dict(), out)
    return secs


ARMS = {  # name -> extra finetune arguments
    "off": ["--bn-reinsert", "off"],
    "off-lr1e-4": ["--bn-reinsert", "off", "--lr", "1e-4"],
    "off-nokd": ["--bn-reinsert", "off", "--kd-alpha", "0"],
    "auto": ["--bn-reinsert", "auto"],
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-epochs", type=int, default=8)
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--arms", default="off,off-lr1e-4,auto")
    ap.add_argument("--reference", action="store_true", help="the glyph reference CNN instead of a resnet18 trained here")
    ap.add_argument("--work", help="keep files here (reuses a trained checkpoint found there)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bn_collapse.md"))
    return ap


def main() -> None:
    args = parser().parse_args()
    from onnxprune.torchbridge.train import evaluate_onnx

    tmp = args.work or tempfile.mkdtemp()
    os.makedirs(tmp, exist_ok=True)
    train_s = None
    if args.reference:
        from train_reference import glyph_data

        size, data, orig = 64, glyph_data(None, tmp), os.path.join(HERE, "..", "models", "ref_cnn.onnx")
    else:
        size, full, data = 32, os.path.join(tmp, "glyphs32"), os.path.join(tmp, "glyphs32_sub")
        if not os.path.isdir(full):
            cli("data", "synthetic", full, "--classes", "10", "--train", str(max(args.per_class, 1)), "--val", "50", "--size", "32", "-q")
        if not os.path.isdir(data):
            subset(full, data, args.per_class)
        ckpt, orig = os.path.join(tmp, "r18.pt"), os.path.join(tmp, "r18.onnx")
        if not os.path.exists(ckpt):
            train_s = train_torch(data, args.train_epochs, ckpt)
        cli("export", "timm:resnet18", "--img-size", "32", "--num-classes", "10", "--dynamic-batch", "--checkpoint", ckpt, "-o", orig, "-q")
    pruned = os.path.join(tmp, "pruned.onnx")
    print(cli(orig, "--ratios", RATIOS, "-o", pruned, "-q"))
    acc0, acc1 = evaluate_onnx(orig, data, size), evaluate_onnx(pruned, data, size)
    rows, raw = [], {"trained": acc0, "pruned": acc1, "train_seconds": train_s, "arms": {}}
    for arm in args.arms.split(","):
        out = os.path.join(tmp, f"tuned_{arm}.onnx")
        t0 = time.perf_counter()
        line = cli("finetune", pruned, "--data", data, "--teacher", orig, "-o", out, "--recipe", "quick", "--epochs",
                   str(args.ft_epochs), "--batch-size", "64", "--workers", "1", "-q", *ARMS[arm])
        secs = time.perf_counter() - t0
        rep = json.load(open(os.path.splitext(out)[0] + ".finetune.json"))
        acc2 = rep["top1_after"]
        losses = [round(h["loss"], 3) for h in rep["history"]]
        rows.append([arm, " ".join(ARMS[arm]), f"{acc0:.1f}", f"{acc1:.1f}", f"{acc2:.1f}",
                     f"{(acc2 - acc1) / max(acc0 - acc1, 1e-9):.0%}", " / ".join(map(str, losses)), f"{secs:.0f}s"])
        raw["arms"][arm] = {"top1": acc2, "losses": losses, "seconds": secs, "lr": rep["lr"], "bn": rep["bn_reinserted"], "line": line,
                           "device": rep["device"], "train_seconds": rep["train_seconds"]}
        print(rows[-1], flush=True)
    head = ["arm", "finetune options", "top-1 trained", "top-1 pruned", "top-1 after", "drop recovered", "loss per epoch", "wall"]
    text = md(head, rows)
    what = ("the glyph reference CNN (models/ref_cnn.onnx), synthetic glyphs 10 classes at 64 px, 3000 train / 600 val images"
            if args.reference else f"timm resnet18, synthetic glyphs 10 classes at 32 px, {10 * args.per_class} train / 500 val "
            f"images; trained {args.train_epochs} epochs in PyTorch")
    text += (f"\n\n{what}; BN folded by export; pruned {RATIOS}; "
             f"`onnxprune finetune --teacher --recipe quick --epochs {args.ft_epochs} --batch-size 64`; trained on "
             f"{', '.join(sorted({a['device'] for a in raw['arms'].values()}))}; CPU {os.cpu_count()} cores\n")
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

"""README check: the whole workflow on data the tool has never seen.

    python tools/unseen_data.py [--epochs 40] [--ft-epochs 3] [--model resnet18]

An ImageFolder that has nothing to do with the synthetic glyph set: four
classes of filled shapes (circle, square, triangle, cross) drawn with PIL at
random sizes, positions and colours on images of 40-90 px, saved as a mix of
PNG and JPEG, a fifth of them greyscale. A timm model is trained on it in
plain PyTorch (as a user would), exported with ``onnxprune export
--checkpoint``, pruned to 50% MACs with the CLI, then ``onnxprune finetune
--teacher``; top-1 of each ONNX file in ORT. Writes
tools/results/unseen_data.md.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from common import cli, md, train_classifier, write_results  # noqa: E402

CLASSES = ["circle", "square", "triangle", "cross"]


def make_shapes(root: str, train: int = 150, val: int = 40, seed: int = 3) -> None:
    from PIL import Image, ImageDraw

    rnd = random.Random(seed)
    for split, n in (("train", train), ("val", val)):
        for c in CLASSES:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                w, h = rnd.randint(40, 90), rnd.randint(40, 90)
                bg = tuple(rnd.randint(0, 255) for _ in range(3))
                img = Image.new("RGB", (w, h), bg)
                d = ImageDraw.Draw(img)
                fg = tuple(255 - v for v in bg)
                s = rnd.randint(min(w, h) // 4, min(w, h) // 2)
                cx, cy = rnd.randint(s, w - s), rnd.randint(s, h - s)
                if c == "circle":
                    d.ellipse([cx - s, cy - s, cx + s, cy + s], fill=fg)
                elif c == "square":
                    d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fg)
                elif c == "triangle":
                    d.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=fg)
                else:
                    t = max(2, s // 3)
                    d.rectangle([cx - s, cy - t, cx + s, cy + t], fill=fg)
                    d.rectangle([cx - t, cy - s, cx + t, cy + s], fill=fg)
                if rnd.random() < 0.2:
                    img = img.convert("L")
                img.save(os.path.join(root, split, c, f"{i:04d}.{'jpg' if i % 2 else 'png'}"))


def train_torch(model_name: str, data: str, epochs: int, out: str) -> float:
    """Plain PyTorch training (constant lr), as a user would do before exporting."""
    import timm
    import torch

    from onnxprune.torchbridge.data import image_folder
    from onnxprune.torchbridge.recipes import get

    torch.manual_seed(0)
    m = timm.create_model(model_name, num_classes=len(CLASSES))
    ds = image_folder(data, "train", 64, True, get("quick"))
    secs = train_classifier(m, ds, epochs=epochs, lr=1e-3, batch=32, workers=2, every=10)
    torch.save(m.state_dict(), out)
    return secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "unseen_data.md"))
    args = ap.parse_args()
    from onnxprune.torchbridge.train import evaluate_onnx

    tmp = tempfile.mkdtemp()
    data = os.path.join(tmp, "shapes")
    make_shapes(data)
    ckpt, orig, pruned, tuned = (os.path.join(tmp, f) for f in ("m.pt", "m.onnx", "pruned.onnx", "tuned.onnx"))
    train_s = train_torch(args.model, data, args.epochs, ckpt)
    cli("export", f"timm:{args.model}", "--img-size", "64", "--num-classes", str(len(CLASSES)), "--dynamic-batch",
        "--checkpoint", ckpt, "-o", orig, "-q")
    print(cli(orig, "--ratios", '{"target_macs": "50%"}', "-o", pruned, "-q"))
    t0 = time.perf_counter()
    print(cli("finetune", pruned, "--data", data, "--teacher", orig, "-o", tuned, "--recipe", "quick",
              "--epochs", str(args.ft_epochs), "--batch-size", "32", "-q"))
    ft_s = time.perf_counter() - t0
    acc = [evaluate_onnx(f, data, 64) for f in (orig, pruned, tuned)]
    from onnxprune import io
    from onnxprune.core import metrics

    macs = [metrics.count(io.read_proto(f))["macs"] for f in (orig, pruned)]
    row = [args.model, f"{macs[1] / macs[0]:.3f}", f"{acc[0]:.1f}", f"{acc[1]:.1f}", f"{acc[2]:.1f}",
           f"{(acc[2] - acc[1]) / max(acc[0] - acc[1], 1e-9):.0%}", args.ft_epochs, f"{ft_s:.0f}s"]
    head = ["model", "MACs kept", "top-1 trained", "top-1 pruned", "top-1 fine-tuned", "drop recovered", "ft epochs", "ft wall"]
    text = md(head, [row])
    text += (f"\n\n4 classes of PIL-drawn shapes, {150 * 4} train / {40 * 4} val images of 40-90 px (PNG and JPEG, 20% greyscale), "
             f"input 64 px; trained in PyTorch for {args.epochs} epochs ({train_s:.0f}s); CPU {os.cpu_count()} cores\n")
    write_results(args.out, text, {"model": args.model, "macs": macs, "top1": acc, "ft_seconds": ft_s, "train_seconds": train_s})


if __name__ == "__main__":
    main()

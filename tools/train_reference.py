"""Train the small reference models on the synthetic glyph set and export them
to ``models/`` so importance, pruning and fine-tuning benchmarks run on trained
weights (nothing can be downloaded here).

    python tools/train_reference.py [--data DIR] [--epochs-vit 60] [--epochs-cnn 25]

* ``ref_vit``: a DeiT-Tiny-like ViT (embed 192, 3 heads of 64, MLP 768, depth 4,
  patch 8 on 64x64 inputs: 64 tokens + cls), timm ``VisionTransformer``.
  It learns slowly from 3,000 images: 48.0% top-1 after 60 epochs at lr 3e-4
  (30 epochs: 31.8%; lr 1e-3 did not learn at all; patch 16 for 60 epochs at
  lr 1e-4 reached 23%).
* ``ref_cnn``: a small ResNet (BasicBlock x [1, 1, 1, 1], widths 32/64/128/256),
  timm ``ResNet``.

Both: AdamW, one warm-up epoch then cosine, label smoothing 0.1, random-resized crop; dynamo
export with a dynamic batch. The data is ``onnxprune data synthetic`` with 10
classes, 300 train / 60 val images per class, 64 px, seed 0 (regenerated if
``--data`` is not given). Writes ``models/ref_{vit,cnn}.onnx`` and
``models/reference.json`` (accuracies, recipe, time).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402

from onnxprune.torchbridge.export import export_timm  # noqa: E402
from onnxprune.torchbridge.data import image_folder, make_synthetic  # noqa: E402
from onnxprune.torchbridge.recipes import get  # noqa: E402
from onnxprune.torchbridge.train import evaluate_onnx  # noqa: E402
from common import train_classifier, warmup_cosine  # noqa: E402

MODELS = os.path.join(HERE, "..", "models")
DATA_ARGS = dict(classes=10, train=300, val=60, size=64, seed=0)


def glyph_data(given: str | None, tmp: str) -> str:
    """The data directory: ``given``, or the reference glyph set regenerated under ``tmp``."""
    if given:
        return given
    path = os.path.join(tmp, "glyphs")
    make_synthetic(path, progress=False, **DATA_ARGS)
    return path


def build(kind: str):
    import timm
    from timm.models.resnet import BasicBlock, ResNet

    if kind == "vit":
        return timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, depth=4, num_classes=10)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, channels=(32, 64, 128, 256), stem_width=32)


def train(kind: str, data: str, epochs: int, lr: float, batch: int = 64, seed: int = 0) -> tuple:
    torch.manual_seed(seed)
    model = build(kind)
    ds = image_folder(data, "train", 64, True, get("quick", hflip=0.0))
    steps = len(ds) // batch  # one epoch of linear warm-up, then cosine
    secs = train_classifier(model, ds, epochs=epochs, lr=lr, batch=batch, workers=2, lr_at=warmup_cosine(lr, steps),
                            label_smoothing=0.1, tag=kind)
    return model.eval(), secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--epochs-vit", type=int, default=60)
    ap.add_argument("--epochs-cnn", type=int, default=25)
    ap.add_argument("--only", choices=["vit", "cnn"])
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    data = glyph_data(args.data, tempfile.mkdtemp())
    out_json = os.path.join(MODELS, "reference.json")
    summary = json.load(open(out_json)) if os.path.exists(out_json) else {}
    for kind, epochs, lr in (("cnn", args.epochs_cnn, 2e-3), ("vit", args.epochs_vit, 3e-4)):
        if args.only and kind != args.only:
            continue
        model, secs = train(kind, data, epochs, lr)
        path = os.path.join(MODELS, f"ref_{kind}.onnx")
        export_timm(kind, path, exporter="dynamo", dynamic_batch=True, model=model, img_size=64)
        acc = evaluate_onnx(path, data, 64)
        params = sum(p.numel() for p in model.parameters())
        summary[f"ref_{kind}"] = {"file": f"models/ref_{kind}.onnx", "top1_val": round(acc, 2), "params": params, "epochs": epochs,
                                  "lr": lr, "train_seconds": round(secs), "data": {"kind": "synthetic glyphs", **DATA_ARGS},
                                  "recipe": "AdamW wd 0.05, 1 epoch warm-up + cosine, label smoothing 0.1, batch 64, random-resized crop, no flip"}
        print(f"ref_{kind}: top-1 {acc:.2f}% on val, {params / 1e6:.2f}M params, {secs:.0f}s -> {path}", flush=True)
        with open(out_json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()

"""How long ``--recover`` takes against one forward pass of both models.

    python tools/recover_speed.py [--models vit_small_patch16_224,resnet50,vit_small_dense] [--images 128]
                                  [--target 0.9[,0.7]] [--photos]

For each timm model (random weights, legacy exporter, dynamic batch), with
``--images`` random calibration inputs in batches of 32: the time of one ONNX
Runtime forward pass of the original and of the pruned model over the whole
calibration set, then the closed-form recovery (``ridge``, every linear layer
after the pruning) with its time split: ORT passes (the sequential frontier:
each model runs once, level by level) and statistics + solves. The ratio
``ORT passes / (forward original + forward pruned)`` is what sequential
calibration promises to keep near 1 whatever the depth. The prune is planned
as ``--recover`` plans it (scope ``damage`` on the same inputs), so its time
includes the damage search; ``wall`` is the whole ``prune(..., recover=...)``
call (analysis, plan, rewrite, recovery, validation), what a user of
``--recover`` waits for. ``vit_small_dense`` is ViT-S/16 with a dense-map
decoder (the patch tokens as a 14x14 map, a 3x3 conv to 256 channels, ReLU,
4x bilinear upsampling, a 3x3 conv to 64, ReLU, a 1x1 conv to one output
map at 56x56 px), built here in torch and exported with the legacy exporter.
``--photos``: calibrate on ``--images`` crops of half the photos of
``tools/pretrained_recovery.py`` (its cache: scikit-image's sample photos)
instead of random inputs, and add how close each model's outputs stay to the
original's on 200 crops of the *other* photos (the mean over crops of the
Pearson correlation of the flattened outputs), pruned only (the same plan) and
after ``--recover``. Prints a table and writes tools/results/recover_speed.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from common import md, write_results  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "recover_speed")


def forward_seconds(proto, batches, threads: int) -> float:
    from onnxprune.runtime import session

    s = session(proto, threads)
    name = s.get_inputs()[0].name
    s.run(None, {name: batches[0]})  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        s.run(None, {name: b})
    return time.perf_counter() - t0


def export_dense_vit(path: str) -> None:
    """ViT-S/16 (random weights) with a small dense-map decoder, legacy export, dynamic batch."""
    import timm
    import torch
    from torch import nn

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = timm.create_model("vit_small_patch16_224", pretrained=False)
            self.dec = nn.Sequential(nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                                     nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False),
                                     nn.Conv2d(256, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 1, 1))

        def forward(self, x):
            t = self.vit.forward_features(x)[:, 1:]  # the patch tokens
            return self.dec(t.transpose(1, 2).reshape(x.shape[0], 384, 14, 14))

    torch.manual_seed(0)
    m = Dense().eval()
    torch.onnx.export(m, torch.zeros(1, 3, 224, 224), path, opset_version=17, dynamo=False, input_names=["input"],
                      output_names=["map"], dynamic_axes={"input": {0: "N"}, "map": {0: "N"}})


LOCAL_MODELS = {"vit_small_dense": export_dense_vit}  # built here, not by timm


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_small_patch16_224,resnet50")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--target", default="0.9", help="target_macs (a comma-separated list: one row each)")
    ap.add_argument("--photos", action="store_true",
                    help="calibrate on photo crops and report the Pearson correlation with the original on crops of "
                         "other photos")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "recover_speed.md"))
    ap.add_argument("--importance", help="ranks written in the ratios instead of --recover's (e.g. l2)")
    return ap


def pearson(ref: np.ndarray, got: np.ndarray) -> float:
    """The mean over samples of the Pearson correlation of the flattened outputs."""
    a, b = ref.reshape(len(ref), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return float(np.mean((a * b).sum(1) / np.sqrt(np.maximum((a * a).sum(1) * (b * b).sum(1), 1e-30))))


def outputs(proto, x: np.ndarray, threads: int) -> np.ndarray:
    from onnxprune.runtime import session

    s = session(proto, threads)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 25]})[0] for i in range(0, len(x), 25)])


def photo_split(images: int, evals: int = 200):
    """``(calibration batches, their photo of each crop, evaluation crops)``: crops of the even and of the
    odd photos of tools/pretrained_recovery.py, ImageNet-normalised."""
    from pretrained_recovery import crops, photo_files

    files = photo_files()
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    norm = lambda rgb: (rgb / 255 - mean) / std  # noqa: E731
    rng = np.random.default_rng(0)
    x, src = crops(files[0::2], images, rng, sources=True, norm=norm)
    ev = crops(files[1::2], evals, rng, norm=norm)
    return [x[i:i + 32] for i in range(0, len(x), 32)], [src[i:i + 32] for i in range(0, len(x), 32)], ev


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    import onnx

    from onnxprune import api
    from onnxprune.plan.importance.calib import Calibration

    os.makedirs(CACHE, exist_ok=True)
    threads = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    rows, raw = [], {}
    for name in args.models.split(","):
        path = os.path.join(CACHE, f"{name}.onnx")
        if not os.path.exists(path):
            if name in LOCAL_MODELS:
                LOCAL_MODELS[name](path)
            else:
                api.export_timm(name, path, exporter="legacy", dynamic_batch=True)
        if args.photos:
            batches, sources, ev = photo_split(args.images)
            calib = Calibration(batches, None, "photo crops", sources=sources)
        else:
            x = rng.standard_normal((args.images, 3, 224, 224)).astype(np.float32)
            batches = [x[i:i + 32] for i in range(0, len(x), 32)]
            calib = Calibration(batches, None, "random inputs")
        orig = onnx.load(path)
        ref = outputs(orig, ev, threads) if args.photos else None
        for target in [float(t) for t in args.target.split(",")]:
            # what --recover does: its plan (recover.plan_defaults: scope damage, its ranks), the rewrite, the re-fit
            t0 = time.perf_counter()
            ratios = {"target_macs": target, **({"importance": args.importance} if args.importance else {})}
            res = api.prune(path, ratios, calib=calib, recover="ridge")
            wall = time.perf_counter() - t0
            t_prune, t_rec = res.timings["analyse"] + res.timings["plan"], res.timings["recover"]
            stats, lrows = res.recovery_stats, res.recovery
            f_o, f_p = forward_seconds(orig, batches, threads), forward_seconds(res.proto, batches, threads)
            refit = sum(r.status == "refit" for r in lrows)
            cells = [name, f"{target:.0%}", len(lrows), stats["levels"], f"{t_prune:.1f}", f"{f_o:.1f}", f"{f_p:.1f}",
                     f"{stats['run_s']:.1f}", f"{stats['run_s'] / (f_o + f_p):.2f}", f"{stats['fit_s']:.1f}",
                     f"{t_rec:.1f}", refit, f"{wall:.0f}"]
            info = {}
            if args.photos:  # the same plan without the re-fit, then both against the original on the other photos
                pruned = api.prune(path, plan=res.plan_json).proto
                info = dict(pearson_pruned=pearson(ref, outputs(pruned, ev, threads)),
                            pearson_recovered=pearson(ref, outputs(res.proto, ev, threads)))
                cells.append(f"{info['pearson_pruned']:.4f} / {info['pearson_recovered']:.4f}")
            rows.append(cells)
            raw[f"{name}@{target:g}"] = dict(**info, step=res.plan.target.get("step"), samples=res.plan.target.get("samples"),
                            measurements=res.plan.target.get("measurements"),
                            search_s=res.plan.target.get("seconds"),target=target, layers=len(lrows), levels=stats["levels"], passes=stats["passes"],
                            prune_s=t_prune, forward_original_s=f_o, forward_pruned_s=f_p, run_s=stats["run_s"],
                            fit_s=stats["fit_s"], recover_s=t_rec, refit=refit, wall_s=wall)
            print(cells, flush=True)
    inputs = (f"{args.images} 224-px crops of half the photos (calibration) and 200 of the other half (evaluation)"
              if args.photos else f"{args.images} random 224-px inputs")
    text = (f"`--recover` (ridge, all layers after the pruning), {inputs} in batches of 32, "
            f"planned as --recover plans it (scope damage; "
            f"{args.importance + ' ranks' if args.importance else 'recon ranks for MLP units, heads and head dims'}), "
            f"random weights, {threads} CPU threads\n\n")
    head = ["model", "target_macs", "layers", "levels", "prune s (the --recover plan: scope damage)", "forward original s",
            "forward pruned s", "recovery ORT passes s", "passes / (fwd orig + fwd pruned)", "statistics + solves s",
            "recovery total s", "layers re-fitted", "wall s (the whole prune + recover call)"]
    if args.photos:
        head.append("Pearson with the original on the other photos: pruned / --recover")
    text += md(head, rows)
    text += "\n"
    write_results(args.out, text, {"args": vars(args), "models": raw})
    print(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()

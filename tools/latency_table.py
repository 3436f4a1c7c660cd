"""README latency tables: MACs reduction vs measured ONNX Runtime speed-up, and
native parity (deit_base pruned to deit_small's shape vs a native deit_small).

    python tools/latency_table.py [--runs 30] [--warmup 5] [--batch 8] [--only resnet50,deit_base]
                                  [--out tools/results/latency_table.md]

Every model is a timm model with random weights, exported at a static batch of
``--batch`` (default 8, Isomorphic Pruning's CPU batch) with the dynamo exporter (and the
legacy one for parity). Each family (original + its pruned variants) is timed
with ``onnxprune.bench``: runs interleaved, order rotated every round, ORT with
as many intra-op threads as CPU cores. Speed-up is median latency of the
original over median latency of the pruned model; "efficiency" is speed-up
divided by MACs reduction (the goal: at least 0.8).
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

import onnx  # noqa: E402
import timm  # noqa: E402

from onnxprune.api import prune  # noqa: E402
from onnxprune.runtime.bench import bench  # noqa: E402
from onnxprune.torchbridge.export import export_timm  # noqa: E402
from onnxprune.report import table  # noqa: E402
from timm_models import randomize  # noqa: E402
from common import md  # noqa: E402

MODELS_DIR = os.path.join(HERE, "..", "models")
CHANNELS = {"default": 0.5, "kinds": {"embed": 0}, "round_to": 8}
ALL = {"default": 0.5, "round_to": 8}
FAMILIES = {
    "resnet50": [("channels 0.5 (embed kept), round_to 8", CHANNELS), ("all groups 0.5, round_to 8", ALL)],
    "mobilenetv2_100": [("channels 0.5 (embed kept), round_to 8", CHANNELS), ("all groups 0.5, round_to 8", ALL)],
    "convnext_tiny": [("mlp/channels 0.5 (embed kept), round_to 8", CHANNELS), ("all groups 0.5, round_to 8", ALL)],
    "deit_base_patch16_224": [("models/deit_4.2g.json", os.path.join(MODELS_DIR, "deit_4.2g.json"))],
    "swin_tiny_patch4_window7_224": [("target_macs 50%, round_to 8", {"target_macs": "50%", "round_to": 8})],
}
HALF = {"kinds": {"embed": 0.5, "heads": 0.5, "mlp": 0.5, "head_dim": 0}, "scope": "local"}


def _export(name, path, exporter, batch, seed):
    model = randomize(timm.create_model(name, pretrained=False), seed=seed)
    export_timm(name, path, exporter=exporter, opset=20 if exporter == "dynamo" else 17, model=model, batch=batch)
    return path


def families(tmp, args, out_rows, raw):
    for name, settings in FAMILIES.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        src = _export(name, os.path.join(tmp, f"{name}.onnx"), "dynamo", args.batch, seed=1)
        models = [(name, onnx.load(src))]
        for label, cfg in settings:
            res = prune(src, cfg)
            models.append((label, res.proto))
        rows = bench(models, batch=args.batch, warmup=args.warmup, runs=args.runs)
        raw[name] = [r.as_dict() for r in rows]
        base = rows[0]
        for r in rows[1:]:
            red = base.macs / r.macs
            out_rows.append([name, r.name, f"{base.macs / 1e9:.3f}G", f"{r.macs / 1e9:.3f}G", f"{red:.2f}x",
                             f"{base.median_ms:.1f}", f"{r.median_ms:.1f}", f"{r.speedup:.2f}x", f"{r.speedup / red:.2f}"])
        print(table([out_rows[-1]], HEAD_A) if out_rows else "", flush=True)


def parity(tmp, args, out_rows, raw):
    for exporter in ("dynamo", "legacy"):
        print(f"== parity, {exporter}", flush=True)
        base = _export("deit_base_patch16_224", os.path.join(tmp, f"base-{exporter}.onnx"), exporter, args.batch, seed=6)
        small = _export("deit_small_patch16_224", os.path.join(tmp, f"small-{exporter}.onnx"), exporter, args.batch, seed=7)
        res = prune(base, HALF)
        rows = bench([("native deit_small", onnx.load(small)), ("deit_base pruned to deit_small", res.proto)],
                     batch=args.batch, warmup=args.warmup, runs=args.parity_runs)
        raw[f"parity-{exporter}"] = [r.as_dict() for r in rows]
        nat, pr = rows
        out_rows.append([exporter, f"{nat.macs / 1e9:.3f}G", f"{pr.macs / 1e9:.3f}G", f"{nat.params / 1e6:.2f}M", f"{pr.params / 1e6:.2f}M",
                         f"{nat.median_ms:.1f}", f"{pr.median_ms:.1f}", f"{pr.median_ms / nat.median_ms:.3f}"])
        print(table([out_rows[-1]], HEAD_B), flush=True)


HEAD_A = ["model", "pruned with", "MACs", "pruned MACs", "MACs red.", "orig ms", "pruned ms", "speed-up", "efficiency"]
HEAD_B = ["exporter", "native MACs", "pruned MACs", "native params", "pruned params", "native ms", "pruned ms", "pruned / native"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latency_table.md"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--parity-runs", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma list of families and/or 'parity'")
    args = ap.parse_args()
    t0 = time.perf_counter()
    a_rows, b_rows, raw = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        families(tmp, args, a_rows, raw)
        if not args.only or "parity" in args.only:
            parity(tmp, args, b_rows, raw)
    import onnxruntime

    env = (f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, "
           f"CPUExecutionProvider, {os.cpu_count()} intra-op threads, batch {args.batch}, {args.warmup} warm-up + {args.runs} timed runs "
           f"({args.parity_runs} for parity) per model, interleaved; {time.perf_counter() - t0:.0f}s in all")
    text = ""
    if a_rows:
        text += "MACs reduction vs measured speed-up\n\n" + md(HEAD_A, a_rows) + "\n"
    if b_rows:
        text += "\nNative parity (deit_base pruned with embed/heads/mlp 0.5, head_dim 0 vs native deit_small)\n\n" + md(HEAD_B, b_rows) + "\n"
    text += "\n" + env + "\n"
    print("\n" + text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(raw, f, indent=1)



if __name__ == "__main__":
    main()

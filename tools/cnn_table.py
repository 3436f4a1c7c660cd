"""README table: analysis and pruning of timm CNNs (random weights), both exporters.

    python tools/cnn_table.py [--out tools/results/cnn_table.md]

For each model and exporter: groups, isomorphic sets, frozen groups, params and
MACs before/after at two ratio settings, analysis+prune time, and the
zero-contribution oracle's max relative error over all exact groups.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import timm  # noqa: E402

from onnxprune.api import analyze, prune  # noqa: E402
from onnxprune.torchbridge.export import export_timm  # noqa: E402
from onnxprune.report import table  # noqa: E402
from onnxprune.validate.oracle import oracle  # noqa: E402
from timm_models import randomize  # noqa: E402

MODELS = ["resnet50", "mobilenetv2_100", "convnext_tiny"]
EXPORTS = [("legacy", 17, True), ("dynamo", 20, False)]
SETTINGS = {"channels 0.5": {"default": 0.5, "kinds": {"embed": 0}}, "all 0.5": {"default": 0.5}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cnn_table.md"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            model = randomize(timm.create_model(name, pretrained=False), seed=1)
            for exporter, opset, dyn in EXPORTS:
                path = os.path.join(tmp, f"{name}-{exporter}.onnx")
                export_timm(name, path, exporter=exporter, opset=opset, dynamic_batch=dyn, model=model)
                t = time.perf_counter()
                a = analyze(path)
                t_an = time.perf_counter() - t
                n_frozen = sum(1 for g in a.groups if g.frozen)
                for label, cfg in SETTINGS.items():
                    t = time.perf_counter()
                    res = prune(path, cfg)
                    t_pr = time.perf_counter() - t
                    rep = oracle(a, per_set=False, plan=res.plan)
                    err = max((r.max_rel_err for r in rep if r.max_rel_err is not None), default=float("nan"))
                    b, f = res.before, res.after
                    rows.append([name, f"{exporter} op{opset}{' dyn' if dyn else ''}", len(a.groups) - n_frozen, len(a.sets), n_frozen, label,
                                 f"{b['params'] / 1e6:.2f}M", f"{f['params'] / 1e6:.2f}M", f"{b['macs'] / 1e9:.3f}G", f"{f['macs'] / 1e9:.3f}G",
                                 f"{f['macs'] / b['macs']:.3f}", f"{t_an:.2f}s", f"{t_pr:.2f}s", f"{err:.1e}"])
                    print(" | ".join(map(str, rows[-1])), flush=True)
    header = ["model", "export", "groups", "sets", "frozen", "ratios", "params", "params after", "MACs", "MACs after", "MACs ratio", "analyse", "prune+validate", "oracle max rel err"]
    text = table(rows, header)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows) + "\n"
    with open(args.out, "w") as fh:
        fh.write(md)
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

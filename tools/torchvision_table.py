"""torchvision's classifiers through both torch exporters: what onnxprune can prune in each and whether the
zero-contribution oracle passes.

    python tools/torchvision_table.py [--models vit_b_16,swin_t,...] [--exporters legacy,dynamo]
                                      [--target 0.7] [--out tools/results/torchvision_table.md]

Each model is built by ``torchvision.models.get_model(name, weights=None)`` (no weights can be downloaded
here) with its BatchNorm statistics and affines drawn at random and every all-zero weight (torchvision
initialises ViT's classifier head to zero) drawn at random too, so that outputs depend on the input and the
oracle has something to compare. It is exported at 224 px (inception_v3: 299) with a dynamic batch:
``torch.onnx.export(..., dynamo=False, dynamic_axes={"x": {0: "batch"}})`` (the legacy exporter) or
``dynamo=True`` with a dynamic batch dimension; then pruned in a subprocess as a user would,
``onnxprune FILE --ratios '{"target_macs": T}' -o OUT --verify --report REP``. Per model and exporter:
the kinds with prunable groups (count per kind), the frozen groups, MACs after, the oracle's worst error
over all exact groups, and the time. Files are cached under tools/.cache/torchvision (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import md, write_results  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "torchvision")
MODELS = ["resnet50", "mobilenet_v3_large", "efficientnet_v2_s", "regnet_y_400mf", "shufflenet_v2_x1_0",
          "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t"]
LOCAL_MODELS = {m: "torchvision.models" for m in MODELS}  # built by torchvision, not timm


def build(name: str):
    import torch
    import torchvision.models as tvm

    torch.manual_seed(0)
    net = tvm.get_model(name, weights=None).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        for p in net.parameters():
            if p.dim() >= 2 and not p.any():  # a zero-initialised head: outputs would not depend on the input
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return net


def export(name: str, exporter: str) -> str:
    import torch

    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"{name}_{exporter}.onnx")
    if os.path.exists(path):
        return path
    size = 299 if name == "inception_v3" else 224
    x = torch.randn(2, 3, size, size)
    net = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(net, (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
        else:
            batch = torch.export.Dim("batch", min=1, max=64)
            torch.onnx.export(net, (x,), path, dynamo=True, input_names=["x"], dynamic_shapes=({0: batch},),
                              external_data=False)
    return path


def prune(path: str, target: float) -> dict:
    out, rep = path[:-5] + ".pruned.onnx", path[:-5] + ".report.json"
    for f in (out, rep):
        if os.path.exists(f):
            os.remove(f)
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "onnxprune", path, "--ratios", json.dumps({"target_macs": target}),
                        "-o", out, "--verify", "--report", rep], capture_output=True, text=True)
    got = {"seconds": round(time.time() - t, 1), "rc": p.returncode,
           "error": p.stderr.strip().splitlines()[-1] if p.returncode and p.stderr.strip() else ""}
    if p.returncode == 0:
        r = json.load(open(rep))
        kinds: dict[str, int] = {}
        for g in r["groups"]:
            if not g["frozen"]:
                kinds[g["kind"]] = kinds.get(g["kind"], 0) + 1
        exact = [o for o in r["oracle"] if o["scope"] == "all exact groups"]
        got.update(kinds=kinds, frozen=sum(1 for g in r["groups"] if g["frozen"]),
                   macs=r["after"]["macs"] / r["before"]["macs"],
                   oracle=(exact[0]["status"], exact[0]["max_rel_err"]) if exact else ("none", None))
    return got


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="torchvision.models names")
    ap.add_argument("--exporters", default="legacy,dynamo", help="of legacy, dynamo")
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "torchvision_table.md"))
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    rows, raw = [], {}
    for name in args.models.split(","):
        for exporter in args.exporters.split(","):
            try:
                path = export(name, exporter)
            except Exception as e:  # an exporter that cannot take the model: recorded, not fatal
                raw[f"{name}/{exporter}"] = {"export_error": f"{type(e).__name__}: {str(e)[:200]}"}
                rows.append([name, exporter, "export failed: " + type(e).__name__, "", "", "", ""])
                print(rows[-1], flush=True)
                continue
            got = prune(path, args.target)
            raw[f"{name}/{exporter}"] = got
            if got["rc"]:
                rows.append([name, exporter, "refused: " + got["error"][:120], "", "", "", f"{got['seconds']}s"])
            else:
                kinds = ", ".join(f"{k} {v}" for k, v in sorted(got["kinds"].items()))
                status, err = got["oracle"]
                rows.append([name, exporter, kinds, got["frozen"], f"{got['macs']:.3f}x",
                             f"{status} {err:.1e}" if err is not None else status, f"{got['seconds']}s"])
            print(rows[-1], flush=True)
    text = (f"torchvision classifiers (random weights, BatchNorm statistics drawn at random), exported with a "
            f"dynamic batch by each torch exporter (torch {_version('torch')}, torchvision "
            f"{_version('torchvision')}), pruned to `target_macs` {args.target} with `--verify`: the kinds with "
            "prunable groups (groups of each), frozen groups, MACs after, the zero-contribution oracle over all "
            "exact groups, the whole call's time (2 CPU cores)\n\n"
            + md(["model", "exporter", "prunable groups", "frozen", "MACs", "oracle", "time"], rows)
            + "\n\n`python tools/torchvision_table.py`\n")
    write_results(args.out, text, raw)


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:
        return "?"


if __name__ == "__main__":
    main()

"""README table: importance criterion x scope on the trained reference models,
at two MACs targets, accuracy right after pruning and after the same short
fine-tune; and GOHSP's batch-size stability (GOHSP).

    python tools/importance_table.py [--ft-steps 30] [--targets 0.7,0.5] [--only cnn|vit]

Calibration: 4 batches of 32 training images (the data's labels). Fine-tune:
recipe ``quick`` (AdamW lr 1e-3, cosine, label smoothing), KD from the
unpruned model, batch 64, ``--ft-steps`` steps. Accuracy: top-1 in ONNX
Runtime on the 600 validation images. The data is regenerated as
tools/train_reference.py made it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from onnxprune import io  # noqa: E402
from onnxprune.api import analyze, prune  # noqa: E402
from onnxprune.torchbridge.train import Options, evaluate_onnx, finetune  # noqa: E402
from onnxprune.plan.importance.calib import load  # noqa: E402
from onnxprune.plan import Ratios  # noqa: E402
from common import md, write_results  # noqa: E402
from train_reference import MODELS, glyph_data  # noqa: E402

CRITERIA = {
    "cnn": ["l2", "l1", "random", "bn_scale", "activation", "taylor", "hessian"],
    "vit": ["l2", "l1", "random", "bn_scale", "activation", "taylor", "hessian", {"heads": "gohsp", "default": "taylor"}],
}
SCOPES = ["isomorphic", "global", "local"]


def _name(c) -> str:
    return c if isinstance(c, str) else "+".join(f"{v} ({k})" if k != "default" else v for k, v in c.items())


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def stability(data: str) -> list:
    """GOHSP rankings per block from calibration sets of 8, 32 and 128 images."""
    src = os.path.join(MODELS, "ref_vit.onnx")
    a = analyze(src)
    proto = a.skeleton()
    r = Ratios.from_dict({"importance": {"heads": "gohsp"}})
    got = {}
    for n in (8, 32, 128):
        calib = load(data, proto, n_batches=1, batch=n, seed=1)
        sc = a.scores(r, calib)
        got[n] = {gid: np.array(d["stationary"]) for gid, d in sc.gohsp.items()}
    rows = []
    for x, y in ((8, 32), (32, 128), (8, 128)):
        rhos = [spearman(got[x][g], got[y][g]) for g in got[x]]
        rows.append([f"{x} vs {y}", f"{np.mean(rhos):.3f}", f"{min(rhos):.3f}", len(rhos)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--ft-steps", type=int, default=30)
    ap.add_argument("--targets", default="0.7,0.5")
    ap.add_argument("--only", choices=["cnn", "vit"])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "importance_table.md"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    data = glyph_data(args.data, tmp)
    targets = [float(t) for t in args.targets.split(",")]
    rows, raw = [], []
    t0 = time.perf_counter()
    for kind in ("cnn", "vit"):
        if args.only and kind != args.only:
            continue
        src = os.path.join(MODELS, f"ref_{kind}.onnx")
        base_acc = evaluate_onnx(src, data, 64)
        calib = load(data, io.read_proto(src), n_batches=4, batch=32)
        for crit in CRITERIA[kind]:
            for scope in SCOPES:
                for tgt in targets:
                    ratios = {"target_macs": tgt, "scope": scope, "importance": crit}
                    res = prune(src, ratios, calib=calib)
                    pruned = os.path.join(tmp, "p.onnx")
                    io.save(res.proto, pruned)
                    acc1 = evaluate_onnx(pruned, data, 64)
                    r = finetune(pruned, Options(data=data, output=os.path.join(tmp, "t.onnx"), teacher=src, recipe="quick",
                                                 epochs=100, max_steps=args.ft_steps, lr=1e-3, batch_size=64, workers=2,
                                                 progress=False))
                    acc2 = r["top1_after"]
                    row = [f"ref_{kind}", _name(crit), scope, f"{tgt:.0%}", f"{res.after['macs'] / res.before['macs']:.3f}",
                           f"{base_acc:.1f}", f"{acc1:.1f}", f"{acc2:.1f}"]
                    rows.append(row)
                    raw.append({"model": kind, "criterion": crit, "scope": scope, "target": tgt, "macs_ratio": res.after["macs"] / res.before["macs"],
                                "top1": [base_acc, acc1, acc2]})
                    print(" | ".join(row), f"({time.perf_counter() - t0:.0f}s)", flush=True)
    head = ["model", "criterion", "scope", "MACs target", "MACs kept", "top-1 original", "top-1 pruned", f"top-1 after {args.ft_steps} steps"]
    text = md(head, rows)
    if not args.only or args.only == "vit":
        st = stability(data)
        text += "\n\nGOHSP batch-size stability (ref_vit, Spearman rank correlation of per-block head rankings)\n\n"
        text += md(["calibration images", "mean rho", "min rho", "blocks"], st)
    text += f"\n\n{time.perf_counter() - t0:.0f}s on {os.cpu_count()} CPU cores\n"
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

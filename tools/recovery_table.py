"""README table: closed-form recovery (onnxprune/recover/) right after pruning,
no labels, no training.

    python tools/recovery_table.py [--data DIR] [--targets 0.9,0.7,0.5] [--only cnn|vit]
                                   [--calib-batches 4] [--batch 32] [--criteria l2,activation,taylor,recon,recon-cost,l2-damage]
    python tools/recovery_table.py --ridge-sweep 1e-4,1e-3,1e-2,1e-1,1 --sweep-target 0.5 --out tools/results/recovery_ridge.md

For ``models/ref_{cnn,vit}.onnx`` at each MACs target (``{"target_macs": t}``,
l2 importance, isomorphic scope): top-1 on the synthetic glyph val split and
top-1 agreement with the unpruned model, for the pruned model, after ``bias``,
after ``stats`` and after ``ridge`` recovery, with recovery times. Calibration
images are the *train* split (``--calib DIR``'s choice), their labels unused.
A second table compares importance criteria (l2, activation, taylor, recon,
recon with scope ``cost``, and l2 with scope ``damage``) before and after ridge recovery; taylor gets no
labels (it uses the model's own predictions). ``--ridge-sweep`` instead measures ridge recovery at one target
for several ridge strengths (how sensitive the default is; the default was
fixed before this was measured).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from onnxprune import runtime  # noqa: E402
from onnxprune.api import prune  # noqa: E402
from onnxprune.torchbridge.data import image_folder  # noqa: E402
from onnxprune.plan.importance.calib import Calibration, load  # noqa: E402
from common import md, write_results  # noqa: E402
from train_reference import MODELS, glyph_data  # noqa: E402


def val_set(root: str, size: int = 64):
    ds = image_folder(root, "val", size, train=False)
    items = [ds[i] for i in range(len(ds))]
    return np.stack([it[0].numpy() for it in items]).astype(np.float32), np.array([it[1] for it in items])


def predict(proto, x, batch=100):
    s = runtime.session(proto, threads=os.cpu_count() or 1)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--targets", default="0.9,0.7,0.5")
    ap.add_argument("--only", choices=["cnn", "vit"])
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ridge", type=float, default=1e-2)
    ap.add_argument("--criteria", default="l2,activation,taylor,recon,recon-cost",
                    help="criteria compared after ridge recovery; NAME-cost: with scope 'cost'")
    ap.add_argument("--ridge-sweep", default="")
    ap.add_argument("--sweep-target", type=float, default=0.5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "recovery_table.md"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    data = glyph_data(args.data, tmp)
    x, y = val_set(data)
    targets = [float(t) for t in args.targets.split(",")]
    kinds = [args.only] if args.only else ["cnn", "vit"]
    rows, rows2, raw = [], [], {}
    t_all = time.perf_counter()
    for kind in kinds:
        path = os.path.join(MODELS, f"ref_{kind}.onnx")
        orig = onnx.load(path)
        p0 = predict(orig, x)
        acc0 = 100 * (p0 == y).mean()
        cal = load(data, orig, args.calib_batches, args.batch)
        nolabels = Calibration(cal.batches, None, cal.source + ", labels dropped")

        def recovered(res, method="ridge", **options):
            """The plan of ``res`` replayed, then the recovery stage (as --recover runs it)."""
            return prune(path, plan=res.plan_json, calib=nolabels, recover=method, recover_options=options)

        def score(proto):
            p = predict(proto, x)
            return 100 * (p == y).mean(), 100 * (p == p0).mean()

        if args.ridge_sweep:
            res = prune(path, {"target_macs": args.sweep_target})
            cells = [f"ref_{kind}", f"{args.sweep_target:.0%}", "%.1f / %.1f" % score(res.proto)]
            for lam in [float(v) for v in args.ridge_sweep.split(",")]:
                rec = recovered(res, ridge=lam).proto
                cells.append("%.1f / %.1f" % score(rec))
                raw[f"ref_{kind}@{args.sweep_target}:ridge={lam}"] = score(rec)
                print(cells, flush=True)
            rows.append(cells)
            continue
        for t in targets:
            ratios = {"target_macs": t}
            res = prune(path, ratios)
            macs = res.after["macs"] / res.before["macs"]
            cells = [f"ref_{kind}", f"{t:.0%}", f"{macs:.3f}", f"{acc0:.1f}"]
            entry = {"ratios": ratios, "macs_kept": macs, "top1_original": acc0}
            a, g = score(res.proto)
            cells += [f"{a:.1f} / {g:.1f}"]
            entry["pruned"] = {"top1": a, "agree": g}
            for method in ("bias", "stats", "ridge"):
                r = recovered(res, method, ridge=args.ridge)
                rec, lrows, secs = r.proto, r.recovery, r.timings["recover"]
                a, g = score(rec)
                cells += [f"{a:.1f} / {g:.1f}"]
                if method != "stats":
                    cells += [f"{secs:.1f}s"]
                entry[method] = {"top1": a, "agree": g, "seconds": secs, "layers": [r.as_dict() for r in lrows]}
                print(f"ref_{kind} {t:.0%} {method}: top-1 {a:.1f} agree {g:.1f} ({secs:.1f}s; "
                      f"{sum(r.status == 'refit' for r in lrows)}/{len(lrows)} layers re-fitted)", flush=True)
            rows.append(cells)
            raw[f"ref_{kind}@{t}"] = entry
        for crit in [c for c in args.criteria.split(",") if c]:
            for t in targets:
                ratios = {"target_macs": t, "importance": crit.split("-")[0]}
                if crit.endswith("-cost"):
                    ratios["scope"] = "cost"  # score per MAC saved, every kind in one pool
                if crit.endswith("-damage"):
                    ratios["scope"] = "damage"  # measured output damage per MAC saved (the --recover default)
                t0 = time.perf_counter()
                res = prune(path, ratios, calib=nolabels if crit != "l2" else None)
                tp = time.perf_counter() - t0
                a1, g1 = score(res.proto)
                a2, g2 = score(recovered(res, ridge=args.ridge).proto)
                rows2.append([f"ref_{kind}", crit, f"{t:.0%}", f"{a1:.1f} / {g1:.1f}", f"{a2:.1f} / {g2:.1f}", f"{tp:.1f}s"])
                raw[f"ref_{kind}@{t}:{crit}"] = {"pruned": [a1, g1], "ridge": [a2, g2], "prune_seconds": tp}
                print(rows2[-1], flush=True)
    if args.ridge_sweep:
        head = ["model", "MACs target", "pruned"] + [f"ridge {v}" for v in args.ridge_sweep.split(",")]
        text = "Ridge strength (relative to the mean Gram diagonal); top-1 on val / top-1 agreement with the original, %\n\n"
    else:
        head = ["model", "MACs target", "MACs kept", "top-1 original", "pruned (top-1 / agree)", "bias", "bias time",
                "stats", "ridge", "ridge time"]
        text = "Closed-form recovery right after pruning (l2 importance); top-1 on val / top-1 agreement with the original, %\n\n"
    text += md(head, rows)
    if rows2:
        text += "\n\nImportance criterion before and after ridge recovery (top-1 / agreement, %)\n\n"
        text += md(["model", "criterion", "MACs target", "pruned", "after ridge", "prune time"], rows2)
    text += (f"\n\nsynthetic glyphs, 10 classes, {len(y)} val images; calibration {args.calib_batches} x {args.batch} "
             f"train-split images, labels unused; {'' if args.ridge_sweep else f'ridge {args.ridge}; '}CPU {os.cpu_count()} cores; "
             f"{time.perf_counter() - t_all:.0f}s in all\n")
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

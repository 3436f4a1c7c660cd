"""README table: pruned -> closed-form recovery -> label-free distillation vs
labelled fine-tuning, for the reference models at several MACs targets.

    python tools/distill_table.py [--data DIR] [--targets 0.9,0.7,0.5] [--steps 30] [--batch 32] [--only cnn|vit]

For ``models/ref_{cnn,vit}.onnx`` at each MACs target (``{"target_macs": t}``,
l2 importance): top-1 on the glyph val split / top-1 agreement with the
unpruned model / KL(original || model) on val, for

1. the pruned model;
2. after ridge recovery (``api.prune(..., plan=<the same plan>, recover="ridge")``; 4 x 32
   train-split images, labels unused);
3. after ``--steps`` steps of label-free distillation from the unpruned model,
   started from (2): ``finetune --data FLAT --teacher`` where FLAT is the train
   split as a flat folder of images (no classes; the loss is only on the
   teacher's logits);
4. after the same number of steps of labelled fine-tuning from (2) (task loss
   + KD, the ImageFolder with its classes), for comparison.

The default recipes: ``distill`` without labels (AdamW 1e-4 scaled by
batch/64, no weight decay, 5% warm-up, cosine), ``quick`` with them (AdamW
1e-3 scaled, cosine); KD T 4. Writes
tools/results/distill_table.md (and .json).
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

from onnxprune import io, runtime  # noqa: E402
from onnxprune.api import prune  # noqa: E402
from onnxprune.torchbridge.train import Options, finetune  # noqa: E402
from onnxprune.plan.importance.calib import load  # noqa: E402
from common import md, write_results  # noqa: E402
from recovery_table import val_set  # noqa: E402
from train_reference import MODELS, glyph_data  # noqa: E402


def logits(proto, x, batch=100):
    s = runtime.session(proto, threads=os.cpu_count() or 1)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]).astype(np.float64)


def _logsm(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def flat_folder(data: str, dst: str, n_val: int = 64) -> str:
    """The train split as a folder of images without classes (symlinks);
    ``val/`` holds a few val images for the tool's own held-out report."""
    for split, limit in (("train", None), ("val", n_val)):
        os.makedirs(os.path.join(dst, split), exist_ok=True)
        k = 0
        for c in sorted(os.listdir(os.path.join(data, split))):
            for f in sorted(os.listdir(os.path.join(data, split, c))):
                if limit is None or k < limit:
                    os.symlink(os.path.join(data, split, c, f), os.path.join(dst, split, f"{c}_{f}"))
                    k += 1
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--targets", default="0.9,0.7,0.5")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--only", choices=["cnn", "vit"])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "distill_table.md"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    data = glyph_data(args.data, tmp)
    flat = flat_folder(data, os.path.join(tmp, "flat"))
    x, y = val_set(data)
    rows, raw = [], {}
    t_all = time.perf_counter()
    for kind in [args.only] if args.only else ["cnn", "vit"]:
        path = os.path.join(MODELS, f"ref_{kind}.onnx")
        orig = onnx.load(path)
        z0 = logits(orig, x)
        p0, lp0 = z0.argmax(1), _logsm(z0)

        def score(proto):
            z = logits(proto, x)
            kl = float((np.exp(lp0) * (lp0 - _logsm(z))).sum(1).mean())
            return 100 * (z.argmax(1) == y).mean(), 100 * (z.argmax(1) == p0).mean(), kl

        cell = lambda s: f"{s[0]:.1f} / {s[1]:.1f} / {s[2]:.3f}"  # noqa: E731
        cal = load(data, orig, 4, 32)
        for t in [float(v) for v in args.targets.split(",")]:
            res = prune(path, {"target_macs": t})
            entry = {"macs_kept": res.after["macs"] / res.before["macs"], "pruned": score(res.proto)}
            # the same plan replayed, then the recovery stage
            rec = prune(path, plan=res.plan_json, calib=cal, recover="ridge")
            entry["ridge_seconds"] = rec.timings["recover"]
            entry["ridge"] = score(rec.proto)
            rec_path = os.path.join(tmp, f"{kind}_{t}_rec.onnx")
            io.save(rec.proto, rec_path)
            for arm, d in (("distill", flat), ("labelled", data)):
                out = os.path.join(tmp, f"{kind}_{t}_{arm}.onnx")
                t0 = time.perf_counter()
                # the defaults a user gets: 'distill' without labels, 'quick' with them
                r = finetune(rec_path, Options(data=d, output=out, teacher=path, recipe=None, epochs=100,
                                               max_steps=args.steps, batch_size=args.batch, workers=1, progress=False,
                                               eval_batches=1))
                entry[arm + "_seconds"] = time.perf_counter() - t0
                entry[arm + "_train_seconds"] = r["train_seconds"]
                entry[arm] = score(onnx.load(out))
            raw[f"ref_{kind}@{t}"] = entry
            rows.append([f"ref_{kind}", f"{t:.0%}", f"{entry['macs_kept']:.3f}", cell(entry["pruned"]), cell(entry["ridge"]),
                         f"{entry['ridge_seconds']:.0f}s", cell(entry["distill"]), f"{entry['distill_train_seconds']:.0f}s",
                         cell(entry["labelled"]), f"{entry['labelled_train_seconds']:.0f}s"])
            print(rows[-1], flush=True)
    head = ["model", "MACs target", "MACs kept", "pruned", "+ ridge recover", "recover time",
            f"+ {args.steps} steps label-free KD", "KD time", f"+ {args.steps} steps labelled (CE + KD)", "labelled time"]
    text = ("Pruned -> ridge recovery -> label-free distillation (or labelled fine-tuning), l2 importance; "
            "each cell: top-1 on val / top-1 agreement with the original / KL(original || model), %, %, nats\n\n")
    text += md(head, rows)
    text += (f"\n\nsynthetic glyphs, 10 classes, {len(y)} val images; recovery: 4 x 32 train images, labels unused; "
             f"distillation: {args.steps} steps of batch {args.batch} from the recovered model, default recipes (label-free: distill; labelled: quick), teacher = the "
             f"unpruned model; training times exclude import/evaluation; CPU {os.cpu_count()} cores shared; "
             f"{time.perf_counter() - t_all:.0f}s in all\n")
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

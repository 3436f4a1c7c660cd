"""README table: accuracy lost by pruning the trained reference models to about
50% MACs, and recovered by ``onnxprune finetune`` with the unpruned model as
teacher, on the synthetic glyph set (CPU).

    python tools/finetune_table.py [--data DIR] [--epochs 2] [--target 50%]

Uses ``models/ref_{cnn,vit}.onnx`` (tools/train_reference.py). The data is
regenerated with the same arguments as training used (10 classes, 64 px,
seed 0) unless ``--data`` is given. Fine-tuning: recipe ``quick`` (AdamW
lr 1e-3, cosine, label smoothing 0.1), KD alpha 0.5, T 4, batch 64.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from onnxprune import io  # noqa: E402
from onnxprune.api import prune  # noqa: E402
from onnxprune.torchbridge.train import Options, evaluate_onnx, finetune  # noqa: E402
from common import md, write_results  # noqa: E402
from train_reference import MODELS, glyph_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--target", default="50%")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "finetune_table.md"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    data = glyph_data(args.data, tmp)
    rows, raw = [], {}
    for kind in ("cnn", "vit"):
        src = os.path.join(MODELS, f"ref_{kind}.onnx")
        ratios = {"target_macs": args.target, "round_to": 8 if kind == "cnn" else 1}
        res = prune(src, ratios)
        pruned = os.path.join(tmp, f"{kind}_pruned.onnx")
        io.save(res.proto, pruned)
        acc0 = evaluate_onnx(src, data, 64)
        acc1 = evaluate_onnx(pruned, data, 64)
        t = time.perf_counter()
        out = os.path.join(tmp, f"{kind}_tuned.onnx")
        r = finetune(pruned, Options(data=data, output=out, teacher=src, recipe="quick", epochs=args.epochs, lr=1e-3,
                                     batch_size=64, workers=2))
        secs = time.perf_counter() - t
        acc2 = r["top1_after"]
        rec = (acc2 - acc1) / max(acc0 - acc1, 1e-9)
        raw[kind] = {"ratios": ratios, "target": res.plan.target, "before": res.before, "after": res.after, "top1": [acc0, acc1, acc2],
                     "finetune": {k: r[k] for k in ("steps", "train_seconds", "history", "lr", "batch_size")}}
        rows.append([f"ref_{kind}", json.dumps(ratios), f"{res.before['macs'] / 1e6:.1f}M -> {res.after['macs'] / 1e6:.1f}M",
                     f"{acc0:.1f}", f"{acc1:.1f}", f"{acc2:.1f}", f"{100 * rec:.0f}%", f"{args.epochs} ({r['steps']} steps)", f"{secs:.0f}s"])
        print(rows[-1], flush=True)
    head = ["model", "ratios", "MACs", "top-1 original", "top-1 pruned", "top-1 fine-tuned", "drop recovered", "epochs", "fine-tune time"]
    text = md(head, rows)
    text += f"\n\nsynthetic glyphs, 10 classes, 600 val images; CPU {os.cpu_count()} cores; KD from the unpruned model\n"
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

"""Attention logits in `--recover`: q and k re-fitted separately vs jointly for q.k^T.

    python tools/attention_recovery.py [--data DIR] [--calib-batches 4] [--batch 32]
                                       [--out tools/results/attention_recovery.md]

``models/ref_vit.onnx`` (the 4-block ViT trained here on synthetic glyphs) is
pruned with each ratios line below, then recovered by ridge (``--recover``'s
method) twice from the same plan: with ``attention_logits`` off (every kept q
and k column re-fitted to its own original column) and on (the default: per
head, q and k fitted together so that the kept dims reproduce the original
logits). Calibration: unlabelled *train* images; evaluation: the *val* split
(other images). Top-1 on val / top-1 agreement with the unpruned model, %, and
KL(original || pruned) on val; seconds of recovery.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from onnxprune import runtime  # noqa: E402
from onnxprune.api import prune  # noqa: E402
from onnxprune.plan.importance.calib import Calibration, load  # noqa: E402
from common import md, write_results  # noqa: E402
from recovery_table import val_set  # noqa: E402
from train_reference import MODELS, glyph_data  # noqa: E402

RATIOS = [
    {"kinds": {"head_dim": 0.25}, "scope": "local"},
    {"kinds": {"head_dim": 0.5}, "scope": "local"},
    {"kinds": {"head_dim": 0.5, "mlp": 0.5}, "scope": "local"},
    {"kinds": {"head_dim": 0.5, "heads": 0.34, "mlp": 0.5}, "scope": "local"},
    # what --recover plans under a MACs budget (scope damage, l2 ranks): where the budget goes is measured
    {"target_macs": 0.7, "scope": "damage", "importance": "l2"},
    {"target_macs": 0.5, "scope": "damage", "importance": "l2"},
]


def logits(proto, x, batch=100):
    s = runtime.session(proto, threads=os.cpu_count() or 1)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def kl(p_logits, q_logits) -> float:
    lp = p_logits - p_logits.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    lq = q_logits - q_logits.max(1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "attention_recovery.md"))
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    tmp = tempfile.mkdtemp()
    data = glyph_data(args.data, tmp)
    x, y = val_set(data)
    path = os.path.join(MODELS, "ref_vit.onnx")
    orig = onnx.load(path)
    l0 = logits(orig, x)
    p0 = l0.argmax(1)
    cal = load(data, orig, args.calib_batches, args.batch)
    nolabels = Calibration(cal.batches, None, cal.source + ", labels dropped")

    def score(proto):
        lg = logits(proto, x)
        p = lg.argmax(1)
        return 100 * (p == y).mean(), 100 * (p == p0).mean(), kl(l0, lg)

    rows, raw = [], []
    for ratios in RATIOS:
        res = prune(path, ratios, calib=nolabels if ratios.get("scope") == "damage" else None)
        macs = res.after["macs"] / res.before["macs"]
        what = json.dumps(ratios["kinds"]) + " (local)" if "kinds" in ratios else \
            f"target_macs {ratios['target_macs']:.0%} (damage, l2: --recover's plan)"
        cells = [what, f"{100 * macs:.1f}%", "%.1f / %.1f / %.3f" % score(res.proto)]
        entry = {"ratios": ratios, "macs_kept": macs, "pruned": score(res.proto)}
        for joint in (False, True):
            r = prune(path, plan=res.plan_json, calib=nolabels, recover="ridge",
                      recover_options={"attention_logits": joint})
            s = score(r.proto)
            heads = [lr for lr in r.recovery if lr.method == "qk-logits"]
            cells += ["%.1f / %.1f / %.3f" % s, f"{r.timings['recover']:.1f}s"]
            entry["joint" if joint else "separate"] = {"score": s, "seconds": r.timings["recover"],
                                                       "logit_rows": [lr.as_dict() for lr in heads]}
            if joint:
                cells.append(", ".join(lr.outputs_kept for lr in heads if lr.status != "skipped") or "none")
        rows.append(cells)
        raw.append(entry)
        print(" | ".join(cells), flush=True)
    head = ["ratios", "MACs kept", "pruned", "q, k separate", "time", "q, k joint (default)", "time",
            "heads fitted jointly per block"]
    text = ("# Attention logits in the re-fit\n\nref_vit (4 blocks, 3 heads of 64, trained here on synthetic glyphs); "
            f"calibration {args.calib_batches} x {args.batch} unlabelled train images, evaluation {len(x)} val images. "
            "Cells: top-1 on val / top-1 agreement with the original, % / KL(original || model). Ridge recovery from "
            "the same plan, with q and k re-fitted column by column or jointly for the logits. CPU, "
            f"{os.cpu_count()} threads.\n\n" + md(head, rows) + "\n")
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

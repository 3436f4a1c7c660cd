"""README table: Isomorphic Pruning's DeiT targets (models/deit_*.json) applied to timm
DeiTs with random weights; params and MACs here vs. the paper's.

    python tools/deit_table.py [--exporter dynamo|legacy] [--out tools/results/deit_table.md]
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

from onnxprune.api import prune  # noqa: E402
from onnxprune.torchbridge.export import export_timm  # noqa: E402
from onnxprune.report import table  # noqa: E402
from timm_models import randomize  # noqa: E402

# target, base model, ratios file, paper params (M), paper MACs (G) (Isomorphic Pruning, supplementary)
TARGETS = [
    ("DeiT-4.2G", "deit_base_patch16_224", "deit_4.2g.json", 20.28, 4.16),  # non-distilled DeiT-B figures from the paper
    ("DeiT-2.6G", "deit_base_patch16_224", "deit_2.6g.json", 13.07, 2.61),
    ("DeiT-1.2G", "deit_small_patch16_224", "deit_1.2g.json", 5.74, 1.21),
    ("DeiT-0.6G", "deit_tiny_patch16_224", "deit_0.6g.json", 3.08, 0.62),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "deit_table.md"))
    args = ap.parse_args()
    rows = []
    models_dir = os.path.join(HERE, "..", "models")
    with tempfile.TemporaryDirectory() as tmp:
        for target, base, rfile, p_paper, m_paper in TARGETS:
            path = os.path.join(tmp, base + ".onnx")
            if not os.path.exists(path):
                export_timm(base, path, exporter=args.exporter, model=randomize(timm.create_model(base), seed=0))
            t = time.perf_counter()
            res = prune(path, os.path.join(models_dir, rfile))
            dt = time.perf_counter() - t
            a = res.analyzed
            widths = {}
            for g in a.groups:
                if g.kind in ("embed", "heads", "head_dim", "mlp"):
                    widths.setdefault(g.kind, set()).add(len(res.plan.keep.get(g.id, range(g.width))))
            arch = " / ".join(f"{k} {','.join(map(str, sorted(v)))}" for k, v in sorted(widths.items()))
            pa, ma = res.after["params"] / 1e6, res.after["macs"] / 1e9
            rows.append([target, base, rfile, f"{res.before['params'] / 1e6:.2f}M", f"{pa:.2f}M", f"{p_paper:.2f}M", f"{100 * (pa / p_paper - 1):+.1f}%",
                         f"{res.before['macs'] / 1e9:.2f}G", f"{ma:.3f}G", f"{m_paper:.2f}G", f"{100 * (ma / m_paper - 1):+.1f}%", arch, f"{dt:.1f}s"])
            print(" | ".join(rows[-1]), flush=True)
    header = ["target", "from", "ratios", "params", "pruned", "paper", "diff", "MACs", "pruned", "paper", "diff", "kept widths", "prune+validate"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n")
    print(table(rows, header))


if __name__ == "__main__":
    main()

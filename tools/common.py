"""Helpers shared by the tools/ scripts: markdown tables and result files."""
from __future__ import annotations

import json
import os


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

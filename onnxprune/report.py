"""Readable tables and the JSON report."""
from __future__ import annotations

from collections import Counter

import numpy as np

from .core.groups import Group, isomorphic_sets


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w[i]) if i == 0 or not _num(c) else c.rjust(w[i]) for i, c in enumerate(r))
    return "\n".join([line(header), line(["-" * x for x in w])] + [line(r) for r in cells[1:]])


def _num(s: str) -> bool:
    return s.rstrip("x").replace(".", "").replace("-", "").replace("%", "").replace("M", "").replace("G", "").replace(",", "").isdigit()


def human(n: float, unit: str = "") -> str:
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3f}{suf}{unit}"
    return f"{n:.0f}{unit}"


def sets_table(groups: list[Group], keep: dict[int, np.ndarray] | None = None) -> str:
    rows = []
    for name, gs in isomorphic_sets(groups).items():
        widths = Counter(g.width for g in gs)
        wtxt = ",".join(f"{w}x{n}" if n > 1 else str(w) for w, n in sorted(widths.items()))
        row = [name, gs[0].kind, len(gs), wtxt, "exact" if gs[0].exact else "approx"]
        if keep is not None:
            before = sum(g.width for g in gs)
            after = sum(len(keep.get(g.id, range(g.width))) for g in gs)
            row += [before, after, f"{100 * (1 - after / before):.1f}%"]
        rows.append(row)
    header = ["isomorphic set", "kind", "groups", "widths", "oracle"]
    if keep is not None:
        header += ["width", "kept", "removed"]
    return table(rows, header)


def frozen_table(groups: list[Group]) -> str:
    rows = [[g.id, g.kind, g.width, g.label(), "; ".join(g.frozen)] for g in groups if g.frozen]
    return table(rows, ["group", "kind", "width", "layers", "why frozen"]) if rows else "(none)"


def groups_json(groups: list[Group], plan=None) -> list[dict]:
    out = []
    for g in groups:
        d = {
            "id": g.id,
            "kind": g.kind,
            "set": g.set_name or None,
            "signature": g.signature,
            "width": g.width,
            "exact": g.exact,
            "frozen": g.frozen,
            "members": [
                {"node": m.node.name, "op": m.node.op_type, "input": m.slot, "tensor": m.value.name, "axis": m.axis, "role": m.role}
                for m in g.tensors
            ],
            "shape_constants": [{"node": m.node.name, "input": m.slot, "index": m.index} for m in g.shapes],
            "attributes": [{"node": m.node.name, "attribute": m.attr} for m in g.attrs],
        }
        if plan is not None:
            kept = plan.keep.get(g.id)
            d["width_after"] = g.width if kept is None else int(len(kept))
            d["kept"] = None if kept is None else [int(i) for i in kept]
            if g.id in plan.ratios:
                d["ratio"], d["ratio_source"] = plan.ratios[g.id]
            if g.id in plan.skipped:
                d["skipped"] = plan.skipped[g.id]
        out.append(d)
    return out

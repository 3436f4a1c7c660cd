"""What the user reads: tables, the JSON report, and the progress line of long work."""
from __future__ import annotations

import sys
import time
from collections import Counter

import numpy as np

from onnxprune.core.groups import Group, isomorphic_sets


class Progress:
    """One status line on stderr for long work (benchmark runs, recovery levels,
    training steps): redrawn in place on a terminal at most once a second; a full
    line at most every 10 s in a log file. ``force`` writes now (and ends the line
    on a terminal). Runs shorter than ``quiet_s`` seconds print nothing."""

    def __init__(self, label: str = "", total: int = 0, enabled: bool = True, quiet_s: float = 0.0):
        self.label, self.total, self.enabled, self.quiet_s = label, total, enabled, quiet_s
        self.t0, self.last, self.open = time.perf_counter(), None, False
        self.tty = sys.stderr.isatty()

    def show(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force:
            if self.last is not None and now - self.last < (1.0 if self.tty else 10.0):
                return
            if now - self.t0 < self.quiet_s:
                return
        self.last = now
        if self.tty:
            sys.stderr.write("\r" + text + (" \n" if force else " "))
            self.open = not force
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def step(self, done: int, what: str = "", force: bool = False) -> None:
        """``done`` of ``total`` units: percent, time elapsed, time left; the last
        unit always shows if anything was shown before."""
        el = time.perf_counter() - self.t0
        finished = done >= self.total > 0
        left = el / max(done, 1) * max(self.total - done, 0)
        text = (f"{self.label}: {done}/{self.total} ({100 * done // max(self.total, 1)}%)  {el:.0f}s elapsed, ~{left:.0f}s left"
                + (f"  {what}" if what else ""))
        self.show(text, force=force or (finished and self.last is not None))


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


def groups_json(groups: list[Group], plan=None, scores=None) -> list[dict]:
    out = []
    if scores is None and plan is not None:
        scores = plan.importance
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
        if scores is not None and g.id in scores.values:
            d["criterion"] = scores.used.get(g.id)
            d["scores"] = [float(x) for x in scores.values[g.id]]
            if g.id in scores.notes:
                d["criterion_note"] = scores.notes[g.id]
            if g.id in scores.gohsp:
                d["gohsp"] = scores.gohsp[g.id]
        out.append(d)
    return out


def scores_table(groups: list[Group], scores) -> str:
    rows = []
    for name, gs in isomorphic_sets(groups).items():
        vals = [scores.values[g.id] for g in gs if g.id in scores.values]
        if not vals:
            continue
        allv = np.concatenate(vals)
        used = sorted({scores.used.get(g.id, "?") for g in gs if g.id in scores.values})
        rows.append([name, gs[0].kind, "+".join(used), len(allv), f"{allv.min():.3g}", f"{np.median(allv):.3g}", f"{allv.max():.3g}",
                     sum(1 for g in gs if g.id in scores.notes)])
    return table(rows, ["isomorphic set", "kind", "criterion", "channels", "min", "median", "max", "fallbacks"])


def plot_scores(groups: list[Group], scores, path: str) -> None:
    """One panel per isomorphic set: the sorted channel scores of each of its groups."""
    from onnxprune.errors import UserError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'onnxprune[plot]'") from None
    sets = [(n, gs) for n, gs in isomorphic_sets(groups).items() if any(g.id in scores.values for g in gs)]
    if not sets:
        raise UserError("no prunable group to plot")
    cols = min(3, len(sets))
    rows = (len(sets) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, gs) in zip(axes.ravel(), sets):
        for g in gs:
            if g.id in scores.values:
                v = np.sort(scores.values[g.id])[::-1]
                ax.plot(np.linspace(0, 1, len(v)), v, lw=0.8, alpha=0.7)
        crit = "+".join(sorted({scores.used.get(g.id, "?") for g in gs if g.id in scores.values}))
        ax.set_title(f"{name} ({crit}, {len(gs)} groups)", fontsize=8)
        ax.set_xlabel("channel rank (fraction of width)", fontsize=7)
        ax.set_ylabel("score", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(sets):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def target_text(t: dict) -> str:
    """One line on the target a plan was solved for: a latency target (what was
    timed), a damage-scope budget (what the search measured) or a MACs/params
    budget (the ratios' scale)."""
    if t.get("metric") == "latency":
        rt = t["runtime"]
        met = "met" if t["met"] else "NOT met (the fastest candidate measured is kept)"
        return (f"target_latency {t['requested']}: {100 * t['target_ratio']:.1f}% of the original's time wanted, "
                f"{100 * t['achieved_ratio']:.1f}% measured ({t['original_ms']:.2f} -> {t['pruned_ms']:.2f} ms, "
                f"{rt['provider']}, batch {rt['batch']}, {rt['threads']} threads), {met}; MACs "
                f"{100 * t['macs_fraction']:.1f}% of the original, widths rounded to {t.get('round_to', 1)}, "
                f"{t['candidates']} candidates timed ({len(t['evaluations'])} measurements)")
    if t.get("scope") == "damage":
        met = "" if t["met"] else " (NOT met: every group at its limit)"
        return (f"target_{t['metric']} {t['requested']}: {human(t['target'])} wanted, {human(t['achieved'])} "
                f"reached{met}; scope damage: {t['steps']} steps chosen by measured output damage "
                f"({t['damage']:.4g} on {t['samples']} calibration samples), {t['measurements']} candidates "
                f"measured in {t['seconds']:.0f}s"
                + (f" ({t['partial_runs']} run from the first node they edit)" if t.get("partial_runs") else "")
                + (f"; the last {t['unmeasured']} steps taken on the damages last measured (the search's budget of "
                   f"{t['max_measurements']} measurements spent)" if t.get("unmeasured") else ""))
    used = t["ratios_used"]
    parts = [f"default {used['default']:.4f}"] if used.get("default") else []
    for key in ("kinds", "sets", "layers"):
        parts += [f"{key}[{k}] {v:.4f}" for k, v in used.get(key, {}).items()]
    return (f"target_{t['metric']} {t['requested']}: {human(t['target'])} wanted, {human(t['achieved'])} reached "
            f"({100 * t['error']:+.2f}%), ratios x{t['scale']:.4f}: {', '.join(parts) or 'none'}")


def oracle_table(rows) -> str:
    """The zero-contribution oracle's rows as a table."""
    return "zero-contribution oracle (max relative error, tolerance 1e-4):\n" + table(
        [[r.scope, r.kind, r.groups, r.removed, "-" if r.max_rel_err is None else f"{r.max_rel_err:.2e}", r.status] for r in rows],
        ["set", "kind", "groups", "removed", "max rel err", "status"])


def prune_report(res) -> dict:
    """The JSON report of one prune run (an :class:`onnxprune.api.PruneResult`):
    what went in, the plan per group, params/MACs, checks, oracle rows, budget,
    latency and recovery."""
    plan, job = res.plan, res.job
    return {
        "input": res.input,
        "output": res.output,
        "ratios": res.ratios if res.ratios is not None else plan.ratios_given,
        "plan_file": res.plan_file,
        "before": res.before,
        "after": res.after,
        "checks": res.checks,
        "groups": groups_json(job.groups, plan),
        "sets": {k: [g.id for g in v] for k, v in job.sets.items()},
        "oracle": [r.as_dict() for r in res.oracle],
        "target": plan.target,
        "latency": [r.as_dict() for r in res.latency],
        "speedup": round(res.speedup, 4) if res.speedup is not None else None,  # per image, pruned vs original
        "efficiency": round(res.efficiency, 4) if res.efficiency is not None else None,  # speed-up / MACs reduction
        "recovery": [r.as_dict() for r in res.recovery],
        # time split (run_s: ONNX Runtime, fit_s: statistics and solves, refit_all_s: the second pass) and
        # held_out: the whole-model check on kept-out calibration sources
        "recovery_stats": dict(res.recovery_stats),
        "notes": list(res.notes),
        "seconds": round(res.seconds, 3),
    }

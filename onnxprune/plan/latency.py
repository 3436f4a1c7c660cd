"""``target_latency``: a plan whose latency, measured on the user's runtime, meets a budget.

MACs do not predict latency well (memory-bound layers, widths a kernel handles
badly, fixed per-op costs), so the budget is met by measuring: the search runs
over the MACs fraction of the ordinary ``target_macs`` planner (the same
scores and scope), and each candidate is rewritten in memory and timed in ONNX
Runtime **against the original in the same interleaved run**, so the measured
ratio is immune to drift of a shared machine. The search interpolates on the
measured (MACs fraction, latency ratio) points, monotone in the MACs fraction,
and stops when a candidate is within ``TOLERANCE`` below the target; the plan
kept is the measured candidate that meets the target with the most MACs left.

Measured points can be kept in a JSON table (``--latency-table FILE``), keyed
by the model, the runtime (provider, batch, threads) and the ratios; a later
run starts its search from them and only confirms by measuring.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np

from onnxprune.errors import UserError

log = logging.getLogger(__name__)

# round_to a latency target uses unless the ratios set one: on the CPU EP, convnext_atto at 70% of its
# MACs took 1.11x the original's time with widths rounded to 1 and 0.77x rounded to 8 (16 and 32: the
# same as 8); `python tools/latency_budget.py` measures it. GPU kernels also prefer multiples of 8.
ROUND_TO = {"cpu": 8, "cuda": 8, "tensorrt": 8}
TOLERANCE = 0.03  # a candidate within 3% below the target ratio ends the search
MAX_EVALS = 7


@dataclass
class Runtime:
    """Where latency is measured: what ``onnxprune bench`` takes."""
    provider: str = "cpu"
    batch: int | None = None
    threads: int | None = None
    warmup: int = 5
    runs: int = 30
    input_shapes: dict | None = None

    def key(self) -> dict:
        from onnxprune.runtime.bench import DEFAULT_BATCH

        return {"provider": self.provider, "batch": self.batch or DEFAULT_BATCH.get(self.provider, 8),
                "threads": self.threads or os.cpu_count() or 1}


def parse_latency(requested) -> tuple[str, float]:
    """``("ratio", r)`` for ``"60%"`` / ``0.6``, ``("ms", t)`` for ``"12ms"``."""
    if isinstance(requested, bool):
        raise UserError(f"target_latency must be a fraction, 'N%' or 'N ms', got {requested!r}")
    if isinstance(requested, (int, float)):
        if not 0 < requested <= 1:
            raise UserError(f"target_latency as a number is a fraction of the original's latency in (0, 1], got {requested}")
        return "ratio", float(requested)
    if isinstance(requested, str):
        s = requested.strip().lower().replace(" ", "")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(%|ms)", s)
        if m:
            v = float(m.group(1))
            if m.group(2) == "%":
                if not 0 < v <= 100:
                    raise UserError(f"target_latency {requested!r}: a percentage must be in (0, 100]")
                return "ratio", v / 100
            if v <= 0:
                raise UserError(f"target_latency {requested!r} must be positive")
            return "ms", v
    raise UserError(f"target_latency must be a fraction, 'N%' or 'N ms' (e.g. '60%', '12ms'), got {requested!r}")


def model_key(proto) -> str:
    """A digest of the model's graph and weights (the table is per model)."""
    h = hashlib.sha256()
    h.update(proto.graph.SerializeToString())
    return h.hexdigest()[:16]


def _table_key(model: str, rt: Runtime, ratios: dict) -> str:
    return json.dumps({"model": model, **rt.key(), "ratios": ratios}, sort_keys=True)


def _read(path: str) -> dict[str, list[tuple[float, float]]]:
    """A latency table: ``{key: [(MACs fraction, latency ratio), ...]}``, checked."""
    try:
        with open(path) as f:
            data = json.load(f)
        return {k: [(float(a), float(b)) for a, b in pts] for k, pts in data.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        raise UserError(f"{path}: not a latency table written by onnxprune") from None


def read_table(path: str | None, key: str) -> list[tuple[float, float]]:
    """The points measured under ``key`` (none without a table file)."""
    return _read(path).get(key, []) if path and os.path.exists(path) else []


def load_table(path: str) -> list[dict]:
    """Every curve in a latency table: its runtime, ratios, model digest and points."""
    if not os.path.isfile(path):
        raise UserError(f"no such latency table: {path}")
    out = []
    for k, pts in _read(path).items():
        e = json.loads(k)
        out.append({**e, "points": list(pts) if "nodes" in e else sorted(pts)})
    return out


def _axis(e: dict) -> str:
    """What a curve's first coordinate is: the MACs fraction, or the time the per-node model predicts."""
    return "predicted time" if isinstance(e.get("ratios"), dict) and e["ratios"].get("search") == "predicted ms" else "MACs"


def table_text(entries: list[dict]) -> str:
    from onnxprune.report import table

    parts = []
    for e in entries:
        if "nodes" in e:  # a per-node table (the latency model of scope damage)
            full = [a for a, _ in e["points"] if a >= 0]
            ref = [b for _, b in e["points"] if b >= 0]
            parts.append(f"model {e['model']}, {e['provider']} batch {e['batch']}, {e['threads']} threads: per-node times "
                         f"({len(full)} of {len(e['points'])} nodes timed alone): {sum(full):.2f} ms at full width, "
                         f"{sum(ref):.2f} ms with every group halved")
            continue
        budget = {k: v for k, v in e["ratios"].items() if v not in (None, {}, [], 0.0)} if isinstance(e.get("ratios"), dict) else {}
        parts.append(f"model {e['model']}, {e['provider']} batch {e['batch']}, {e['threads']} threads, ratios "
                     f"{json.dumps(budget, sort_keys=True)}:\n" + table(
                         [[f"{100 * a:.1f}%", f"{100 * b:.1f}%", f"{b and a / b:.2f}"] for a, b in e["points"]],
                         [_axis(e), "latency", f"{_axis(e)} / latency"]))
    return "\n\n".join(parts) if parts else "(empty table)"


def _figure(size):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'onnxprune[plot]'") from None
    fig, ax = plt.subplots(figsize=size)
    return plt, fig, ax


def _save(plt, fig, ax, path: str, xlabel: str, ylabel: str, legend: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_table(entries: list[dict], path: str) -> None:
    plt, fig, ax = _figure((6, 4.2))
    for e in (e for e in entries if "nodes" not in e):
        xs, ys = zip(*e["points"]) if e["points"] else ((), ())
        ax.plot([100 * x for x in xs], [100 * y for y in ys], "o-",
                label=f"{e['model'][:8]} {e['provider']} b{e['batch']} ({_axis(e)})")
    ax.plot([0, 100], [0, 100], ls="--", lw=0.8, color="grey", label="latency proportional to MACs")
    _save(plt, fig, ax, path, "MACs (or predicted time), % of the original", "measured latency, % of the original", 8)


def write_table(path: str | None, key: str, points: list[tuple[float, float]]) -> None:
    _store(path, key, sorted(set(points)))


def _store(path: str | None, key: str, value: list) -> None:
    """Keep ``value`` under ``key`` in the table file ``path`` (other keys stay)."""
    if not path:
        return
    data = _read(path) if os.path.exists(path) else {}
    data[key] = value
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def slow_head_dims(groups, keep: dict[int, np.ndarray]) -> list[int]:
    """Kept head dims that fused attention kernels do not take: onnxruntime's
    CUDA flash and memory-efficient attention need a head size that is a
    multiple of 8 (flash: at most 256), else the op falls back to the unfused path."""
    return sorted({len(keep[g.id]) for g in groups if g.kind == "head_dim" and g.id in keep
                   and (len(keep[g.id]) % 8 or len(keep[g.id]) > 256)})


# -- the per-node latency model ----------------------------------------------------------
REFERENCE_KEEP = 0.5  # the second width each node is timed at: every prunable group halved


def reference_keep(groups, round_to: int = 8) -> dict[int, np.ndarray]:
    """The plan each node is timed under a second time: every prunable group
    keeps half its channels (a multiple of ``round_to`` where the group is
    wide enough; whole heads for heads)."""
    keep = {}
    for g in groups:
        if g.frozen or g.width < 2:
            continue
        n = max(1, int(g.width * REFERENCE_KEEP))
        if g.kind != "heads" and round_to > 1 and n >= round_to:
            n = n // round_to * round_to
        keep[g.id] = np.arange(n)
    return keep


class NodeModel:
    """Predicted latency of a plan: the sum over nodes of each node's time
    alone (:func:`onnxprune.runtime.nodetime.node_times`), measured at full
    width (``full``) and under :func:`reference_keep` (``ref``, where the node
    had ``ref_work`` of its work left), and linear in between in the node's
    share of work left (``Estimator.node_work``): ``t = t_full - slope * (1 - work)``,
    so what a node costs whatever its width (a fixed per-op cost, a kernel
    that does not speed up) stays. A node that could not be timed costs
    nothing; a node that timed slower when narrower costs the same at any width."""

    def __init__(self, estimator, full: list, ref: list, ref_work: np.ndarray) -> None:
        self.estimator = estimator
        t1 = np.array([x if x is not None and x >= 0 else 0.0 for x in full])
        t2 = np.array([x if x is not None and x >= 0 else t1[j] for j, x in enumerate(ref)])
        gap = 1.0 - np.asarray(ref_work, dtype=float)
        slope = np.divide(t1 - t2, gap, out=np.zeros_like(t1), where=gap > 1e-6)
        self.t_full, self.slope = t1, np.clip(slope, 0.0, None)
        self.before_ms = float(t1.sum())

    def node_ms(self, keep: dict[int, np.ndarray]) -> np.ndarray:
        work = self.estimator.node_work(keep)
        return np.maximum(self.t_full - self.slope * (1.0 - work), 0.0)

    def ms(self, keep: dict[int, np.ndarray]) -> float:
        return float(self.node_ms(keep).sum())

    def estimate(self, keep: dict[int, np.ndarray]) -> dict:
        """The estimator's counts and the predicted milliseconds (``"ms"``)."""
        return {**self.estimator.estimate(keep), "ms": self.ms(keep)}


WIDTHS = (1.0, 0.75, 0.5, 0.25)  # the widths the per-set view predicts


def _narrowed(groups, frac: float, round_to: int) -> dict[int, np.ndarray]:
    keep = {}
    for g in groups:
        if g.frozen or g.width < 2:
            continue
        n = max(1, int(round(g.width * frac)))
        if g.kind != "heads" and round_to > 1 and n >= round_to:
            n = n // round_to * round_to
        if n < g.width:
            keep[g.id] = np.arange(n)
    return keep


def set_curves(model: NodeModel, sets: dict, round_to: int = 8, widths=WIDTHS) -> list[dict]:
    """Per isomorphic set: the predicted latency of the whole model (a fraction
    of the original's) when every group of that set alone keeps each of
    ``widths`` of its channels, and the MACs left at the narrowest; sorted by
    the time the narrowest width saves."""
    base = model.before_ms or 1.0
    macs0 = model.estimator.before["macs"] or 1
    rows = []
    for name, groups in sets.items():
        live = [g for g in groups if not g.frozen and g.width > 1]
        if not live:
            continue
        keeps = [_narrowed(live, w, round_to) for w in widths]
        rows.append({"set": name, "kind": live[0].kind, "groups": len(live), "width": live[0].width,
                     "widths": list(widths), "latency": [model.ms(k) / base for k in keeps],
                     "macs": [model.estimator.estimate(k)["macs"] / macs0 for k in keeps]})
    rows.sort(key=lambda r: r["latency"][-1])
    return rows


def curves_text(rows: list[dict]) -> str:
    from onnxprune.report import table

    if not rows:
        return "(no prunable set)"
    widths = rows[0]["widths"]
    head = ["set", "kind", "groups", "width"] + [f"time at {100 * w:.0f}%" for w in widths[1:]] + [
        f"MACs at {100 * widths[-1]:.0f}%", "time saved / MACs saved"]
    body = []
    for r in rows:
        saved_t, saved_m = 1 - r["latency"][-1], 1 - r["macs"][-1]
        body.append([r["set"], r["kind"], str(r["groups"]), str(r["width"])] + [f"{100 * x:.1f}%" for x in r["latency"][1:]]
                    + [f"{100 * r['macs'][-1]:.1f}%", f"{saved_t / saved_m:.2f}" if saved_m > 0 else "-"])
    return ("predicted latency of the whole model (per-node times, % of the original's) when one set alone is narrowed:\n"
            + table(body, head))


def plot_curves(rows: list[dict], path: str, top: int = 12) -> None:
    plt, fig, ax = _figure((6.5, 4.5))
    for r in rows[:top]:
        ax.plot([100 * w for w in r["widths"]], [100 * x for x in r["latency"]], "o-", label=f"{r['set'][:28]} ({r['kind']})")
    _save(plt, fig, ax, path, "width kept by the set, %", "predicted latency of the model, % of the original", 7)


def nodes_key(model: str, rt: Runtime) -> str:
    return json.dumps({"model": model, **rt.key(), "nodes": "alone, full and every group halved"}, sort_keys=True)


def read_nodes(path: str | None, key: str, n: int) -> tuple[list, list] | None:
    """Per-node times kept in a latency table under ``key``: (full, reference), or None."""
    pts = _read(path).get(key) if path and os.path.exists(path) else None
    if not pts or len(pts) != n:
        return None
    return [a if a >= 0 else None for a, _ in pts], [b if b >= 0 else None for _, b in pts]


def write_nodes(path: str | None, key: str, full: list, ref: list) -> None:
    _store(path, key, [(-1.0 if a is None else round(a, 5), -1.0 if b is None else round(b, 5)) for a, b in zip(full, ref)])


def next_fraction(points: list[tuple[float, float]], want: float, lo: float) -> float:
    """The MACs fraction at which the latency ratio should be ``want``: linear
    interpolation between the measured points that bracket it (with (1, 1) as
    an anchor), on the points made monotone; below every point, the line
    through the two lowest (a fixed cost does not shrink with the MACs), but
    never past half the lowest fraction measured: near a model's latency floor
    two noisy readings give a line so flat that it points at nothing left."""
    pts = sorted(set(points) | {(1.0, 1.0)})
    xs = np.array([p[0] for p in pts])
    ys = np.maximum.accumulate(np.array([p[1] for p in pts]))  # latency does not fall as MACs grow
    if want <= ys[0]:
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0]) if len(xs) > 1 and xs[1] > xs[0] else 0.0
        f = xs[0] + (want - ys[0]) / slope if slope > 0 else xs[0] * want / max(ys[0], 1e-9)
        f = max(f, xs[0] / 2)
    else:
        f = float(np.interp(want, ys, xs))
    return float(min(max(f, lo), 0.999))


def solve(plan_at, measure, requested, rt: Runtime, table: str | None = None, table_model: str = "",
          ratios: dict | None = None, progress=None):
    """The plan meeting ``requested``. ``plan_at(f)`` plans at MACs fraction ``f``
    (returns the plan and its achieved fraction); ``measure(plan)`` returns
    ``(original ms, candidate ms, latency ratio)`` timed side by side (the ratio
    per image, the median over rounds of the paired runs). Returns ``(plan, info)``."""
    unit, value = parse_latency(requested)
    key = _table_key(table_model, rt, ratios or {})
    points = read_table(table, key)
    evals, best, orig_ms = [], None, None
    want = value if unit == "ratio" else None
    lo = 0.02
    for i in range(MAX_EVALS):
        if want is None:  # an absolute target needs the original's time first: measured with the first candidate
            f = 0.9
        else:
            aim = want - TOLERANCE / 2  # the middle of the band that ends the search
            f = next_fraction(points, aim, lo) if points else want
        if any(abs(f - e["macs_fraction_asked"]) < 1e-4 for e in evals):
            break  # the interpolation returns to a point already measured
        got = plan_at(f)  # (plan, search fraction[, MACs fraction when the search runs over another measure])
        plan, achieved = got[0], got[1]
        macs = got[2] if len(got) > 2 else achieved
        o_ms, c_ms, r = measure(plan)
        orig_ms = o_ms if orig_ms is None else orig_ms
        if want is None:
            want = value / o_ms
            if want >= 1:
                raise UserError(f"target_latency {requested}: the original already takes {o_ms:.2f} ms "
                                f"({rt.provider}, batch {rt.key()['batch']})")
        evals.append({"macs_fraction_asked": f, "macs_fraction": macs, "original_ms": o_ms, "pruned_ms": c_ms,
                      "latency_ratio": r, **({"fraction": achieved} if len(got) > 2 else {})})
        if abs(r - want) <= TOLERANCE:  # near the target, where noise decides: a second measurement, averaged
            o2, c2, r2 = measure(plan)
            evals.append({**evals[-1], "original_ms": o2, "pruned_ms": c2, "latency_ratio": r2, "repeat": True})
            o_ms, c_ms, r = (o_ms + o2) / 2, (c_ms + c2) / 2, (r + r2) / 2
        points.append((round(achieved, 6), round(r, 6)))
        if progress:
            progress(f"latency search {i + 1}: MACs {100 * macs:.1f}% -> {100 * r:.1f}% of the original's time "
                     f"(target {100 * want:.1f}%)")
        if r <= want and (best is None or achieved > best[1]):
            best = (plan, achieved, r, o_ms, c_ms, macs)
        if want - TOLERANCE <= r <= want:
            break
    met = best is not None
    if best is None:  # nothing met it: the fastest candidate, said so
        k = int(np.argmin([e["latency_ratio"] for e in evals]))
        e = evals[k]
        best = (plan_at(e["macs_fraction_asked"])[0], e.get("fraction", e["macs_fraction"]), e["latency_ratio"],
                e["original_ms"], e["pruned_ms"], e["macs_fraction"])
    candidates = sum(not e.get("repeat") for e in evals)
    write_table(table, key, points)
    plan, achieved, r, o_ms, c_ms, macs = best
    info = {"metric": "latency", "requested": requested, "target_ratio": want, "achieved_ratio": r,
            "original_ms": o_ms, "pruned_ms": c_ms, "macs_fraction": macs, "met": met,
            "runtime": rt.key(), "evaluations": evals, "candidates": candidates, "table": table}
    return plan, info

"""``onnxprune bench``: latency of ONNX models in ONNX Runtime, measured fairly.

Protocol (the latency protocol of Isomorphic Pruning's supplementary material: fixed batch, warm-up, then timed runs;
defaults CPU batch 8, GPU batch 256, 20 warm-up and 100 timed runs):

* one session per model, created up front with the same provider and threads;
* every model is warmed up, then the timed runs are **interleaved**: round
  ``r`` times one run of each model, in an order rotated every round, so drift
  of a shared machine (other jobs, clocks, thermal) hits every model alike;
* latency is the wall time of ``session.run`` on a fixed random batch
  (inputs created once, outside the timing); median and p90 are reported;
  throughput is ``batch / median``, speed-up is per image against the first model.

Models with a static batch dimension run at that batch (the row says so);
speed-ups are per image, so they stay comparable.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnxprune import io
from onnxprune.core import metrics
from onnxprune.io.protowire import read_skeleton
from onnxprune.errors import UserError
from onnxprune.report import Progress
from onnxprune.runtime import PROVIDERS, random_inputs, session

log = logging.getLogger(__name__)

DEFAULT_BATCH = {"cpu": 8, "cuda": 256, "tensorrt": 256}


@dataclass
class BenchRow:
    name: str
    batch: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    throughput: float  # images / s
    params: int
    macs: int  # per image (batch 1)
    file_mb: float | None
    speedup: float = 1.0  # per image, against the first model
    provider: str = ""
    threads: int = 0
    runs: int = 0
    times_ms: list = field(default_factory=list, repr=False)

    def as_dict(self, with_times: bool = False) -> dict:
        d = asdict(self)
        if not with_times:
            d.pop("times_ms")
        return d


def _proto(m) -> tuple[onnx.ModelProto, str, float | None, str | None]:
    """(proto, display name, file size MB, path) of a path or an in-memory model."""
    name = None
    if isinstance(m, tuple):  # (name, proto | path)
        name, m = m
        if isinstance(m, onnx.ModelProto):
            return m, name, m.ByteSize() / 1e6, None
    if isinstance(m, onnx.ModelProto):
        return m, m.graph.name or "model", m.ByteSize() / 1e6, None
    io.read_model(m)  # one-line errors for a missing or non-ONNX file
    proto = read_skeleton(m)  # weights stay on disk: ORT reads the file itself
    size = os.path.getsize(m)
    data = os.path.join(os.path.dirname(m), os.path.basename(m) + ".data")
    if os.path.exists(data):
        size += os.path.getsize(data)
    return proto, name or os.path.basename(m), size / 1e6, m


def with_shapes(proto: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """A copy whose inputs take the given dims (a non-integer dim stays symbolic)."""
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    for i in p.graph.input:
        if i.name in shapes:
            dims = i.type.tensor_type.shape.dim
            if len(dims) != len(shapes[i.name]):
                raise UserError(f"--input-shape {i.name}: {len(shapes[i.name])} dims given, the input has {len(dims)}")
            for d, want in zip(dims, shapes[i.name]):
                if isinstance(want, int):
                    d.dim_value = want
                else:
                    d.dim_param = str(want)
    return p


def bench(
    models: list,
    batch: int | None = None,
    provider: str = "cpu",
    threads: int | None = None,
    warmup: int = 20,
    runs: int = 100,
    progress: bool = True,
    seed: int = 0,
    input_shapes: dict | None = None,
) -> list[BenchRow]:
    """Latency of each model (a path, a ModelProto or ``(name, proto)``);
    ``input_shapes`` ``{name: [dims]}`` fixes dynamic input dims (the batch comes from ``batch``)."""
    if provider not in PROVIDERS:
        raise UserError(f"unknown provider '{provider}' (cpu, cuda, tensorrt)")
    if not models:
        raise UserError("bench needs at least one model")
    if runs < 1 or warmup < 0:
        raise UserError("--runs must be >= 1 and --warmup >= 0")
    batch = batch or DEFAULT_BATCH[provider]
    threads = threads or os.cpu_count() or 1  # fixed, so runs are comparable
    entries = []
    for m in models:
        proto, name, size, path = _proto(m)
        if input_shapes:
            proto = with_shapes(proto, input_shapes)
        static = io.static_batch(proto)
        b = static if static is not None else batch
        if static is not None and static != batch:
            log.warning("%s has a static batch of %d: timed at batch %d (speed-up is per image)", name, static, static)
        feeds = random_inputs(proto, batch=b, seed=seed)
        sess = session(path or proto, threads, provider)
        counts = metrics.count(proto)
        if static and static > 1:  # counted at the static batch: report per image
            counts = {"params": counts["params"], "macs": counts["macs"] // static}
        entries.append((name, b, sess, feeds, counts, size))
    bar = Progress("bench", len(entries) * (warmup + runs), progress, quiet_s=2.0)
    done = 0
    for name, b, sess, feeds, *_ in entries:
        for _ in range(warmup):
            sess.run(None, feeds)
            done += 1
            bar.step(done)
    times = [[] for _ in entries]
    n = len(entries)
    for r in range(runs):
        for j in range(n):
            k = (j + r) % n  # rotate the order every round
            _, _, sess, feeds, _, _ = entries[k]
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[k].append((time.perf_counter() - t0) * 1e3)
            done += 1
            bar.step(done)
    rows = []
    for (name, b, sess, _, counts, size), ts in zip(entries, times):
        a = np.asarray(ts)
        med = float(np.median(a))
        rows.append(BenchRow(
            name=name, batch=b, median_ms=med, p90_ms=float(np.percentile(a, 90)), mean_ms=float(a.mean()),
            min_ms=float(a.min()), throughput=b / med * 1e3, params=counts["params"], macs=counts["macs"],
            file_mb=size, provider=sess.get_providers()[0], threads=threads, runs=runs, times_ms=[round(x, 4) for x in ts],
        ))
    for r in rows:
        r.speedup = r.throughput / rows[0].throughput
    return rows


def table(rows: list[BenchRow]) -> str:
    from onnxprune.report import human, table as tab

    first = rows[0]
    body = []
    for r in rows:
        body.append([
            r.name, r.batch, f"{r.median_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.throughput:.1f}",
            human(r.params), human(r.macs), "-" if r.file_mb is None else f"{r.file_mb:.1f}",
            f"{first.macs / r.macs:.2f}x" if r.macs else "-", f"{r.speedup:.2f}x",
        ])
    return tab(body, ["model", "batch", "median ms", "p90 ms", "img/s", "params", "MACs", "MB", "MACs red.", "speed-up"])


def plot(rows: list[BenchRow], path: str, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'onnxprune[plot]'") from None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [r.macs / 1e9 for r in rows]
    ys = [r.median_ms / r.batch for r in rows]
    ax.scatter(xs, ys, zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if rows[0].macs:  # the line a latency proportional to MACs would follow
        k = ys[0] / xs[0]
        lim = max(xs) * 1.05
        ax.plot([0, lim], [0, k * lim], ls="--", lw=0.8, color="grey", label="proportional to MACs")
        ax.legend(fontsize=8)
    ax.set_xlabel("GMACs per image (batch 1 count)")
    ax.set_ylabel(f"median latency per image, ms ({rows[0].provider}, batch {rows[0].batch})")
    ax.set_title(title or "latency vs MACs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""``onnxprune bench``: ORT latency, throughput, params and MACs of models, timed interleaved (or a saved latency table)."""
from __future__ import annotations

import argparse
import json
import os

from onnxprune.cli.common import bench_opts, common, say, shape_opt, shapes
from onnxprune.errors import UserError

NAME = "bench"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxprune bench", description="ORT latency, throughput, params, MACs and speed-up "
                                "against the first model; runs are interleaved across models.")
    p.add_argument("models", nargs="*")
    p.add_argument("--table", help="show a latency table written by a target_latency run (--latency-table) instead "
                   "of timing models; with --plot, draw latency against MACs")
    bench_opts(p)
    p.add_argument("--json", help="write the rows (with every timing) as JSON here")
    p.add_argument("--plot", help="write a latency-vs-MACs plot (PNG) here")
    shape_opt(p)
    common(p)
    return p


def run(args) -> str:
    from onnxprune import api

    if args.table:
        if args.models:
            raise UserError("give models to time, or --table to show a latency table, not both")
        entries = api.latency_table(args.table)
        say(args, api.latency_table_text(entries))
        if args.plot:
            api.latency_table_plot(entries, args.plot)
        return f"{len(entries)} latency curves, {sum(len(e['points']) for e in entries)} measured points in {args.table}"
    if not args.models:
        raise UserError("bench needs at least one model (or --table FILE)")
    for m in args.models:
        if not os.path.isfile(m):
            raise UserError(f"no such model file: {m}")
    rows = api.bench(args.models, batch=args.batch, provider=args.provider, threads=args.threads,
                 warmup=args.warmup, runs=args.runs, progress=not args.quiet, input_shapes=shapes(args))
    say(args, api.bench_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict(with_times=True) for r in rows], f, indent=1)
    if args.plot:
        api.bench_plot(rows, args.plot)
    best = max(rows, key=lambda r: r.speedup)
    return f"{len(rows)} models, {rows[0].provider} batch {rows[0].batch}, best speed-up {best.speedup:.2f}x ({best.name})"

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
                   "of timing models; with --plot, draw latency against MACs. With one MODEL: the per-node latency "
                   "model of that model (nodes timed alone, kept in the table), as the predicted latency when each "
                   "set alone is narrowed")
    bench_opts(p)
    p.add_argument("--json", help="write the rows (with every timing) as JSON here")
    p.add_argument("--plot", help="write a latency-vs-MACs plot (PNG) here")
    shape_opt(p)
    common(p)
    return p


def run(args) -> str:
    from onnxprune import api

    if args.table and args.models:
        if len(args.models) > 1:
            raise UserError("--table with models: give one model (its per-set latency curves), or none (the table's curves)")
        if not os.path.isfile(args.models[0]):
            raise UserError(f"no such model file: {args.models[0]}")
        rt = api.Runtime(args.provider, args.batch, args.threads, args.warmup, args.runs, shapes(args) or None)
        rows = api.latency_widths(args.models[0], rt, args.table, shapes(args) or None,
                                  progress=None if args.quiet else (lambda m: say(args, m)))
        say(args, api.latency_widths_text(rows))
        if args.plot:
            api.latency_widths_plot(rows, args.plot)
        return f"{len(rows)} sets, per-node times in {args.table}"
    if args.table:
        entries = api.latency_table(args.table)
        say(args, api.latency_table_text(entries))
        if args.plot:
            api.latency_table_plot(entries, args.plot)
        curves = [e for e in entries if "nodes" not in e]
        nodes = f", {len(entries) - len(curves)} per-node tables" if len(curves) < len(entries) else ""
        return f"{len(curves)} latency curves, {sum(len(e['points']) for e in curves)} measured points{nodes} in {args.table}"
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

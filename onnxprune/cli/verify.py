"""``onnxprune verify``: the zero-contribution oracle on a model and the plan a prune run would make (or a saved plan)."""
from __future__ import annotations

import argparse
import json
import os

from onnxprune.cli.common import Failed, calib_data, calib_opts, common, say, shape_opt, shapes
from onnxprune.errors import UserError

NAME = "verify"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxprune verify", description="Zero-contribution oracle on your model and plan.")
    p.add_argument("model")
    p.add_argument("--ratios", help="ratios.json or inline JSON: checks the plan a prune run would make")
    p.add_argument("--plan", help="a plan file saved by --save-plan")
    shape_opt(p)
    calib_opts(p)
    p.add_argument("--no-per-set", action="store_true", help="one combined check only")
    p.add_argument("--json", help="write the rows as JSON here")
    common(p)
    return p


def run(args) -> str:
    from onnxprune import api, report

    if bool(args.ratios) == bool(args.plan):
        raise UserError("give --ratios (the plan a prune run would make) or --plan (a saved plan), one of them")
    if not os.path.isfile(args.model):
        raise UserError(f"no such model file: {args.model}")
    ratios = api.load_ratios(args.ratios) if args.ratios else None
    job = api.analyze(args.model, shapes(args, ratios))
    rows = api.verify(job, ratios, args.plan, None if args.plan else calib_data(args, job), per_set=not args.no_per_set,
                      strict=True)
    say(args, report.oracle_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=1)
    tested = [r for r in rows if r.max_rel_err is not None]
    if any(r.status == "FAIL" for r in rows):
        raise Failed("oracle mismatch")
    worst = max((r.max_rel_err for r in tested), default=0.0)
    return f"{len(tested)} checks, max relative error {worst:.2e}"

"""``onnxprune analyze``: list the groups, the isomorphic sets and what is frozen (with --scores, their importance)."""
from __future__ import annotations

import argparse
import json

from onnxprune.cli.common import calib_data, calib_opts, common, say, shape_opt, shapes

NAME = "analyze"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxprune analyze", description="List groups, isomorphic sets and what is frozen.")
    p.add_argument("model")
    p.add_argument("--json", help="write groups as JSON here")
    shape_opt(p)
    p.add_argument("--members", action="store_true", help="print every group with its members")
    p.add_argument("--scores", action="store_true", help="score every group and summarise each isomorphic set")
    p.add_argument("--importance", default="l2", help="criterion for --scores, or JSON {kind: criterion} (default l2)")
    p.add_argument("--plot", help="with --scores: draw the score distribution of each isomorphic set (PNG)")
    calib_opts(p)
    common(p)
    return p


def run(args) -> str:
    from onnxprune import api, report

    a = api.analyze(args.model, shapes(args))
    say(args, report.sets_table(a.groups))
    scores = None
    if args.scores or args.plot:
        imp = json.loads(args.importance) if args.importance.lstrip().startswith("{") else args.importance
        scores = api.scores(a, imp, calib_data(args, a))
        say(args, "\nimportance per isomorphic set:\n" + report.scores_table(a.groups, scores))
        if args.plot:
            report.plot_scores(a.groups, scores, args.plot)
    say(args, "\nfrozen groups:\n" + report.frozen_table(a.groups))
    if args.members:
        for g in a.groups:
            say(args, f"\ngroup {g.id} [{g.kind}] width {g.width} set {g.set_name or '-'}")
            for m in g.tensors:
                say(args, f"   {m.role:5s} {m.node.op_type:12s} {m.value.name} axis {m.axis}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.groups_json(a.groups, scores=scores), f, indent=1)
    n = sum(1 for g in a.groups if not g.frozen)
    if not n:  # say why, as a prune run would
        return f"nothing is prunable: {api.why_nothing(a)}"
    return f"{n} prunable groups in {len(a.sets)} isomorphic sets, {len(a.groups) - n} frozen"

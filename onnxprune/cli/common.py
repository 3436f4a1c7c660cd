"""What the commands share: option groups, the built-in default model and ratios,
output-path checks, printing, and the pipeline commands' helpers (calibration
data, the oracle table, why nothing is prunable)."""
from __future__ import annotations

import argparse
import os
from importlib import resources

from onnxprune.errors import UserError
from onnxprune.io import refuse_overwrite


class Failed(Exception):
    """A command that ran but whose check failed: the verdict line says FAILED, exit ``code``."""

    def __init__(self, what: str, code: int = 2):
        super().__init__(what)
        self.code = code


def default_model() -> str:
    return str(resources.files("onnxprune") / "data" / "default_resnet.onnx")


def default_ratios() -> str:
    return str(resources.files("onnxprune") / "data" / "default_ratios.json")


def shape_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="fix an input's dims (repeatable), e.g. images:1,3,640,640; a name keeps a dim symbolic "
                   "(N,3,640,640); needed when a dim other than the batch is dynamic")


def shapes(args, ratios=None) -> dict:
    from onnxprune.io import parse_input_shapes

    return {**(ratios.input_shapes if ratios is not None else {}), **parse_input_shapes(getattr(args, "input_shape", []))}


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="only the verdict line")


def calib_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", help="calibration data for data-driven importance: DIR (ImageFolder), FILE.npy/.npz "
                   "(x, optional y labels, optional 'source': the photo or text each sample comes from), or 'synthetic'")
    p.add_argument("--calib-batches", type=int, default=4, help="calibration batches (default 4)")
    p.add_argument("--calib-batch-size", type=int, default=32, help="samples per batch (default 32; a static-batch model uses its own)")


def bench_opts(p: argparse.ArgumentParser, runs: int = 100, warmup: int = 20) -> None:
    p.add_argument("--batch", type=int, help="batch size for timing (default: 8 on CPU, 256 on GPU)")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    p.add_argument("--threads", type=int, help="ORT intra-op threads (default: the number of CPU cores)")
    p.add_argument("--warmup", type=int, default=warmup, help=f"warm-up runs per model (default {warmup})")
    p.add_argument("--runs", type=int, default=runs, help=f"timed runs per model (default {runs})")


def say(args, text: str = "") -> None:
    if not getattr(args, "quiet", False):
        print(text)


def check_paths(model: str, output: str, *other_inputs) -> None:
    if not os.path.isfile(model):
        raise UserError(f"model file not found: {model}")
    refuse_overwrite(output, model, *other_inputs)


OUTPUTS = ("output", "report", "save_plan", "json", "plot")


def check_output_folders(args) -> None:
    """Every file a command will write goes into a folder that exists: onnxprune
    creates no folder the user did not ask for."""
    for key in OUTPUTS:
        path = getattr(args, key, None)
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise UserError(f"output folder does not exist: {os.path.dirname(path)} (for --{key.replace('_', '-')} {path})")


def calib_data(args, job):
    if not getattr(args, "calib", None):
        return None
    from onnxprune.plan.importance.calib import load

    return load(args.calib, job.skeleton(), args.calib_batches, args.calib_batch_size)


def why_nothing(job, plan=None) -> str:
    """One line: why a plan removes nothing (without a plan: why the model has nothing to prune)."""
    live = [g for g in job.groups if not g.frozen]
    parts = []
    if not job.groups:
        parts.append("no prunable channel group was found")
    elif not live:
        reasons = sorted({g.frozen[0].split(" at ")[0] for g in job.groups if g.frozen})
        parts.append(f"all {len(job.groups)} groups are frozen ({'; '.join(reasons[:3])})")
    elif plan is None:
        parts.append(f"{len(live)} prunable groups")
    elif all(plan.ratios.get(g.id, (0,))[0] <= 0 or g.id in plan.skipped for g in live):
        parts.append(f"the ratios remove nothing from the {len(live)} prunable groups")
    else:
        parts.append(f"the ratios round to zero channels in the {len(live)} prunable groups")
    if job.ctx.unhandled:
        ops = sorted(job.ctx.unhandled.items(), key=lambda kv: -kv[1])
        parts.append("ops without a rule: " + ", ".join(f"{op} x{n}" for op, n in ops[:6]))
    return "; ".join(parts)


def oracle_table(rows) -> str:
    from onnxprune.report import table

    return "zero-contribution oracle (max relative error, tolerance 1e-4):\n" + table(
        [[r.scope, r.kind, r.groups, r.removed, "-" if r.max_rel_err is None else f"{r.max_rel_err:.2e}", r.status] for r in rows],
        ["set", "kind", "groups", "removed", "max rel err", "status"])

"""What the commands share: option groups, the built-in default model and ratios,
output-path checks, printing, and the pipeline commands' helpers (calibration
data, the oracle table, why nothing is prunable)."""
from __future__ import annotations

import argparse
import os
from importlib import resources

from onnxprune.errors import UserError


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
                   "(N,3,640,640); needed when a dim other than the batch is dynamic and no --calib array gives it")


def shapes(args, ratios=None) -> dict:
    from onnxprune.api import parse_input_shapes

    return {**(ratios.input_shapes if ratios is not None else {}), **parse_input_shapes(getattr(args, "input_shape", []))}


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="only the verdict line")


def calib_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", help="calibration data for data-driven importance and --recover: DIR (a folder of "
                   "images, or of class folders; fewer images than samples wanted give several crops of each), "
                   "FILE.npy/.npz (x, optional y labels, optional 'source': the photo or text each sample comes "
                   "from), or 'synthetic'")
    p.add_argument("--calib-norm", metavar="NORM",
                   help="how the model expects the pixels of --calib DIR images: imagenet (the default: ImageNet "
                   "mean/std), inception ([-1, 1]: TF/Keras, EfficientNet-Lite), unit ([0, 1]: YOLO), raw ([0, 255]) "
                   "or MEAN,MEAN,MEAN/STD,STD,STD on pixels in [0, 1]")
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
    from onnxprune.api import refuse_overwrite

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
    """The --calib data for ``job`` (None without --calib)."""
    if not getattr(args, "calib", None):
        return None
    from onnxprune import api

    return api.calibration(args.calib, job, args.calib_batches, args.calib_batch_size, args.calib_norm)

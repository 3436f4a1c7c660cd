"""What every command shares: argument parsers, the built-in default model and
ratios, output-path checks, printing."""
from __future__ import annotations

import argparse
import os
from importlib import resources

from onnxprune.errors import UserError
from onnxprune.io import refuse_overwrite

SUBCOMMANDS = ("analyze", "verify", "export", "prune", "bench", "finetune", "data", "gohsp")


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


def prune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxprune", description="Structural pruning of ONNX models.",
                                epilog="subcommands: analyze, verify, export, bench, finetune, gohsp, data (onnxprune SUBCOMMAND -h)")
    p.add_argument("model", nargs="?", help="input .onnx (default: the built-in demo ResNet)")
    p.add_argument("--ratios", help="ratios.json path or inline JSON (default: built-in demo ratios)")
    p.add_argument("-o", "--output", help="pruned model path (default: MODEL stem + '.pruned.onnx' in the current directory)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--verify", action="store_true", help="run the zero-contribution oracle on this plan")
    p.add_argument("--recover", nargs="?", const="ridge", choices=["bias", "stats", "ridge"],
                   help="closed-form recovery from --calib data, no labels: re-fit every layer that reads pruned channels "
                   "(ridge, the default), match per-channel output statistics (stats), or fold the removed channels' mean "
                   "into the bias (bias). Fits are judged on calibration sources they did not see (a 'source' array "
                   "in an .npz, else groups of look-alike images); a quarter of the sources checks the whole model")
    p.add_argument("--plan", help="replay a plan file saved by --save-plan (instead of --ratios)")
    p.add_argument("--save-plan", help="write the plan (groups by member names, kept indices) as JSON here")
    shape_opt(p)
    calib_opts(p)
    p.add_argument("--bench", action="store_true", help="measure ORT latency before and after (interleaved; see 'onnxprune bench')")
    bench_opts(p, runs=30, warmup=5)
    p.add_argument("--latency-table", help="with target_latency in the ratios: keep the measured (MACs, latency) points "
                   "in this JSON file and start later searches from them")
    common(p)
    return p


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


def sub_parsers() -> dict[str, argparse.ArgumentParser]:
    a = argparse.ArgumentParser(prog="onnxprune analyze", description="List groups, isomorphic sets and what is frozen.")
    a.add_argument("model")
    a.add_argument("--json", help="write groups as JSON here")
    shape_opt(a)
    a.add_argument("--members", action="store_true", help="print every group with its members")
    a.add_argument("--scores", action="store_true", help="score every group and summarise each isomorphic set")
    a.add_argument("--importance", default="l2", help="criterion for --scores, or JSON {kind: criterion} (default l2)")
    a.add_argument("--plot", help="with --scores: draw the score distribution of each isomorphic set (PNG)")
    calib_opts(a)
    common(a)
    v = argparse.ArgumentParser(prog="onnxprune verify", description="Zero-contribution oracle on your model and plan.")
    v.add_argument("model")
    v.add_argument("--ratios", help="ratios.json or inline JSON: checks the plan a prune run would make")
    v.add_argument("--plan", help="a plan file saved by --save-plan")
    shape_opt(v)
    calib_opts(v)
    v.add_argument("--no-per-set", action="store_true", help="one combined check only")
    v.add_argument("--json", help="write the rows as JSON here")
    common(v)
    e = argparse.ArgumentParser(prog="onnxprune export", description="Export a timm model to ONNX (random init unless --checkpoint).")
    e.add_argument("name", help="timm:<model name>")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    e.add_argument("--opset", type=int)
    e.add_argument("--dynamic-batch", action="store_true")
    e.add_argument("--checkpoint")
    e.add_argument("--img-size", type=int, help="input size (transformers are built for it: position embeddings, windows)")
    e.add_argument("--num-classes", type=int, help="classifier width (default: the model's, 1000 for most timm models)")
    e.add_argument("--batch", type=int, help="static batch size of the export (default 1; ignored shape-wise with --dynamic-batch)")
    common(e)
    b = argparse.ArgumentParser(prog="onnxprune bench", description="ORT latency, throughput, params, MACs and speed-up "
                                "against the first model; runs are interleaved across models.")
    b.add_argument("models", nargs="*")
    b.add_argument("--table", help="show a latency table written by a target_latency run (--latency-table) instead "
                   "of timing models; with --plot, draw latency against MACs")
    bench_opts(b)
    b.add_argument("--json", help="write the rows (with every timing) as JSON here")
    b.add_argument("--plot", help="write a latency-vs-MACs plot (PNG) here")
    shape_opt(b)
    common(b)
    f = argparse.ArgumentParser(prog="onnxprune finetune", description="Fine-tune a (pruned) ONNX model in PyTorch via onnx2torch "
                                "and write the trained tensors back into the same graph.")
    f.add_argument("model", help="the ONNX model to train (e.g. the pruned one)")
    f.add_argument("--data", required=True, help="ImageFolder root with train/<class>/ and val/<class>/ (labelled), or, with "
                   "--teacher, unlabelled data: a folder of images (any layout) or FILE.npy / FILE.npz (one array per input name)")
    f.add_argument("-o", "--output", required=True)
    f.add_argument("--teacher", help="unpruned ONNX model: distil from its logits")
    f.add_argument("--recipe", help="deit | convnext | resnet | mobilenet | swin (the Isomorphic Pruning paper's training recipes) | "
                   "quick | distill (default: quick with labels, distill without: lr 1e-4, no weight decay)")
    f.add_argument("--epochs", type=int)
    f.add_argument("--lr", type=float, help="learning rate (default: the recipe's base lr scaled by batch size)")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--workers", type=int, default=2)
    f.add_argument("--resume", nargs="?", const="auto", help="resume from OUTPUT.ckpt (or the given checkpoint)")
    f.add_argument("--kd-alpha", type=float, default=0.5)
    f.add_argument("--kd-temperature", type=float, default=4.0)
    f.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    f.add_argument("--keep-worse", action="store_true", help="without labels: write the trained weights even when they are "
                   "further from the teacher on the held-out samples than the input's (default: keep the input's)")
    f.add_argument("--minutes", type=float, help="train for this long (the lr schedule is fitted to it; --epochs then unset)")
    f.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--bn-reinsert", choices=["auto", "on", "off"], default="auto",
                   help="train with BatchNorm re-inserted after convolutions, folded back on write-back "
                   "(auto: for CNNs whose BatchNorm was folded away)")
    common(f)
    d = argparse.ArgumentParser(prog="onnxprune data", description="Generate datasets.")
    d.add_argument("kind", choices=["synthetic"])
    d.add_argument("output")
    d.add_argument("--classes", type=int, default=10)
    d.add_argument("--train", type=int, default=300, help="training images per class")
    d.add_argument("--val", type=int, default=60, help="validation images per class")
    d.add_argument("--size", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    common(d)
    h = argparse.ArgumentParser(prog="onnxprune gohsp", description="GOHSP (Yin et al., GOHSP: A Unified Framework of Graph and Optimization-Based Heterogeneous "
                                "Structured Pruning for Vision Transformer): graph-based head ranking, ADMM soft pruning "
                                "toward head/column sparsity, hard pruning by the rewriter, fine-tuning.")
    h.add_argument("model")
    h.add_argument("--data", required=True, help="ImageFolder root with train/ and val/ (also the calibration data)")
    h.add_argument("--ratios", help="kind ratios: heads (mask), head_dim and mlp (columns)")
    h.add_argument("--plan", help="a plan file (--save-plan): its kept heads and columns are the ADMM targets")
    h.add_argument("--sparsity", type=float, help="one overall column sparsity for head_dim and mlp, distributed over "
                   "the layers by Erdos-Renyi as GOHSP does (replaces their ratios; heads still from --ratios)")
    h.add_argument("-o", "--output", required=True)
    h.add_argument("--rho", type=float, default=1e-3, help="ADMM penalty (paper: 0.001)")
    h.add_argument("--lambda", dest="lam", type=float, default=1e-2, help="weight of the masked-heads quadratic term")
    h.add_argument("--admm-epochs", type=int, default=2)
    h.add_argument("--admm-interval", type=int, help="steps between Z/U updates (default: one epoch)")
    h.add_argument("--finetune-epochs", type=int, default=1)
    h.add_argument("--lr", type=float, help="lr of the ADMM phase (default: 0.01 for 'paper', as on ImageNet; for 'quick' finetune's: 1e-3 x batch/64)")
    h.add_argument("--admm-recipe", choices=["paper", "quick"], default="paper",
                   help="ADMM-phase training: 'paper' = SGD momentum 0.9, no weight decay, cross-entropy (as in the GOHSP paper); "
                   "'quick' = finetune's quick recipe (optimiser, lr, label smoothing) with KD from --teacher")
    h.add_argument("--batch-size", type=int, default=64)
    h.add_argument("--teacher", help="distil the fine-tuning from this ONNX model")
    h.add_argument("--max-steps", type=int)
    h.add_argument("--workers", type=int, default=2)
    h.add_argument("--plot", help="plot loss, ||(1-M)W||, ||W-Z|| and accuracy per ADMM epoch (PNG)")
    common(h)
    return {"analyze": a, "verify": v, "export": e, "bench": b, "finetune": f, "data": d, "gohsp": h}


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

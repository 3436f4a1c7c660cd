"""``onnxprune export``: export a timm model to ONNX (random weights unless --checkpoint)."""
from __future__ import annotations

import argparse

from onnxprune.cli.common import common

NAME = "export"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxprune export", description="Export a timm model to ONNX (random init unless --checkpoint).")
    p.add_argument("name", help="timm:<model name>")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    p.add_argument("--opset", type=int)
    p.add_argument("--dynamic-batch", action="store_true")
    p.add_argument("--checkpoint")
    p.add_argument("--img-size", type=int, help="input size (transformers are built for it: position embeddings, windows)")
    p.add_argument("--num-classes", type=int, help="classifier width (default: the model's, 1000 for most timm models)")
    p.add_argument("--batch", type=int, help="static batch size of the export (default 1; ignored shape-wise with --dynamic-batch)")
    common(p)
    return p


def run(args) -> str:
    from onnxprune import api

    api.export_timm(args.name, args.output, args.exporter, args.opset, args.dynamic_batch, args.checkpoint, args.img_size, batch=args.batch, num_classes=args.num_classes)
    return f"exported {args.name} -> {args.output}"

"""``onnxprune data``: generate a dataset (synthetic glyph images in ImageFolder layout)."""
from __future__ import annotations

import argparse

from onnxprune.cli.common import common

NAME = "data"
CHECK_OUTPUT_FOLDERS = False  # its output is a folder it creates


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxprune data", description="Generate datasets.")
    p.add_argument("kind", choices=["synthetic"])
    p.add_argument("output")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train", type=int, default=300, help="training images per class")
    p.add_argument("--val", type=int, default=60, help="validation images per class")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    common(p)
    return p


def run(args) -> str:
    from onnxprune import api

    m = api.make_dataset(args.output, args.classes, args.train, args.val, args.size, args.seed, progress=not args.quiet)
    return f"{m['classes']} classes, {m['train']} train / {m['val']} val images of {m['size']}px ({m['fonts']} fonts) -> {args.output}"

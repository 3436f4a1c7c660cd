"""Data for fine-tuning, calibration and demos.

* ImageFolder directories (``DIR/train/<class>/*.png``, ``DIR/val/<class>/*``)
  loaded with timm's standard transforms at the model's input size;
  normalisation defaults to ImageNet's mean/std (what timm models expect),
  overridable.
* ``onnxprune data synthetic DIR``: an offline image-classification set of
  rendered glyphs (letters/digits in varied fonts, sizes, rotations, colours,
  positions, with background noise and clutter), written as an ImageFolder.
"""
from __future__ import annotations

import glob
import logging
import os
import string

import numpy as np

from onnxprune.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GLYPHS = string.digits + string.ascii_uppercase


def fonts_available() -> list:
    from PIL import ImageFont

    paths = sorted(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))
    paths += sorted(glob.glob("/System/Library/Fonts/*.ttf")) + sorted(glob.glob("C:/Windows/Fonts/*.ttf"))
    fonts = []
    for p in paths[:24]:
        try:
            ImageFont.truetype(p, 20)
            fonts.append(p)
        except OSError:
            pass
    fonts.append(None)  # PIL's built-in scalable font
    return fonts


def _font(path, size):
    from PIL import ImageFont

    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)


def render_glyph(ch: str, size: int, rng: np.random.Generator, fonts: list):
    """One image of glyph ``ch``: random font, size, rotation, offset, colours, noise, clutter."""
    from PIL import Image, ImageDraw, ImageFilter

    big = size * 2
    bg = rng.integers(0, 256, 3)
    fg = (bg + rng.integers(80, 176, 3)) % 256  # keep some contrast
    img = Image.new("RGB", (big, big), tuple(int(x) for x in bg))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):  # clutter lines
        xy = rng.integers(0, big, 4)
        col = tuple(int(x) for x in rng.integers(0, 256, 3))
        d.line([int(v) for v in xy], fill=col, width=int(rng.integers(1, 3)))
    font = _font(fonts[int(rng.integers(len(fonts)))], int(big * rng.uniform(0.45, 0.8)))
    layer = Image.new("L", (big, big), 0)
    ImageDraw.Draw(layer).text((big / 2, big / 2), ch, fill=255, font=font, anchor="mm")
    layer = layer.rotate(float(rng.uniform(-30, 30)), resample=Image.BILINEAR,
                         translate=tuple(int(x) for x in rng.integers(-big // 8, big // 8 + 1, 2)))
    img.paste(Image.new("RGB", (big, big), tuple(int(x) for x in fg)), (0, 0), layer)
    img = img.resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.0))))
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, rng.uniform(2, 18), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_synthetic(out_dir: str, classes: int = 10, train: int = 300, val: int = 60, size: int = 64, seed: int = 0,
                   progress: bool = True) -> dict:
    """Write an ImageFolder of ``classes`` glyph classes; returns a summary."""
    if not 2 <= classes <= len(GLYPHS):
        raise UserError(f"--classes must be in [2, {len(GLYPHS)}]")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir} exists and is not empty")
    rng = np.random.default_rng(seed)
    fonts = fonts_available()
    chars = GLYPHS[:classes]
    total = classes * (train + val)
    done = 0
    for split, n in (("train", train), ("val", val)):
        for c in chars:
            d = os.path.join(out_dir, split, f"class_{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                render_glyph(c, size, rng, fonts).save(os.path.join(d, f"{i:05d}.png"))
                done += 1
                if progress and done % max(1, total // 10) == 0:
                    log.info("synthetic data: %d/%d images", done, total)
    meta = {"kind": "synthetic glyphs", "classes": classes, "train": classes * train, "val": classes * val, "size": size,
            "fonts": len(fonts), "seed": seed, "hflip": False}  # glyphs are not mirror-symmetric
    import json

    with open(os.path.join(out_dir, META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def transforms(size: int, train: bool, recipe=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """timm's standard transforms at ``size``: random-resized crop, flip and the
    recipe's RandAugment / random erasing for training; resize + centre crop for eval."""
    from timm.data import create_transform

    if not train:
        return create_transform(size, is_training=False, mean=mean, std=std, crop_pct=1.0 if size <= 64 else 0.875)
    kw = {}
    if recipe is not None:
        if recipe.randaugment:
            kw["auto_augment"] = recipe.randaugment
        if recipe.random_erasing:
            kw["re_prob"] = recipe.random_erasing
    hflip = 0.5 if recipe is None else recipe.hflip
    return create_transform(size, is_training=True, mean=mean, std=std, hflip=hflip, scale=(0.5, 1.0), **kw)


META = "onnxprune_dataset.json"


def dataset_meta(root: str) -> dict:
    """Facts a dataset directory states about itself (written by ``data synthetic``)."""
    import json

    p = os.path.join(root, META)
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return {}


def image_folder(root: str, split: str, size: int, train: bool, recipe=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    from torchvision.datasets import ImageFolder

    d = os.path.join(root, split)
    if not os.path.isdir(d):
        raise UserError(f"no '{split}' directory under {root} (expected {root}/train/<class>/... and {root}/val/<class>/...)")
    return ImageFolder(d, transform=transforms(size, train, recipe, mean, std))

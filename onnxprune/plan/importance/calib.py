"""Calibration input: ``--calib DIR | FILE.npy | FILE.npz | synthetic``.

* ``DIR``: an ImageFolder root (``DIR/train`` if present, else ``DIR/val``,
  else ``DIR`` itself), preprocessed exactly as fine-tuning evaluates
  (resize + centre crop at the model's input size, ImageNet mean/std);
  labels come with it.
* ``FILE.npy``: an array ``[N, C, H, W]`` already preprocessed; ``FILE.npz``
  with ``x`` (and optionally ``y`` labels), or one array per model input named
  after it (multi-input models: token ids, masks, token types...). An array
  ``source`` in the ``.npz`` names the source of each sample (e.g. the photo a
  crop was cut from): ``--recover`` then holds out whole sources.
* ``synthetic``: glyph images rendered in memory (``onnxprune data synthetic``)
  with the same preprocessing; no labels (criteria that need labels use the
  model's own predictions).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune import io
from onnxprune.errors import UserError


@dataclass
class Calibration:
    batches: list  # [np.ndarray [B, C, H, W]]: the first input
    labels: list | None  # [np.ndarray [B]] or None
    source: str
    inputs: list | None = None  # [{input name: np.ndarray [B, ...]}] for multi-input models
    sources: list | None = None  # [np.ndarray [B]]: the source of each sample (a file, a photo), if known

    def feed(self, k: int, names: list[str]) -> dict:
        """ORT feed of batch ``k`` for a model whose inputs are ``names``."""
        if self.inputs is not None:
            return {n: self.inputs[k][n] for n in names}
        return {names[0]: self.batches[k]}

    @property
    def n(self) -> int:
        return int(sum(len(b) for b in self.batches))


def _input_shape(proto: onnx.ModelProto) -> tuple[int | None, list]:
    ins = io.data_inputs(proto)
    if not ins:
        raise UserError("model has no input")
    d = io.input_dims(ins[0])
    return d[0], d


def _named(spec: str, z, names: list[str], batch: int, n_batches: int, src=None) -> "Calibration":
    n = {len(z[k]) for k in names}
    if len(n) != 1:
        raise UserError(f"{spec}: the input arrays have different sample counts {sorted(n)}")
    count = min(n_batches, n.pop() // batch)
    if not count:
        raise UserError(f"{spec}: fewer samples than one batch of {batch}")
    inputs = [{k: np.ascontiguousarray(z[k][i * batch:(i + 1) * batch]) for k in names} for i in range(count)]
    return Calibration([b[names[0]] for b in inputs], None, f"{spec} ({count * batch} samples, inputs {', '.join(names)})", inputs,
                       _split(src, batch, count))


def _split(src, batch: int, count: int) -> list | None:
    """Per batch, the source ids of its samples (None: unknown)."""
    if src is None:
        return None
    return [np.asarray(src[i * batch:(i + 1) * batch]) for i in range(count)]


def _sources(spec: str, z) -> np.ndarray | None:
    if "source" not in z:
        return None
    src = np.asarray(z["source"]).reshape(-1)
    if src.dtype.kind not in "iuUSO":
        raise UserError(f"{spec}: 'source' must hold integer or string ids, one per sample")
    return src


def _chunks(x: np.ndarray, y, batch: int, n_batches: int):
    xs, ys = [], []
    for k in range(n_batches):
        s = slice(k * batch, (k + 1) * batch)
        if len(x[s]) < batch:
            break
        xs.append(np.ascontiguousarray(x[s], dtype=np.float32))
        ys.append(None if y is None else np.asarray(y[s]))
    if not xs:
        raise UserError(f"calibration data has {len(x)} samples: fewer than one batch of {batch}")
    return xs, (None if y is None else ys)


def load(spec: str, proto: onnx.ModelProto, n_batches: int = 4, batch: int = 32, seed: int = 0) -> Calibration:
    static, dims = _input_shape(proto)
    if static is not None:
        batch = static  # a static-batch model takes exactly its batch
    if len(dims) != 4 or not dims[2] or not dims[3]:
        if not (spec.endswith(".npy") or spec.endswith(".npz")):
            raise UserError("image calibration needs an input [N, C, H, W] with static H, W; give a .npy/.npz")
    need = n_batches * batch
    if spec == "synthetic":
        from onnxprune.torchbridge.data import GLYPHS, fonts_available, render_glyph, transforms

        rng = np.random.default_rng(seed)
        fonts = fonts_available()
        tf = transforms(dims[2], train=False)
        x = np.stack([tf(render_glyph(GLYPHS[int(rng.integers(10))], dims[2], rng, fonts)).numpy() for _ in range(need)])
        xs, ys = _chunks(x, None, batch, n_batches)
        return Calibration(xs, None, "synthetic glyphs")
    if os.path.isdir(spec):
        from onnxprune.torchbridge.data import image_folder

        root, split = spec, None
        for s in ("train", "val"):
            if os.path.isdir(os.path.join(spec, s)):
                split = s
                break
        if split is None:
            root, split = os.path.dirname(os.path.abspath(spec)), os.path.basename(os.path.abspath(spec))
        ds = image_folder(root, split, dims[2], train=False)
        if len(ds) < batch:
            raise UserError(f"{spec}: {len(ds)} images, fewer than one batch of {batch}")
        idx = np.random.default_rng(seed).permutation(len(ds))[:need]
        items = [ds[int(i)] for i in idx]
        x = np.stack([it[0].numpy() for it in items])
        y = np.array([it[1] for it in items])
        xs, ys = _chunks(x, y, batch, n_batches)
        return Calibration(xs, ys, f"{spec} ({split}, {len(xs) * batch} images)", sources=_split(idx, batch, len(xs)))
    if spec.endswith(".npy") or spec.endswith(".npz"):
        if not os.path.exists(spec):
            raise UserError(f"calibration file not found: {spec}")
        if spec.endswith(".npy"):
            x, y = np.load(spec), None
        else:
            z = np.load(spec)
            names = io.input_names(proto)
            src = _sources(spec, z)
            if all(n in z for n in names) and (len(names) > 1 or "x" not in z):
                return _named(spec, z, names, batch, n_batches, src)
            if "x" not in z:
                raise UserError(f"{spec}: expected arrays 'x' (and optionally 'y'), or one array per input "
                                f"({', '.join(names)})")
            x, y = z["x"], z["y"] if "y" in z else None
        if list(x.shape[1:]) != [d for d in dims[1:]] and all(d is not None for d in dims[1:]):
            raise UserError(f"{spec}: samples have shape {list(x.shape[1:])}, the model takes {dims[1:]}")
        xs, ys = _chunks(x, y, batch, n_batches)
        src = _sources(spec, z) if spec.endswith(".npz") else None
        if src is not None and len(src) != len(x):
            raise UserError(f"{spec}: 'source' has {len(src)} entries for {len(x)} samples")
        return Calibration(xs, ys, f"{spec} ({len(xs) * batch} samples)", sources=_split(src, batch, len(xs)))
    raise UserError(f"--calib {spec!r}: not a directory, .npy/.npz file or 'synthetic'")

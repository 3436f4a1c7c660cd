"""Calibration input: ``--calib DIR | FILE.npy | FILE.npz | synthetic``.

* ``DIR``: an ImageFolder root (``DIR/train`` if present, else ``DIR/val``,
  else ``DIR`` itself) or any folder of images, preprocessed as fine-tuning
  evaluates (resize + centre crop at the model's input size; ImageNet
  mean/std unless ``norm`` says otherwise: :func:`parse_norm`); labels come
  with class folders. Fewer images than samples wanted give several views of
  each (further random resized crops, flipped half the time), each sample's
  source its image.
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
from onnxprune.torchbridge.data import IMAGENET_MEAN, IMAGENET_STD  # no torch at import


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


def _as_input(spec: str, name: str, a: np.ndarray, want) -> np.ndarray:
    """Array ``a`` given for input ``name`` in the input's element type ``want``
    (a numpy dtype; None: as it is): floats of another width and integers for a
    float input are converted, floats for an integer or boolean input (token
    ids, masks) are refused; NaN or infinite values are refused."""
    if a.dtype.kind not in "biuf":
        raise UserError(f"{spec}: '{name}' holds {a.dtype} values, not numbers")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise UserError(f"{spec}: '{name}' holds {int(np.size(a) - np.count_nonzero(np.isfinite(a)))} NaN or infinite values")
    if want is None or a.dtype == want:
        return a
    if np.dtype(want).kind in "biu" and a.dtype.kind == "f":
        raise UserError(f"{spec}: '{name}' holds {a.dtype} values; the model takes {np.dtype(want)} (ids or masks)")
    return a.astype(want)


def _elem_types(proto: onnx.ModelProto) -> dict:
    out = {}
    for i in io.data_inputs(proto):
        try:
            out[i.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):  # no or an unusual element type: the array as it is
            out[i.name] = None
    return out


def _named(spec: str, z, names: list[str], batch: int, n_batches: int, src=None, types: dict | None = None) -> "Calibration":
    n = {len(z[k]) for k in names}
    if len(n) != 1:
        raise UserError(f"{spec}: the input arrays have different sample counts {sorted(n)}")
    total = n.pop()
    if src is not None and len(src) != total:
        raise UserError(f"{spec}: 'source' has {len(src)} entries for {total} samples")
    count = min(n_batches, total // batch)
    if not count:
        raise UserError(f"{spec}: fewer samples than one batch of {batch}")
    z = {k: _as_input(spec, k, np.asarray(z[k][:count * batch]), (types or {}).get(k)) for k in names}  # the samples used
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


NORMS = {  # --calib-norm names: per-channel mean and std on pixels scaled to [0, 1]
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),  # torchvision, timm, most torch exports
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # pixels to [-1, 1]: TF/Keras Inception, EfficientNet-Lite
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # pixels in [0, 1]: YOLO, many detectors
    "raw": ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)),  # pixels in [0, 255]
}
VIEW_SCALE = (0.25, 1.0)  # area of the photo a further view covers (random resized crop, flipped half the time)


def parse_norm(spec: str | None, flag: str = "--calib-norm") -> tuple[tuple, tuple]:
    """``--calib-norm`` (``flag`` in the error): a name of :data:`NORMS` or ``M,M,M/S,S,S``
    (mean and std per channel on pixels in [0, 1]); None: ``imagenet``."""
    if spec is None:
        return NORMS["imagenet"]
    if spec in NORMS:
        return NORMS[spec]
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in spec.split("/"))
    except ValueError:
        mean = std = ()
    if len(mean) != 3 or len(std) != 3 or not all(v > 0 for v in std):
        raise UserError(f"{flag} {spec!r}: give one of {', '.join(NORMS)} or MEAN,MEAN,MEAN/STD,STD,STD "
                        "(pixels in [0, 1], the std positive)")
    return mean, std


def folder_norm(spec: str, norm: str | None, flag: str = "--calib-norm") -> tuple[tuple, tuple]:
    """:func:`parse_norm` for data ``spec``; a norm given for arrays (``.npy``/``.npz``,
    used as they are) is a user error."""
    if norm is not None and (spec.endswith(".npy") or spec.endswith(".npz")):
        raise UserError(f"{flag} applies to images read from a folder; {spec} is used as it is")
    return parse_norm(norm, flag)


@dataclass(frozen=True)
class ImageLayout:
    """How an image input lays its pixels out: ``[N, C, H, W]`` or, channels
    last (Keras, tf2onnx), ``[N, H, W, C]``; ``C`` is 1 (grey) or 3 (RGB)."""

    channels: int
    height: int
    width: int
    last: bool = False

    @property
    def plain(self) -> bool:
        """An RGB square ``[N, 3, S, S]``: timm's evaluation transform as it is."""
        return self.channels == 3 and self.height == self.width and not self.last


def image_layout(dims: list) -> ImageLayout | None:
    """The layout of an input with dims ``[N, C, H, W]`` or ``[N, H, W, C]`` (static
    C in 1 or 3, static H and W; channels first when both readings fit), else None."""
    if len(dims) != 4:
        return None
    _, a, b, c = dims
    if a in (1, 3) and b and c:
        return ImageLayout(a, b, c)
    if c in (1, 3) and a and b:
        return ImageLayout(c, a, b, last=True)
    return None


def _views(lay: ImageLayout, mean, std):
    """``(centre, other)``: PIL image -> array in the model's layout; ``centre``
    resizes the image to cover the input (timm's crop fraction) and cuts its
    centre, ``other`` is a random resized crop covering :data:`VIEW_SCALE` of it,
    flipped half the time."""
    from torchvision import transforms as T

    from onnxprune.torchbridge.data import transforms

    size = (lay.height, lay.width)
    mode = "RGB" if lay.channels == 3 else "L"
    norm = [T.ToTensor(), T.Normalize(*((mean, std) if lay.channels == 3 else (mean[:1], std[:1])))]  # grey: the first channel's
    if lay.plain:
        centre = transforms(lay.height, train=False, mean=mean, std=std)
    else:
        pct = 1.0 if max(size) <= 64 else 0.875  # timm's crop fraction (transforms)
        cover = [int(round(v / pct)) for v in size]

        def resize(im):  # the smallest scaling of the image that covers the crop's surround
            k = max(cover[0] / im.height, cover[1] / im.width)
            return im.convert(mode).resize((max(cover[1], round(im.width * k)), max(cover[0], round(im.height * k))))

        centre = T.Compose([T.Lambda(resize), T.CenterCrop(size), *norm])
    other = T.Compose([T.Lambda(lambda im: im.convert(mode)), T.RandomResizedCrop(size, scale=VIEW_SCALE),
                       T.RandomHorizontalFlip(), *norm])

    def arrays(tf):
        def f(im):
            a = tf(im).numpy()
            return a.transpose(1, 2, 0) if lay.last else a
        return f

    return arrays(centre), arrays(other)


def _from_folder(spec: str, lay: ImageLayout, batch: int, n_batches: int, need: int, seed: int,
                 norm: tuple[tuple, tuple]) -> Calibration:
    """Images from a folder: an ImageFolder root (train/ or val/ of class folders),
    a split of class folders, or any folder of images (searched recursively),
    each cut to the input's layout (``lay``). Each image gives its resize + centre crop; a folder of fewer images than
    ``need`` gives further views of each (random resized crops covering
    :data:`VIEW_SCALE` of it, flipped half the time) until there are ``need``,
    and every sample's source is its image, so recovery holds out whole photos."""
    import torch
    from PIL import Image
    from torchvision.datasets import ImageFolder

    from onnxprune.torchbridge.distill import IMAGE_EXT, image_files

    def has_classes(d: str) -> bool:
        subs = [s for s in os.listdir(d) if os.path.isdir(os.path.join(d, s))]
        return bool(subs) and not image_files(d, recursive=False) and all(image_files(os.path.join(d, s)) for s in subs)

    split = next((s for s in ("train", "val") if os.path.isdir(os.path.join(spec, s)) and has_classes(os.path.join(spec, s))),
                 None)
    labelled = split is not None or has_classes(spec)
    if labelled:
        samples = ImageFolder(os.path.join(spec, split) if split else spec).samples
        paths, labels = [p for p, _ in samples], np.array([c for _, c in samples])
        what = f"{split}, " if split else ""
    else:
        paths, labels, what = image_files(spec), None, "no labels, "
    if not paths:
        raise UserError(f"no images under {spec} ({', '.join(IMAGE_EXT)})")
    mean, std = norm
    centre, other = _views(lay, mean, std)
    views = max(1, -(-need // len(paths)))
    pick = np.random.default_rng(seed).permutation(len(paths))[:need]
    shape = (lay.height, lay.width, lay.channels) if lay.last else (lay.channels, lay.height, lay.width)
    x = np.empty((min(need, len(pick) * views), *shape), np.float32)
    src = np.empty(len(x), np.int64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for j, i in enumerate(pick):
            try:
                with Image.open(paths[i]) as im:
                    im = im.convert("RGB")
                    for v in range(views):  # sample k = v * len(pick) + j: every image's centre crop comes first
                        k = v * len(pick) + j
                        if k < len(x):
                            x[k] = (centre if v == 0 else other)(im)
                            src[k] = i
            except OSError as e:  # PIL: not an image, truncated file
                raise UserError(f"{paths[i]}: cannot read an image ({str(e).splitlines()[0][:160]})") from None
    y = None if labels is None else labels[src]
    xs, ys = _chunks(x, y, batch, n_batches)
    n = len(xs) * batch
    if views == 1:  # an image each: look-alike images share a source
        return _with_sources(Calibration(xs, ys, f"{spec} ({what}{n} images)"), lay.last)
    return Calibration(xs, ys, f"{spec} ({what}{len(pick)} images, {views} views each: {n} samples)",
                       sources=_split(src, batch, len(xs)))


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


def look_alike_sources(x: np.ndarray, threshold: float = 0.8, limit: int = 4096) -> np.ndarray | None:
    """Source ids for images ``[N, C, H, W]`` whose sources are not given:
    images whose colour histograms are close (crops of one photo, frames of
    one scene) share an id, so that recovery holds out whole scenes rather
    than other crops of the photos it fitted. Single linkage at ``threshold``
    (square-root histograms, 8 bins per channel), lowered until no group holds
    more than half the images. None for other inputs or more than ``limit``
    images."""
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating) or len(x) > limit or len(x) < 2:
        return None
    n, c = x.shape[:2]
    feats = []
    for ch in range(min(c, 4)):
        v = x[:, ch].reshape(n, -1)
        lo, hi = float(v.min()), float(v.max())
        idx = np.clip(((v - lo) / (hi - lo + 1e-12) * 8).astype(np.int64), 0, 7)
        hist = np.stack([np.bincount(r, minlength=8) for r in idx]) / v.shape[1]
        feats.append(np.sqrt(hist))
    f = np.concatenate(feats, 1)
    sq = (f * f).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * f @ f.T, 0))
    t = threshold
    while True:
        parent = np.arange(n)

        def root(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, j in zip(*np.nonzero(np.triu(dist < t, 1))):
            ri, rj = root(i), root(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
        ids = np.array([root(i) for i in range(n)])
        if np.bincount(ids).max() <= n // 2 or t < 1e-3:
            return ids
        t *= 0.85


def _with_sources(cal: Calibration, last: bool = False) -> Calibration:
    """Fill ``cal.sources`` from look-alike images when the data did not name them
    (``last``: the images are ``[N, H, W, C]``)."""
    if cal.sources is not None or cal.inputs is not None:
        return cal
    sizes = [len(b) for b in cal.batches]
    x = np.concatenate(cal.batches)
    ids = look_alike_sources(x.transpose(0, 3, 1, 2) if last and x.ndim == 4 else x)
    if ids is None:
        return cal
    cal.sources = [ids[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
    cal.source += f"; {len(np.unique(ids))} groups of look-alike images"
    return cal


def load(spec: str, proto: onnx.ModelProto, n_batches: int = 4, batch: int = 32, seed: int = 0,
         norm: str | None = None) -> Calibration:
    cal = _load(spec, proto, n_batches, batch, seed, norm)
    if cal.inputs is None:  # one input: its samples in its element type (a float16 model takes float16)
        name = io.data_inputs(proto)[0].name
        want = _elem_types(proto).get(name)
        cal.batches = [_as_input(spec, name, b, want) for b in cal.batches]
    return cal


def _load(spec: str, proto: onnx.ModelProto, n_batches: int, batch: int, seed: int,
          norm: str | None) -> Calibration:
    static, dims = _input_shape(proto)
    if static is not None and static != batch:
        # a static-batch model takes exactly its batch: as many batches of it as give the same number of samples
        n_batches, batch = max(1, -(-n_batches * batch // static)), static
    lay = image_layout(dims)
    if lay is None and not (spec.endswith(".npy") or spec.endswith(".npz")):
        raise UserError("image calibration needs an input [N, C, H, W] or [N, H, W, C] with C 1 or 3 and static H, W "
                        f"(this one: {[d if d else '?' for d in dims]}); give a .npy/.npz")
    need = n_batches * batch
    mean, std = folder_norm(spec, norm)
    if spec == "synthetic":
        from onnxprune.torchbridge.data import GLYPHS, fonts_available, render_glyph

        rng = np.random.default_rng(seed)
        fonts = fonts_available()
        tf = _views(lay, mean, std)[0]
        side = max(lay.height, lay.width)
        x = np.stack([tf(render_glyph(GLYPHS[int(rng.integers(10))], side, rng, fonts)) for _ in range(need)])
        xs, ys = _chunks(x, None, batch, n_batches)
        return _with_sources(Calibration(xs, None, "synthetic glyphs"), lay.last)
    if os.path.isdir(spec):
        return _from_folder(spec, lay, batch, n_batches, need, seed, (mean, std))
    if spec.endswith(".npy") or spec.endswith(".npz"):
        if not os.path.exists(spec):
            raise UserError(f"calibration file not found: {spec}")
        if spec.endswith(".npy"):
            x, y = io.read_array(spec), None
        else:
            z = io.read_array(spec)
            names = io.input_names(proto)
            src = _sources(spec, z)
            if all(n in z for n in names) and (len(names) > 1 or "x" not in z):
                for i in io.data_inputs(proto):  # each array's samples against its input's dims
                    want, got = io.input_dims(i)[1:], list(z[i.name].shape[1:])
                    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
                        raise UserError(f"{spec}: '{i.name}' samples have shape {got}, the model takes "
                                        f"{[w if w is not None else '?' for w in want]}")
                return _named(spec, z, names, batch, n_batches, src, _elem_types(proto))
            if "x" not in z:
                raise UserError(f"{spec}: expected arrays 'x' (and optionally 'y'), or one array per input "
                                f"({', '.join(names)})")
            x, y = z["x"], z["y"] if "y" in z else None
        if list(x.shape[1:]) != [d for d in dims[1:]] and all(d is not None for d in dims[1:]):
            raise UserError(f"{spec}: samples have shape {list(x.shape[1:])}, the model takes {dims[1:]}")
        _as_input(spec, "x" if spec.endswith(".npz") else "the array", np.asarray(x[:n_batches * batch]), None)  # the samples used
        xs, ys = _chunks(x, y, batch, n_batches)
        src = _sources(spec, z) if spec.endswith(".npz") else None
        if src is not None and len(src) != len(x):
            raise UserError(f"{spec}: 'source' has {len(src)} entries for {len(x)} samples")
        return _with_sources(Calibration(xs, ys, f"{spec} ({len(xs) * batch} samples)", sources=_split(src, batch, len(xs))),
                             lay is not None and lay.last)
    raise UserError(f"--calib {spec!r}: not a directory, .npy/.npz file or 'synthetic'")

"""Label-free distillation: data without classes and losses on whatever the
teacher outputs.

``--data`` may be

* an ImageFolder root (``DIR/train/<class>/*``, ``DIR/val/<class>/*``): labelled,
  the task loss applies (as before);
* a folder of images without classes (any layout; ``DIR/train`` and ``DIR/val``
  are used when present, else every 10th image is held out for evaluation);
* a ``.npy`` array (single-input models) or a ``.npz`` with one array per
  model input name (or a single array for a single-input model), already
  preprocessed; every 10th sample is held out.

Without labels ``--teacher`` is required and the loss is on the teacher's
outputs only, summed over all outputs: KL on temperature-softened logits for
outputs shaped ``[B, K]`` (Hinton et al., *Distilling the Knowledge in a
Neural Network*), ``(1 - cosine) + MSE / var(teacher)`` per sample for any
other output (embeddings, dense maps). Evaluation reports top-1 agreement with
the teacher on the first logit output, and the KL / normalised MSE per output.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import onnx

from onnxprune import io
from onnxprune.errors import UserError

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")


def kd_loss(logits, t_logits, temperature: float):
    """KL(teacher || student) on temperature-softened logits, scaled by T^2."""
    import torch.nn.functional as F

    T = temperature
    return F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(t_logits.float() / T, -1),
                    reduction="batchmean", log_target=True) * T * T


def is_labelled(spec: str) -> bool:
    """An ImageFolder root with class subfolders under train/."""
    d = os.path.join(spec, "train")
    if not os.path.isdir(d):
        return False
    subs = [s for s in os.listdir(d) if os.path.isdir(os.path.join(d, s))]
    return bool(subs) and not image_files(d, recursive=False)


def image_files(d: str, recursive: bool = True) -> list[str]:
    pat = os.path.join(d, "**", "*") if recursive else os.path.join(d, "*")
    return sorted(p for p in glob.glob(pat, recursive=recursive) if p.lower().endswith(IMAGE_EXT) and os.path.isfile(p))


class FlatImages:
    """Images without labels (a torch Dataset): ``(tensor,)`` per item."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return (self.transform(im.convert("RGB")),)


class Arrays:
    """Preprocessed arrays, one per model input: ``(tensor, ...)`` per item."""

    def __init__(self, arrays: list[np.ndarray], idx: np.ndarray):
        self.arrays, self.idx = arrays, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        import torch

        return tuple(torch.from_numpy(np.ascontiguousarray(a[self.idx[i]])) for a in self.arrays)


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(n)
    if n < 10:
        return idx, idx
    return idx[idx % 10 != 9], idx[idx % 10 == 9]


def load_arrays(spec: str, names: list[str]) -> list[np.ndarray]:
    if not os.path.exists(spec):
        raise UserError(f"data file not found: {spec}")
    if spec.endswith(".npy"):
        if len(names) != 1:
            raise UserError(f"{spec}: the model has {len(names)} inputs ({', '.join(names)}); give a .npz with one array per input")
        return [io.read_array(spec)]
    z = io.read_array(spec)  # {name: array}
    if all(n in z for n in names):
        arrs = [z[n] for n in names]
    elif len(names) == 1 and z:
        arrs = [z["x"] if "x" in z else next(iter(z.values()))]
    else:
        raise UserError(f"{spec}: needs one array per model input ({', '.join(names)}); it has {', '.join(z)}")
    if len({len(a) for a in arrs}) != 1:
        raise UserError(f"{spec}: the input arrays have different sample counts")
    return arrs


def unlabelled(spec: str, proto: onnx.ModelProto, size: int | None, recipe, mean, std):
    """(train dataset, eval dataset, description) for data without labels."""
    names = io.input_names(proto)
    if spec.endswith(".npy") or spec.endswith(".npz"):
        arrs = load_arrays(spec, names)
        tr, ev = _split(len(arrs[0]))
        return Arrays(arrs, tr), Arrays(arrs, ev), f"{spec} ({len(tr)} train / {len(ev)} held-out samples, no labels)"
    if not os.path.isdir(spec):
        raise UserError(f"--data: {spec} is neither a directory nor a .npy/.npz file")
    if len(names) != 1 or size is None:
        raise UserError("an image folder needs a single image input [N, C, H, W]; give a .npz with one array per input")
    from onnxprune.torchbridge.data import transforms

    if os.path.isdir(os.path.join(spec, "train")):
        tr, ev = image_files(os.path.join(spec, "train")), image_files(os.path.join(spec, "val"))
    else:
        allp = image_files(spec)
        tri, evi = _split(len(allp))
        tr, ev = [allp[i] for i in tri], [allp[i] for i in evi]
    if not tr:
        raise UserError(f"no images under {spec} ({', '.join(IMAGE_EXT)})")
    ev = ev or tr
    return (FlatImages(tr, transforms(size, True, recipe, mean, std)), FlatImages(ev, transforms(size, False, None, mean, std)),
            f"{spec} ({len(tr)} train / {len(ev)} held-out images, no labels)")


def as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def is_logits(t) -> bool:
    return t.ndim == 2 and t.shape[1] > 1


def output_loss(outs: list, t_outs: list, temperature: float):
    """Sum over outputs: KL for [B, K] logits, (1 - cos) + MSE/var(teacher) otherwise."""
    import torch
    import torch.nn.functional as F


    total = None
    for s, t in zip(outs, t_outs):
        if not torch.is_floating_point(s) or s.shape != t.shape:
            continue
        if is_logits(s):
            term = kd_loss(s, t, temperature)
        else:
            sf, tf = s.float().reshape(s.shape[0], -1), t.float().reshape(t.shape[0], -1)
            term = (1 - F.cosine_similarity(sf, tf, dim=1, eps=1e-8)).mean() + ((sf - tf) ** 2).mean() / (tf.var() + 1e-8)
        total = term if total is None else total + term
    if total is None:
        raise UserError("no student output matches a teacher output in shape: nothing to distil")
    return total


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def compare_onnx(student, teacher, feeds: list[dict]) -> dict:
    """Student vs teacher in ONNX Runtime on ``feeds``: top-1 agreement on the
    first logit output, and per output KL(teacher || student) (logits) or
    MSE / var(teacher) and cosine (other outputs)."""
    from onnxprune import runtime

    ss, ts = runtime.session(student, threads=os.cpu_count() or 1), runtime.session(teacher, threads=os.cpu_count() or 1)
    acc: dict = {}
    for fd in feeds:
        n = fd.get("__n__")
        fd = {k: v for k, v in fd.items() if k != "__n__"}
        so, to = ss.run(None, fd), ts.run(None, fd)
        for k, (s, t) in enumerate(zip(so, to)):
            if s.shape != t.shape or not np.issubdtype(s.dtype, np.floating):
                continue
            if n is not None:
                s, t = s[:n], t[:n]
            a = acc.setdefault(k, {"n": 0, "agree": 0, "kl": 0.0, "se": 0.0, "tt": [], "cos": 0.0})
            if s.ndim == 2 and s.shape[1] > 1:
                p, q = _softmax(t.astype(np.float64)), _softmax(s.astype(np.float64))
                a["kl"] += float((p * (np.log(p + 1e-30) - np.log(q + 1e-30))).sum())
                a["agree"] += int((s.argmax(1) == t.argmax(1)).sum())
            sf, tf = s.reshape(len(s), -1).astype(np.float64), t.reshape(len(t), -1).astype(np.float64)
            a["se"] += float(((sf - tf) ** 2).mean(1).sum())
            a["tt"].append(tf)
            a["cos"] += float(((sf * tf).sum(1) / (np.linalg.norm(sf, axis=1) * np.linalg.norm(tf, axis=1) + 1e-30)).sum())
            a["n"] += len(s)
    outs = {}
    names = [o.name for o in ss.get_outputs()]
    first_logits = None
    for k, a in sorted(acc.items()):
        n = max(a["n"], 1)
        var = float(np.concatenate(a["tt"]).var()) if a["tt"] else 1.0
        row = {"nmse": a["se"] / n / max(var, 1e-30), "cosine": a["cos"] / n}
        if a["agree"] or a["kl"]:
            row["kl"] = a["kl"] / n
            row["agreement"] = 100.0 * a["agree"] / n
            if first_logits is None:
                first_logits = row
        outs[names[k]] = row
    res = {"outputs": outs, "samples": int(max((a["n"] for a in acc.values()), default=0))}
    if first_logits is not None:
        res["agreement"], res["kl"] = first_logits["agreement"], first_logits["kl"]
    return res


def eval_feeds(ds, names: list[str], static: int | None, batch: int = 32, max_batches: int | None = None) -> list[dict]:
    """ORT feeds over a dataset of ``(tensor, ...)`` items (padded to a static batch)."""
    b = static or batch
    feeds = []
    for k, start in enumerate(range(0, len(ds), b)):
        if max_batches is not None and k >= max_batches:
            break
        items = [ds[i] for i in range(start, min(start + b, len(ds)))]
        n = len(items)
        fd = {}
        for j, name in enumerate(names):
            x = np.stack([np.asarray(it[j]) for it in items])
            if static and n < b:
                x = np.concatenate([x, np.repeat(x[-1:], b - n, 0)])
            fd[name] = x
        fd["__n__"] = n
        feeds.append(fd)
    return feeds


def strip(feeds: list[dict]) -> list[dict]:
    return [{k: v for k, v in fd.items() if k != "__n__"} for fd in feeds]


class BestOnHeldOut:
    """Held-out early stopping for label-free distillation (a training-loop
    hook). At the end of every epoch (a time-budgeted run's last, partial one
    included) it measures how far the student is from the teacher on the
    held-out samples (KL on the first logit output, else the summed
    normalised MSE of the outputs) and keeps a copy of the student's tensors
    where that was lowest; :meth:`restore` puts them back."""

    def __init__(self, student, teacher, feeds: list[dict], names: list[str], n_out: int, device):
        import torch

        self.student, self.n_out = student, n_out
        self.batches = []
        with torch.no_grad():
            for fd in feeds:
                n = fd.get("__n__")
                xs = [torch.from_numpy(fd[k]).to(device) for k in names]
                t = [v[:n].float() for v in as_list(teacher(*xs))[:n_out]]
                self.batches.append((xs, n, t))
        self.logits = bool(self.batches) and is_logits(self.batches[0][2][0])
        self.gaps: list[float] = []
        self.best, self.best_epoch, self.state, self.last_epoch = float("inf"), None, None, None

    def gap(self) -> float:
        """KL(teacher || student) per sample on the first logit output, else the
        sum over outputs of MSE / var(teacher)."""
        import torch
        import torch.nn.functional as F

        was = self.student.training
        self.student.eval()
        kl, count = 0.0, 0
        se: dict[int, float] = {}
        tt: dict[int, list] = {}
        with torch.no_grad():
            for xs, n, t in self.batches:
                s = [v[:n].float() for v in as_list(self.student(*xs))[: self.n_out]]
                count += len(t[0])
                if self.logits:
                    kl += float(F.kl_div(F.log_softmax(s[0], -1), F.log_softmax(t[0], -1), reduction="sum",
                                         log_target=True))
                    continue
                for k, (a, b) in enumerate(zip(s, t)):
                    if a.shape == b.shape:
                        se[k] = se.get(k, 0.0) + float(((a - b) ** 2).reshape(len(a), -1).mean(1).sum())
                        tt.setdefault(k, []).append(b.reshape(len(b), -1))
        self.student.train(was)
        if self.logits:
            return kl / max(count, 1)
        return sum(se[k] / max(count, 1) / max(float(torch.cat(tt[k]).var()), 1e-30) for k in se)

    def end_epoch(self, epoch: int, rec: dict) -> dict:
        g = self.gap()
        self.gaps.append(g)
        self.last_epoch = epoch
        if g < self.best:  # NaN never wins
            self.best, self.best_epoch = g, epoch
            self.state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        return {"held_out_gap": g}

    def restore(self) -> int | None:
        """Put the best epoch's tensors back; returns that epoch (None: never measured)."""
        if self.state is not None and self.best_epoch != self.last_epoch:
            self.student.load_state_dict(self.state)
        return self.best_epoch

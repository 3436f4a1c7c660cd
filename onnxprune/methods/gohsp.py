"""GOHSP soft pruning (Yin et al., AAAI 2023, Eq. 5-15): ADMM / Douglas-Rachford splitting
toward heterogeneous head and column sparsity, then hard pruning with our
rewriter and fine-tuning.

Interpretation (written down in the README too):

* **Structures are our analysis groups.** ``heads`` groups give the head-level
  sparsity, ``head_dim`` groups the attention "columns" (one D per layer, as
  the Reshape requires: a head-dim column is the same dim in every kept head,
  across q/k rows and v/proj), ``mlp`` groups the MLP columns (hidden units:
  fc1 rows + bias, fc2 columns). So hard pruning is exactly the rewriter's.
* **M_attn** zeroes every slice (q/k/v rows and biases, proj columns, bias-table
  entries) of the heads the GOHSP ranking puts last, in the numbers the ratios
  ask for; kept heads have M = 1.
* **Updates.** Each step: an optimiser step on the task loss (eta * dl/dW),
  then, literally as Eq. 10-11 write them (not scaled by eta),
  ``W -= lambda * (1 - M) * W + rho * (W - Z + U)`` on the constrained tensors.
  Every ``admm_interval`` steps (default: once per epoch), Eq. 12-15:
  ``Z = P(W + U)``, ``U = U + W - Z``. Eq. 11 uses W_attn^t (sequential); here
  both blocks update from the same step (simultaneous). These updates are a
  hook (:class:`AdmmHook`) of the training loop :func:`onnxprune.torchbridge.loop.fit`.
* **P** keeps the kappa columns of largest l2 norm (over all member slices of
  the group; for head_dim, over ``M * (W + U)``, i.e. inside kept heads) and
  zeroes the rest; entries outside M are not constrained by g (Eq. 6), so Z
  keeps them.
* kappa per layer comes from ratios.json kinds (``head_dim``, ``mlp``; ``heads``
  for the mask), or, with ``sparsity``, from one overall column sparsity
  distributed by Erdos-Renyi as the paper does (:func:`erdos_renyi`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from onnxprune.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Piece:
    """One member tensor's slices of one group, in torch layout."""

    param: object  # torch Parameter
    axis: int  # torch axis
    lm: np.ndarray  # position along axis -> channel of the group (or -1)


@dataclass
class Structure:
    gid: int
    kind: str
    width: int
    keep_n: int
    pieces: list = field(default_factory=list)
    removed_heads: np.ndarray | None = None  # heads only


def _torch_axis(link, axis: int, ndim: int) -> int | None:
    if link.transform == "same":
        return axis
    if link.transform == "T" and ndim == 2:
        return 1 - axis
    return None


def build_structures(a, plan, imp) -> list[Structure]:
    from onnxprune.torchbridge.importer import tensor_at

    out = []
    t = a.ctx.table
    for g in a.groups:
        if g.frozen or g.kind not in ("heads", "head_dim", "mlp") or g.id not in plan.keep:
            continue
        st = Structure(g.id, g.kind, g.width, len(plan.keep[g.id]))
        for m in g.tensors:
            name = m.value.name
            if name not in imp.trainable:
                continue
            link = imp.links[name][0]
            p = tensor_at(imp.module, link.path)
            ax = _torch_axis(link, m.axis, p.dim())
            if ax is None:
                continue
            lm = t.leaf_map(m.space, g.space)
            if len(lm) != p.shape[ax]:
                continue
            st.pieces.append(Piece(p, ax, lm))
        if g.kind == "heads":
            st.removed_heads = np.setdiff1d(np.arange(g.width), plan.keep[g.id])
        if st.pieces:
            out.append(st)
    return out


def _structure_params(st: Structure) -> tuple[float, float]:
    """(params in the structure's slices, Erdos-Renyi score of the weights it cuts).

    The score of a weight tensor is sum(shape) / prod(shape) (Mocanu et al.
    2018; for a conv kernel the kernel dims count too, as in RigL's ERK); a
    structure's score is the parameter-weighted mean over its >=2-D tensors."""
    params, wsum, wnum, seen = 0.0, 0.0, 0.0, set()
    for pc in st.pieces:
        shape = tuple(pc.param.shape)
        n = float(np.prod(shape))
        params += n / shape[pc.axis] * float((pc.lm >= 0).sum())
        if len(shape) >= 2 and id(pc.param) not in seen:
            seen.add(id(pc.param))
            wsum += sum(shape)  # n * (sum(shape) / n)
            wnum += n
    return params, (wsum / wnum if wnum else 1.0)


def erdos_renyi(structs: list[Structure], sparsity: float, round_to: int = 1) -> dict[int, float]:
    """Set ``keep_n`` of every column structure (``head_dim``, ``mlp``) from one
    overall column sparsity, distributed as GOHSP does with Erdos-Renyi:
    density_l = min(1, eps * score_l), eps chosen so that the kept parameters
    are (1 - sparsity) of the structures' parameters (layers that would exceed
    density 1 are kept dense and eps is solved again). Returns group id ->
    density actually used (after rounding to whole columns)."""
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
    cols = [st for st in structs if st.kind in ("head_dim", "mlp")]
    info = {st.gid: _structure_params(st) for st in cols}
    budget = (1.0 - sparsity) * sum(p for p, _ in info.values())
    dense: set[int] = set()
    while True:
        rest = [st for st in cols if st.gid not in dense]
        if not rest:
            eps = 0.0
            break
        eps = (budget - sum(info[g][0] for g in dense)) / sum(info[st.gid][0] * info[st.gid][1] for st in rest)
        over = [st.gid for st in rest if eps * info[st.gid][1] > 1.0]
        if not over:
            break
        dense.update(over)
    out = {}
    for st in cols:
        d = 1.0 if st.gid in dense else eps * info[st.gid][1]
        keep = int(round(d * st.width))
        if round_to > 1:
            keep = int(round(keep / round_to)) * round_to
        st.keep_n = int(min(st.width, max(1, keep, min(round_to, st.width))))
        out[st.gid] = st.keep_n / st.width
    return out


def _bcast(vec, p, axis: int):
    import torch

    shape = [1] * p.dim()
    shape[axis] = len(vec)
    return torch.as_tensor(vec, dtype=p.dtype).reshape(shape)


class ADMM:
    """State (M, Z, U) and the projections for a set of structures."""

    def __init__(self, structures: list[Structure], rho: float, lam: float):
        import torch

        self.structs, self.rho, self.lam = structures, rho, lam
        self.params = {}
        for st in structures:
            for pc in st.pieces:
                self.params[id(pc.param)] = pc.param
        self.M = {k: torch.ones_like(p) for k, p in self.params.items()}
        for st in structures:
            if st.kind == "heads":
                for pc in st.pieces:
                    keep = (~np.isin(pc.lm, st.removed_heads)).astype(np.float32)
                    self.M[id(pc.param)] *= _bcast(keep, pc.param, pc.axis)
        self.col = [st for st in structures if st.kind in ("head_dim", "mlp")]
        self.Cparams = {id(pc.param) for st in self.col for pc in st.pieces}
        with torch.no_grad():
            self.U = {k: torch.zeros_like(self.params[k]) for k in self.Cparams}
            self.Z = {k: self.params[k].detach().clone() for k in self.Cparams}
            self.project()

    def _col_norms(self, st: Structure, tensors: dict) -> np.ndarray:
        sq = np.zeros(st.width)
        for pc in st.pieces:
            x = (tensors[id(pc.param)] * self.M[id(pc.param)]).detach()
            per = x.pow(2).transpose(0, pc.axis).reshape(x.shape[pc.axis], -1).sum(1).double().numpy()
            sel = pc.lm >= 0
            np.add.at(sq, pc.lm[sel], per[sel])
        return np.sqrt(sq)

    def project(self) -> None:
        """Z = P(W + U): keep the kappa columns of largest norm per group."""
        import torch

        with torch.no_grad():
            V = {k: self.params[k].detach() + self.U[k] for k in self.Cparams}
            keepmask = {k: torch.ones_like(v) for k, v in V.items()}
            for st in self.col:
                norms = self._col_norms(st, V)
                keep = np.argsort(-norms, kind="stable")[: st.keep_n]
                on = np.isin(np.arange(st.width), keep)
                for pc in st.pieces:
                    pos = np.where(pc.lm >= 0, on[np.maximum(pc.lm, 0)], True).astype(np.float32)
                    keepmask[id(pc.param)] *= _bcast(pos, pc.param, pc.axis)
            for k, v in V.items():
                M = self.M[k]
                self.Z[k] = v * ((1 - M) + M * keepmask[k])  # g (Eq. 6) only constrains M * Z

    def dual(self) -> None:
        import torch

        with torch.no_grad():
            for k in self.Cparams:
                self.U[k] += self.params[k].detach() - self.Z[k]

    def penalty_step(self) -> None:
        """Eq. 10-11 without the loss gradient (applied by the optimiser)."""
        import torch

        with torch.no_grad():
            for k, p in self.params.items():
                if self.lam:
                    p.sub_(self.lam * (1 - self.M[k]) * p)
                if k in self.Cparams and self.rho:
                    p.sub_(self.rho * (p - self.Z[k] + self.U[k]))

    def masked_norm(self) -> float:
        return float(math.sqrt(sum(float(((1 - self.M[k]) * p.detach()).pow(2).sum()) for k, p in self.params.items())))

    def w_minus_z(self) -> float:
        return float(math.sqrt(sum(float((self.params[k].detach() - self.Z[k]).pow(2).sum()) for k in self.Cparams)))

    def final_keep(self) -> dict[int, np.ndarray]:
        """The hard-pruning plan: kept heads from M, top-kappa columns by norm of W."""
        keep = {}
        W = {k: p.detach() for k, p in self.params.items()}
        for st in self.structs:
            if st.kind == "heads":
                keep[st.gid] = np.setdiff1d(np.arange(st.width), st.removed_heads)
            else:
                norms = self._col_norms(st, W)
                keep[st.gid] = np.sort(np.argsort(-norms, kind="stable")[: st.keep_n])
        return keep


class AdmmHook:
    """ADMM as a hook of :func:`onnxprune.torchbridge.loop.fit`: the penalty step (Eq. 10-11) after
    every optimiser step, Z and U (Eq. 12-15) every ``interval`` steps, and per
    epoch the record GOHSP reports (``task_loss``, ``masked_norm``,
    ``w_minus_z``, ``val_top1`` from the ``val_top1()`` callable)."""

    def __init__(self, admm: ADMM, interval: int, val_top1, progress: bool = False):
        self.admm, self.interval, self.val_top1, self.progress = admm, interval, val_top1, progress

    def after_step(self, step: int) -> None:
        self.admm.penalty_step()
        if step % self.interval == 0:
            self.admm.project()
            self.admm.dual()

    def measure(self) -> dict:
        return {"masked_norm": self.admm.masked_norm(), "w_minus_z": self.admm.w_minus_z(), "val_top1": self.val_top1()}

    def end_epoch(self, epoch: int, record: dict) -> dict:
        rec = {"task_loss": record["loss"], **self.measure()}
        if self.progress:
            log.info("admm epoch %d: loss %.4f, ||(1-M)W|| %.4g, ||W-Z|| %.4g, val top-1 %.1f%%", epoch, rec["task_loss"] or 0,
                     rec["masked_norm"], rec["w_minus_z"], rec["val_top1"])
        return rec


@dataclass
class GohspOptions:
    data: str
    output: str
    ratios: dict
    rho: float = 1e-3
    lam: float = 1e-2
    admm_epochs: int = 2
    finetune_epochs: int = 1
    admm_interval: int | None = None  # steps between Z/U updates (default: one epoch)
    lr: float | None = None  # default: 0.01 (paper) or the quick recipe's lr for batch_size
    batch_size: int = 64
    teacher: str | None = None
    calib_batches: int = 4
    max_steps: int | None = None
    workers: int = 2
    seed: int = 0
    progress: bool = True
    sparsity: float | None = None  # overall column sparsity, distributed by Erdos-Renyi (replaces head_dim/mlp ratios)
    admm_recipe: str = "paper"  # paper: SGD m0.9, no wd, CE | quick: finetune's quick recipe, KD from teacher
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    plan: str | dict | None = None  # a saved plan file: its kept heads/columns are the ADMM targets
    norm: str | None = None  # how the model expects the pixels (calibration.parse_norm; None: ImageNet's)


def _val_acc(module, loader, max_batches=None) -> float:
    import torch

    module.eval()
    correct = total = 0
    with torch.no_grad():
        for k, (x, y) in enumerate(loader):
            if max_batches is not None and k >= max_batches:
                break
            correct += int((module(x).argmax(1) == y).sum())
            total += len(y)
    module.train()
    return 100.0 * correct / max(total, 1)


def gohsp(model: str, opts: GohspOptions) -> dict:
    """Rank heads (GOHSP), soft-prune with ADMM, hard-prune, fine-tune."""
    import torch
    import torch.nn.functional as F

    from onnxprune import api, io, runtime
    from onnxprune.plan import Plan
    from onnxprune.torchbridge.data import dataset_meta, image_folder
    from onnxprune.torchbridge.importer import import_onnx, write_back
    from onnxprune.torchbridge.loop import fit
    from onnxprune.torchbridge.recipes import get as get_recipe
    from onnxprune.torchbridge.distill import kd_loss
    from onnxprune.torchbridge.train import Options, evaluate_onnx, finetune, input_size, load_teacher, make_optimizer

    if opts.admm_recipe not in ("paper", "quick"):
        raise UserError(f"unknown ADMM recipe '{opts.admm_recipe}' (paper or quick)")
    if opts.sparsity is not None and not 0.0 <= opts.sparsity < 1.0:
        raise UserError(f"sparsity must be in [0, 1), got {opts.sparsity}")
    from onnxprune.plan.importance.calib import parse_norm

    mean, std = parse_norm(opts.norm, "--data-norm")
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    proto = io.read_proto(model)
    tproto = io.read_proto(opts.teacher) if opts.teacher else None  # both files checked before any work
    size = input_size(proto)[0]
    ratios = api.load_ratios(opts.ratios)  # checked as any ratios.json; GOHSP's defaults fill what was not written
    spec = ratios.importance_spec if "importance" in ratios.given else {}
    spec.setdefault("heads", "gohsp")
    spec.setdefault("default", "l1")  # the paper's column criterion for its hard-pruning ablation
    ratios.importance = spec
    if "scope" not in ratios.given:
        ratios.scope = "local"
    if opts.sparsity is not None:
        # columns come from Erdos-Renyi below; any ratio > 0 brings the groups into the plan
        if any(k in ratios.kinds for k in ("head_dim", "mlp")):
            log.warning("--sparsity replaces the head_dim / mlp ratios given in ratios.json")
        ratios.kinds = {**ratios.kinds, "head_dim": 0.5, "mlp": 0.5}
    rdict = ratios.to_dict()
    if ratios.target is not None or ratios.target_latency is not None:
        raise UserError("gohsp takes kind ratios (heads, head_dim, mlp), not a target")
    a = api.analyze(model)
    normalised = a.data_proto()
    plan = api.resolve_plan(a, ratios, opts.plan,
                            None if opts.plan is not None else api.calibration(opts.data, a, opts.calib_batches, 32, opts.norm))
    imp = import_onnx(normalised, seed=opts.seed)
    structs = build_structures(a, plan, imp)
    if not structs:
        raise UserError("nothing to soft-prune: no heads/head_dim/mlp group gets a ratio > 0")
    er = None
    if opts.sparsity is not None:
        er = erdos_renyi(structs, opts.sparsity, ratios.round_to)
        if opts.progress:
            names = {g.id: (g.kind, g.width) for g in a.groups}
            log.info("Erdos-Renyi column densities for sparsity %.2f: %s", opts.sparsity,
                     ", ".join(f"{names[k][0]}#{k} {v:.2f}" for k, v in er.items()))
    admm = ADMM(structs, opts.rho, opts.lam)
    module = imp.module
    meta = dataset_meta(opts.data)
    recipe = get_recipe("quick", hflip=0.0 if meta.get("hflip") is False else 0.5)
    train_ds = image_folder(opts.data, "train", size, True, recipe, mean, std)
    val_ds = image_folder(opts.data, "val", size, False, mean=mean, std=std)
    micro = imp.static_batch or opts.batch_size
    loader = torch.utils.data.DataLoader(train_ds, batch_size=micro, shuffle=True, drop_last=True, num_workers=opts.workers)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=micro, shuffle=False, drop_last=imp.static_batch is not None)
    params = [p for p in module.parameters() if p.requires_grad]
    if opts.admm_recipe == "paper":
        base_lr = opts.lr or 0.01
        opt = torch.optim.SGD(params, lr=base_lr, momentum=0.9, weight_decay=0.0)  # the paper: SGD, no weight decay
        smoothing, teacher = 0.0, None
    else:
        # the optimiser, loss and teacher of `finetune --recipe quick`, so that soft and hard differ only by ADMM
        base_lr = opts.lr or recipe.lr_for(opts.batch_size)
        opt = make_optimizer(params, recipe, base_lr)
        smoothing = recipe.label_smoothing
        teacher = load_teacher(tproto) if tproto is not None else None
    steps_per_epoch = len(loader)
    interval = opts.admm_interval or steps_per_epoch
    hook = AdmmHook(admm, interval, lambda: _val_acc(module, val_loader), opts.progress)
    history = [{"epoch": 0, "step": 0, "task_loss": None, **hook.measure()}]

    def loss_fn(batch):
        x, y = batch
        logits = module(x)
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
            loss = (1 - opts.kd_alpha) * loss + opts.kd_alpha * kd_loss(logits, t_logits, opts.kd_temperature)
        return loss

    run = fit(module, loader, opt, loss_fn, epochs=opts.admm_epochs, steps_per_epoch=steps_per_epoch, max_steps=opts.max_steps,
              lr_at=lambda s, t: base_lr * 0.5 * (1 + math.cos(math.pi * s / max(t, 1))), hooks=[hook])
    # GOHSP's records: the loop's loss is the task loss; no lr
    history += [{k: r[k] for k in ("epoch", "step", "task_loss", "masked_norm", "w_minus_z", "val_top1")} for r in run.history]
    step = run.step
    # hard pruning on the soft model, by our rewriter
    soft = write_back(imp)
    keep = admm.final_keep()
    a2 = api.analyze(soft)
    if [g.id for g in a2.groups] != [g.id for g in a.groups]:
        raise RuntimeError("analysis of the trained model differs from the original's")
    hard = api.prune(a2, plan=Plan(keep, {}, {}, {})).proto  # rewritten and validated
    x = np.stack([val_ds[i][0].numpy() for i in range(min(len(val_ds), micro))]).astype(np.float32)
    ys = runtime.session(soft).run(None, {runtime.session(soft).get_inputs()[0].name: x})[0]
    yh = runtime.session(hard).run(None, {runtime.session(hard).get_inputs()[0].name: x})[0]
    soft_vs_hard = float(np.abs(ys - yh).max() / (np.abs(ys).max() + 1e-12))
    base = os.path.splitext(opts.output)[0]
    hard_path = base + ".hard.onnx"
    io.save(hard, hard_path)
    result = {"input": model, "output": opts.output, "ratios": rdict, "rho": opts.rho, "lambda": opts.lam, "lr": base_lr,
              "admm_recipe": opts.admm_recipe, "admm_kd": teacher is not None,
              "admm_steps": step, "interval": interval, "history": history, "soft_vs_hard_max_rel": soft_vs_hard,
              "top1_soft": evaluate_onnx(soft, opts.data, size, mean, std),
              "top1_hard": evaluate_onnx(hard, opts.data, size, mean, std),
              "kept": {str(k): len(v) for k, v in keep.items()}, "macs": {"before": None, "after": None},
              "sparsity": opts.sparsity, "erdos_renyi": {str(k): v for k, v in er.items()} if er else None}
    from onnxprune.core import metrics

    result["macs"] = {"before": metrics.count(normalised)["macs"], "after": metrics.count(hard)["macs"]}
    if opts.finetune_epochs > 0:
        r = finetune(hard_path, Options(data=opts.data, output=opts.output, teacher=opts.teacher, recipe="quick",
                                        epochs=opts.finetune_epochs, lr=1e-3, batch_size=opts.batch_size, workers=opts.workers,
                                        progress=opts.progress, mean=mean, std=std))
        result["top1_final"] = r["top1_after"]
        result["finetune_steps"] = r["steps"]
    else:
        io.save(hard, opts.output)
        result["top1_final"] = result["top1_hard"]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    with open(base + ".gohsp.json", "w") as f:
        json.dump(result, f, indent=1)
    return result


def plot_history(history: list, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    for ax, key, lab in zip(axes, ["task_loss", "masked_norm", "w_minus_z", "val_top1"],
                            ["task loss", "||(1-M) * W||", "||W - Z||", "val top-1 (%)"]):
        pts = [(e, h[key]) for e, h in zip(ep, history) if h[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("ADMM epoch", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

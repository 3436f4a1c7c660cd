"""``onnxprune finetune``: train a pruned ONNX model in PyTorch and write the
trained tensors back into the same graph.

Import (onnx2torch + our converters) -> optional teacher -> train with a
recipe (Isomorphic Pruning, supplementary Table 3), knowledge distillation, AMP on GPU, EMA,
checkpoint/resume, DistributedDataParallel under torchrun (the loop itself is
:func:`.loop.fit`) -> write back by initializer name -> top-1 of the written
ONNX in ONNX Runtime.

Distillation: ``loss = (1 - a) * task + a * T^2 * KL(softmax(t / T) || softmax(s / T))``
with ``a = --kd-alpha`` (0.5) and ``T = --kd-temperature`` (4), Hinton et al.'s
soft-target loss on the teacher's logits.

Models exported with a static batch ``B`` train in micro-batches of ``B`` with
gradient accumulation up to ``--batch-size``: the graph's shape constants stay
untouched.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune import io
from onnxprune.errors import UserError
from onnxprune.torchbridge import recipes as R
from onnxprune.torchbridge.data import IMAGENET_MEAN, IMAGENET_STD, dataset_meta, image_folder
from onnxprune.torchbridge import bnfold
from onnxprune.torchbridge import distill as D
from onnxprune.torchbridge import features as FT
from onnxprune.torchbridge.importer import import_onnx, write_back

log = logging.getLogger(__name__)

EARLY_BATCHES = 8  # held-out batches (of 32) measured at the end of every epoch of label-free distillation


@dataclass
class Options:
    data: str
    output: str
    teacher: str | None = None
    recipe: str | None = None  # None: "quick" with labels, "distill" without
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 64
    workers: int = 2
    resume: str | None = None
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    max_steps: int | None = None  # stop early (tests, smoke runs)
    minutes: float | None = None  # training time budget: the schedule is fitted to it
    keep_worse: bool = False  # label-free: write the trained weights even when they are further from the teacher
    mix: float = 0.0  # label-free: mix each image batch with a shuffled copy of itself (weight ~ Beta(mix, mix))
    feature_weight: float = 1.0  # label-free: weight of matching the pruned layers' outputs to the teacher's (0: off)
    device: str | None = None
    seed: int = 0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    eval_batches: int | None = None
    progress: bool = True
    overrides: dict = field(default_factory=dict)  # recipe fields
    bn_reinsert: str = "auto"  # auto | on | off: BatchNorm after convs while training (bnfold.py)


def _dist():
    """(rank, world, local_rank) and whether torch.distributed was started here."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        if not dist.is_initialized():
            import torch

            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True
    return 0, 1, 0, False


def input_size(proto: onnx.ModelProto) -> tuple[int, int]:
    for i in io.data_inputs(proto):
        d = io.input_dims(i)
        if len(d) == 4 and d[2] and d[3]:
            return d[2], d[3]
    raise UserError("finetune needs an image input of shape [N, C, H, W] with static H and W")


def _lr_at(step: int, total: int, steps_per_epoch: int, base: float, recipe: R.Recipe) -> float:
    warm = recipe.warmup_epochs * steps_per_epoch
    if recipe.name in R.WARMUP_FRACTION:
        warm = int(R.WARMUP_FRACTION[recipe.name] * total)
    if step < warm:
        return base * (step + 1) / warm
    if recipe.schedule == "step":
        epoch = step / max(steps_per_epoch, 1)
        return base * 0.1 ** sum(epoch >= m for m in recipe.milestones)
    t = (step - warm) / max(1, total - warm)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(params: list, recipe: R.Recipe, lr: float):
    """The recipe's optimiser; weight decay on >=2-D tensors only."""
    import torch

    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=recipe.betas)
    return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=False)


def load_teacher(model, device=None):
    """The unpruned ONNX model (a path or proto) as a frozen torch module in eval mode."""
    teacher = import_onnx(model).module
    if device is not None:
        teacher = teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def evaluate_onnx(proto_or_path, root: str, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, max_batches=None,
                  batch: int = 32) -> float:
    """Top-1 (%) of an ONNX model in ONNX Runtime on ``root/val``."""
    from onnxprune import runtime

    proto = io.read_proto(proto_or_path) if isinstance(proto_or_path, str) else proto_or_path
    sess = runtime.session(proto, threads=os.cpu_count() or 1)
    name = sess.get_inputs()[0].name
    static = sess.get_inputs()[0].shape[0]
    b = static if isinstance(static, int) else batch
    ds = image_folder(root, "val", size, train=False, mean=mean, std=std)
    correct = total = 0
    idx = np.arange(len(ds))
    for k, start in enumerate(range(0, len(ds), b)):
        if max_batches is not None and k >= max_batches:
            break
        items = [ds[int(i)] for i in idx[start:start + b]]
        x = np.stack([it[0].numpy() for it in items]).astype(np.float32)
        y = np.array([it[1] for it in items])
        n = len(x)
        if n < b and isinstance(static, int):
            x = np.concatenate([x, np.repeat(x[-1:], b - n, 0)])
        logits = sess.run(None, {name: x})[0][:n]
        correct += int((logits.argmax(1) == y).sum())
        total += n
    return 100.0 * correct / max(total, 1)


def _teacher_gap(cmp: dict) -> float:
    """One number for "how far from the teacher": KL on logits, else the sum of
    the outputs' normalised MSE."""
    if "kl" in cmp:
        return float(cmp["kl"])
    return float(sum(v["nmse"] for v in cmp.get("outputs", {}).values()))


def finetune(pruned: str, opts: Options) -> dict:
    import torch
    import torch.nn.functional as F

    from onnxprune.torchbridge import loop as L

    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed)
    rank, world, local_rank, distributed = _dist()
    main_proc = rank == 0
    if opts.device:
        device = torch.device(opts.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    meta = dataset_meta(opts.data)
    over = dict(opts.overrides)
    if "hflip" in meta and not meta["hflip"]:
        over.setdefault("hflip", 0.0)
    labelled = D.is_labelled(opts.data)
    if opts.epochs is not None:
        over["epochs"] = opts.epochs
    elif opts.minutes:
        over["epochs"] = 10**6  # the time budget ends the run
    recipe = R.get(opts.recipe or ("quick" if labelled else "distill"), **over)
    proto = io.read_proto(pruned)
    tproto = io.read_proto(opts.teacher) if opts.teacher else None  # both files checked before any work
    try:
        size = input_size(proto)[0]
    except UserError:
        if labelled or os.path.isdir(opts.data):
            raise
        size = None
    t0 = time.perf_counter()
    # label-free: the outputs of the layers that lost input channels are matched to the teacher's too
    matched = FT.taps(proto, tproto) if tproto is not None and opts.feature_weight > 0 and not labelled else {}
    n_out = len(proto.graph.output)
    imp = import_onnx(FT.with_outputs(proto, matched) if matched else proto, seed=opts.seed)
    student = imp.module.to(device)
    info = imp.report()
    if main_proc:
        log.info("imported %s: %d trainable tensors (%d params), %d frozen", pruned, info["trainable_tensors"],
                 info["trainable_params"], len(info["frozen"]))
    teacher = (load_teacher(FT.with_outputs(tproto, matched) if matched else tproto, device)
               if tproto is not None else None)
    if main_proc and matched:
        log.info("matching %d intermediate values to the teacher's (weight %g)", len(matched), opts.feature_weight)
    micro = imp.static_batch or max(1, opts.batch_size // world)
    accum = max(1, math.ceil(opts.batch_size / (micro * world)))
    names = io.input_names(proto)
    if labelled:
        train_ds = image_folder(opts.data, "train", size, True, recipe, opts.mean, opts.std)
        n_classes, eval_ds, data_desc = len(train_ds.classes), None, f"{opts.data} (ImageFolder, labelled)"
    else:
        if teacher is None:
            raise UserError(f"{opts.data} has no class folders (DIR/train/<class>/...): label-free training needs --teacher")
        train_ds, eval_ds, data_desc = D.unlabelled(opts.data, proto, size, recipe, opts.mean, opts.std)
        n_classes = None
    sampler = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_ds, shuffle=True, seed=opts.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=micro, shuffle=sampler is None, sampler=sampler,
                                         num_workers=opts.workers, drop_last=True, persistent_workers=opts.workers > 0)
    if len(loader) == 0:
        raise UserError(f"training set has {len(train_ds)} samples: fewer than one batch of {micro}")

    def split(batch):
        if labelled:
            return [batch[0].to(device, non_blocking=True)], batch[1].to(device, non_blocking=True)
        return [b.to(device, non_blocking=True) for b in batch], None

    def some_batches(n_samples):
        out, got = [], 0
        for b in loader:
            out.append(split(b)[0])
            got += out[-1][0].shape[0]
            if got >= n_samples:
                break
        return out

    # auto: with labels only. Label-free distillation keeps the folded statistics: re-estimating them on the
    # few photos a user distils from moved the model away from the teacher on other photos
    reinsert = opts.bn_reinsert == "on" or (opts.bn_reinsert == "auto" and labelled and bnfold.should_insert(proto)
                                            and micro >= 8)
    bns = bnfold.insert(imp, some_batches(128), device) if reinsert else bnfold.Reinserted()
    if main_proc and reinsert:
        log.info("BatchNorm re-inserted after %d convolutions for training (folded back before write-back)", len(bns))
    steps_per_epoch = max(1, len(loader) // accum)
    lr = opts.lr if opts.lr is not None else recipe.lr_for(opts.batch_size)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = make_optimizer(params, recipe, lr)
    mixup = None
    if labelled and (recipe.mixup or recipe.cutmix):
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.label_smoothing,
                      num_classes=n_classes)
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    model = student
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[local_rank] if device.type == "cuda" else None)
    ema = L.EMA(student, recipe.ema) if recipe.ema else None
    ckpt = L.Checkpoint(opts.output + ".ckpt", student, opt, ema, extra={"recipe": recipe.as_dict()})
    step, start_epoch = 0, 0
    if opts.resume:
        path = ckpt.path if opts.resume in ("auto", "last") else opts.resume
        if not os.path.exists(path):
            raise UserError(f"no checkpoint to resume from at {path}")
        step, start_epoch = ckpt.load(path, map_location=device)
        if main_proc:
            log.info("resumed from %s at epoch %d, step %d", path, start_epoch, step)

    def loss_fn(batch):
        xs, y = split(batch)
        if y is None and opts.mix > 0:
            xs = _mixed(xs, opts.mix)
        if mixup is not None:
            xs[0], y_soft = mixup(xs[0], y)
        outs = D.as_list(model(*xs))
        outs, feats = outs[:n_out], outs[n_out:]
        logits = outs[0]
        if teacher is not None:
            with torch.no_grad():
                t_outs = D.as_list(teacher(*xs))
            t_outs, t_feats = t_outs[:n_out], t_outs[n_out:]
        if y is None:
            loss = D.output_loss(outs, t_outs, opts.kd_temperature)
            fl = FT.feature_loss(feats, t_feats) if feats else None
            return loss if fl is None else loss + opts.feature_weight * fl
        if mixup is not None:
            task = torch.sum(-y_soft * F.log_softmax(logits.float(), -1), -1).mean()
        else:
            task = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
        if teacher is None:
            return task
        kd = D.kd_loss(logits, t_outs[0], opts.kd_temperature)
        if len(outs) > 1:
            kd = kd + D.output_loss(outs[1:], t_outs[1:], opts.kd_temperature)
        return (1 - opts.kd_alpha) * task + opts.kd_alpha * kd

    hooks = [h for h in (ema, ckpt if main_proc else None) if h is not None]
    early, held = None, None
    if not labelled and not distributed and ema is None:  # label-free: keep the epoch nearest the teacher on held-out data
        held = D.eval_feeds(eval_ds, names, imp.static_batch, max_batches=opts.eval_batches)
        early = D.BestOnHeldOut(student, teacher, held[:EARLY_BATCHES], names, n_out, device)  # bounded work per epoch
        hooks.append(early)
    t_train = time.perf_counter()
    run = L.fit(model, loader, opt, loss_fn, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch, accum=accum,
                max_steps=opts.max_steps, lr_at=lambda s, t: _lr_at(s, t, steps_per_epoch, lr, recipe),
                clip_grad=recipe.clip_grad, amp=amp_dtype if use_amp else None, hooks=hooks, start_step=step,
                start_epoch=start_epoch, budget_s=opts.minutes * 60 if opts.minutes else None, progress=opts.progress and main_proc)
    step, history = run.step, run.history
    best_epoch = early.restore() if early is not None else None
    if main_proc and early is not None and best_epoch is not None and best_epoch != run.epoch:
        log.info("kept epoch %d of %d: nearest the teacher on the held-out samples", best_epoch, run.epoch)
    if ema is not None:
        ema.copy_to_module()
    n_bn = len(bns)
    if n_bn:
        bnfold.recalibrate(imp, bns, some_batches(256), device)
        bnfold.fold(bns)
    result = {"input": pruned, "output": opts.output, "recipe": recipe.as_dict(), "lr": lr, "batch_size": opts.batch_size,
              "micro_batch": micro, "accumulation": accum, "world_size": world, "device": str(device), "amp": use_amp,
              "steps": step, "history": history, "import": info, "kd": bool(teacher), "classes": n_classes,
              "data": data_desc, "labels": labelled, "bn_reinserted": n_bn,
              "train_seconds": round(time.perf_counter() - t_train, 1),
              "features": {"values": list(matched), "weight": opts.feature_weight if matched else 0.0}}
    if early is not None:
        result["held_out_gaps"], result["best_epoch"] = early.gaps, best_epoch
    if main_proc:
        student.cpu()
        tuned = write_back(imp)
        del tuned.graph.output[n_out:]  # the matched values were outputs for training only
        io.save(tuned, opts.output)
        if labelled:
            result["top1_before"] = evaluate_onnx(proto, opts.data, size, opts.mean, opts.std, opts.eval_batches)
            result["top1_after"] = evaluate_onnx(tuned, opts.data, size, opts.mean, opts.std, opts.eval_batches)
            if opts.teacher:
                result["top1_teacher"] = evaluate_onnx(tproto, opts.data, size, opts.mean, opts.std, opts.eval_batches)
        else:
            feeds = held if held is not None else D.eval_feeds(eval_ds, names, imp.static_batch, max_batches=opts.eval_batches)
            result["teacher_before"] = D.compare_onnx(proto, tproto, feeds)
            result["teacher_after"] = D.compare_onnx(tuned, tproto, feeds)
            gap0, gap1 = _teacher_gap(result["teacher_before"]), _teacher_gap(result["teacher_after"])
            if not (gap1 <= gap0) and not opts.keep_worse:  # a NaN is worse too
                # do no harm: training moved away from the teacher on the held-out samples
                io.save(proto, opts.output)
                result["kept_input"] = (f"distillation did not bring the model closer to the teacher on held-out samples "
                                        f"({gap0:.4g} -> {gap1:.4g}); the input's weights were written (--keep-worse writes "
                                        f"the trained ones)")
                result["teacher_after"] = result["teacher_before"]
        result["seconds"] = round(time.perf_counter() - t0, 1)
        with open(os.path.splitext(opts.output)[0] + ".finetune.json", "w") as f:
            json.dump(result, f, indent=1)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return result


def _mixed(xs: list, alpha: float) -> list:
    """Label-free input mixing: every floating-point image batch ``[B, C, H, W]``
    becomes ``lam * x + (1 - lam) * x[perm]`` (one ``lam ~ Beta(alpha, alpha)``
    and one permutation per batch); the teacher is run on the same mixed inputs,
    so the targets stay exact. Other inputs (token ids, masks) are left alone."""
    import torch

    lam = float(torch.distributions.Beta(alpha, alpha).sample())  # seeded with the run's torch seed
    out = []
    perm = None
    for x in xs:
        if torch.is_floating_point(x) and x.dim() == 4 and x.shape[0] > 1:
            perm = torch.randperm(x.shape[0]) if perm is None else perm
            x = lam * x + (1 - lam) * x[perm]
        out.append(x)
    return out

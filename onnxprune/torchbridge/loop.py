"""The training loop that ``finetune`` and GOHSP's ADMM phase share (torch only).

:func:`fit` runs optimizer steps of ``accum`` micro-batches each (gradient
accumulation), sets the lr from a schedule before every step, and handles AMP,
gradient clipping, a time budget (the schedule's length is refitted to the
measured speed and the run stops at the budget), a progress line on stderr and
one history record per epoch: ``epoch``, ``step``, ``loss`` (mean over the
epoch's steps) and ``lr`` (of its last step).

Anything else plugs in as a hook: an object with an optional
``after_step(step)``, called after every optimizer step (``step`` counts the
steps done), and an optional ``end_epoch(epoch, record) -> dict | None``, whose
dict is merged into that epoch's record. :class:`EMA` and :class:`Checkpoint`
are hooks; so is GOHSP's ADMM (:class:`onnxprune.methods.gohsp.AdmmHook`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from onnxprune.report import Progress


@dataclass
class Fit:
    """What :func:`fit` returns."""

    history: list  # one record per epoch run here
    step: int  # optimizer steps done (resumed ones included)
    epoch: int  # epochs done (resumed ones included)
    seconds: float


class EMA:
    """Exponential moving average of a module's floating-point state, as a hook:
    after every step ``avg = decay * avg + (1 - decay) * current``."""

    def __init__(self, module, decay: float):
        self.module, self.decay = module, decay
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_floating_point(v)}

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            for k, v in self.module.state_dict().items():
                if k in self.state:
                    self.state[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)

    def copy_to_module(self) -> None:
        sd = self.module.state_dict()
        sd.update(self.state)
        self.module.load_state_dict(sd)


class Checkpoint:
    """Saves the module, optimizer, step, epoch, EMA state and ``extra`` to
    ``path`` at the end of every epoch (a hook); :meth:`load` resumes from one."""

    def __init__(self, path: str, module, optimizer, ema: EMA | None = None, extra: dict | None = None):
        self.path, self.module, self.optimizer, self.ema, self.extra = path, module, optimizer, ema, extra or {}

    def end_epoch(self, epoch: int, record: dict) -> None:
        torch.save({"model": self.module.state_dict(), "opt": self.optimizer.state_dict(), "step": record["step"],
                    "epoch": epoch, "ema": self.ema.state if self.ema is not None else None, **self.extra}, self.path)

    def load(self, path: str | None = None, map_location=None) -> tuple[int, int]:
        """Restore module, optimizer and EMA state; returns (step, epoch) to pass to :func:`fit`."""
        ck = torch.load(path or self.path, map_location=map_location, weights_only=False)
        self.module.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["opt"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.state = ck["ema"]
        return ck["step"], ck["epoch"]


def _batch_len(batch) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    while isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() else 0


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _hooks(hooks, name: str) -> list:
    return [f for f in (getattr(h, name, None) for h in hooks) if f is not None]


def fit(model, loader, optimizer, loss_fn, *, epochs: int, steps_per_epoch: int, accum: int = 1, max_steps: int | None = None,
        lr_at=None, clip_grad: float | None = None, amp=None, budget_s: float | None = None, hooks=(), start_step: int = 0,
        start_epoch: int = 0, progress: bool = False) -> Fit:
    """Train ``model`` (put in train mode every epoch) with ``optimizer``.

    ``loss_fn(batch)`` returns the loss of one micro-batch from ``loader`` (the
    forward pass included); it runs under autocast when ``amp`` is a dtype
    (float16 also scales the loss on CUDA). An optimizer step averages the
    gradients of ``accum`` micro-batches; an epoch is ``steps_per_epoch`` steps
    (the loader restarts when it runs out). The run ends after ``epochs``
    epochs or ``total = min(epochs * steps_per_epoch, max_steps)`` steps.

    ``lr_at(step, total)``: the lr set on every parameter group before each
    step (None: the optimizer's own). ``clip_grad``: max norm of the gradients of
    all trainable parameters of ``model`` together.
    ``budget_s``: seconds of training; at step 5, every 20 steps and once the
    budget is spent, ``total`` becomes the steps the measured speed fits into it
    (at most ``max_steps``), so the schedule ends where the budget does.
    ``start_step`` / ``start_epoch``: where a resumed run continues. A loader
    whose sampler has ``set_epoch`` (DistributedSampler) gets the epoch.
    """
    total = steps_per_epoch * epochs
    if max_steps:
        total = min(total, max_steps)
    device_type = next(model.parameters()).device.type if amp is not None else "cpu"
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16 and device_type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]  # clipped together
    after_step, end_epoch = _hooks(hooks, "after_step"), _hooks(hooks, "end_epoch")
    world = _world()
    bar = Progress(enabled=progress)
    of = "" if budget_s else f"/{epochs}"
    history, step, epoch, lr, seen = [], start_step, start_epoch, None, 0
    t0 = time.perf_counter()
    while step < total and epoch < epochs:
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        model.train()
        losses = []
        it = iter(loader)
        for _ in range(steps_per_epoch):
            if step >= total:
                break
            if lr_at is not None:
                lr = lr_at(step, total)
                for g in optimizer.param_groups:
                    g["lr"] = lr
            else:
                lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _a in range(accum):
                try:
                    batch = next(it)
                except StopIteration:
                    it = iter(loader)
                    batch = next(it)
                with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
                    loss = loss_fn(batch)
                scaler.scale(loss / accum).backward()
                step_loss += float(loss.detach()) / accum
                seen += _batch_len(batch) * world
            if clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            for f in after_step:
                f(step)
            losses.append(step_loss)
            el = time.perf_counter() - t0
            if budget_s and (el >= budget_s or step == 5 or (step > 5 and step % 20 == 0)):
                fitted = step if el >= budget_s else max(step + 1, int(budget_s * step / max(el, 1e-9)))
                total = min(fitted, max_steps) if max_steps else fitted
            recent = losses[-20:]
            bar.show(f"epoch {epoch + 1}{of} step {step}/{total} loss {sum(recent) / len(recent):.4f} lr {lr:.2e} "
                     f"{seen / max(el, 1e-9):.1f} img/s")
        epoch += 1
        rec = {"epoch": epoch, "step": step, "loss": sum(losses) / len(losses) if losses else None, "lr": lr}
        if losses:
            bar.show(f"epoch {epoch}{of} done: loss {rec['loss']:.4f}", force=True)
        for f in end_epoch:
            rec.update(f(epoch, rec) or {})
        history.append(rec)
    return Fit(history, step, epoch, time.perf_counter() - t0)

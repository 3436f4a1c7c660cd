"""Training recipes from Table 3 of Isomorphic Pruning's supplementary material,
plus ``quick`` for CPU-minute demos.

The learning rate is the table's base lr scaled linearly with the batch size
(``lr = base_lr * batch / table_batch``), the usual convention for these
recipes; ``--lr`` sets it directly. Stochastic depth is not applied: an
exported graph has no drop-path branches to switch (the table's value is
listed for reference). Layer-wise lr decay and layer scale are 0/None in the
table, as here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from onnxprune.errors import UserError


@dataclass(frozen=True)
class Recipe:
    name: str
    optimizer: str  # adamw | sgd
    base_lr: float
    table_batch: int
    weight_decay: float
    momentum: float = 0.9  # sgd
    betas: tuple = (0.9, 0.999)  # adamw
    epochs: int = 300
    schedule: str = "cosine"  # cosine | step
    milestones: tuple = ()  # epochs, for "step"
    warmup_epochs: int = 0
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    random_erasing: float = 0.0
    randaugment: str = ""
    clip_grad: float | None = None
    ema: float | None = None
    drop_path: float | None = None  # the table's value; not applicable to an exported graph
    hflip: float = 0.5

    def lr_for(self, batch: int) -> float:
        return self.base_lr * batch / self.table_batch

    def as_dict(self) -> dict:
        return asdict(self)


RA = "rand-m9-mstd0.5-inc1"  # DeiT / ConvNeXt / Swin RandAugment
RECIPES = {
    "deit": Recipe("deit", "adamw", 5e-4, 2048, 0.05, epochs=300, mixup=0.2, cutmix=1.0, label_smoothing=0.1,
                   random_erasing=0.25, randaugment=RA, clip_grad=5.0, drop_path=0.0),
    "convnext": Recipe("convnext", "adamw", 1e-3, 1024, 0.05, epochs=300, mixup=0.2, cutmix=1.0, label_smoothing=0.1,
                       random_erasing=0.25, randaugment=RA, ema=0.9999, drop_path=0.1),
    "resnet": Recipe("resnet", "sgd", 0.08, 1024, 1e-4, epochs=100, schedule="step", milestones=(30, 60, 90)),
    "mobilenet": Recipe("mobilenet", "sgd", 0.036, 4096, 4e-5, epochs=300),
    "swin": Recipe("swin", "adamw", 5e-4, 2048, 0.05, epochs=300, mixup=0.2, cutmix=1.0, label_smoothing=0.1,
                   random_erasing=0.25, randaugment=RA, clip_grad=5.0, drop_path=0.1),
    # not in the table: short CPU runs (no heavy augmentation, lr not scaled down)
    "quick": Recipe("quick", "adamw", 1e-3, 64, 0.05, epochs=3, label_smoothing=0.1),
    # not in the table: label-free distillation of a model that already works
    # (after --recover): a small lr and no weight decay, so training refines
    # the re-fitted weights instead of undoing them; warm-up over the first 5%
    "distill": Recipe("distill", "adamw", 1e-4, 64, 0.0, epochs=3, warmup_epochs=0),
}
WARMUP_FRACTION = {"distill": 0.05}  # warm-up as a fraction of all steps (time-budgeted runs have no fixed epochs)


def get(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}' (recipes: {', '.join(RECIPES)})")
    r = RECIPES[name]
    over = {k: v for k, v in overrides.items() if v is not None}
    return replace(r, **over) if over else r

"""Re-inserted BatchNorm for fine-tuning BN-folded CNNs.

Exporters fold BatchNorm into the preceding convolution. Without it the
per-channel scales live in the conv weights, plain SGD/AdamW steps are no
longer scale-invariant, and a pruned network whose activations drift has
nothing to re-centre them: fine-tuning collapses to a constant output (the
loss sticks at ln(classes)).

While training, every Conv whose output is not already normalised gets a
``BatchNorm`` (train mode, batch statistics) after it, initialised from the
conv's own output statistics on a few training batches so that, in eval mode,
the forward is unchanged (``gamma = sqrt(var + eps)``, ``beta = mean``,
running stats = those statistics). Before write-back the running statistics
are re-estimated with the final weights and the BN is folded into the conv's
weight and bias: the ONNX graph keeps its nodes and initializer names/shapes.
(Ioffe & Szegedy, *Batch Normalization*; re-estimation as in Li et al.,
*EagleEye*.)
"""
from __future__ import annotations

import logging

import onnx

log = logging.getLogger(__name__)

NORMS = {"BatchNormalization", "InstanceNormalization", "GroupNormalization", "LayerNormalization"}


class Reinserted:
    """Handles of the BN layers attached to conv modules by :func:`insert`."""

    def __init__(self):
        self.items = []  # (conv module, bn module, hook handle, weight name, bias name)

    def __len__(self):
        return len(self.items)

    def bns(self):
        return [bn for _, bn, _, _, _ in self.items]


def candidates(imp) -> list[tuple[str, str, str]]:
    """(module path, weight name, bias name) of convs that can take a BN:
    trainable weight and bias, weight used by this node only, output not
    consumed by a normalisation."""
    proto = imp.proto
    uses: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            uses.setdefault(i, []).append(n)
    train = set(imp.trainable)
    out = []
    for n in proto.graph.node:
        if n.op_type != "Conv" or len(n.input) < 3 or not n.input[2]:
            continue
        w, b = n.input[1], n.input[2]
        if w not in train or b not in train or len(uses.get(w, [])) != 1 or len(uses.get(b, [])) != 1:
            continue
        if any(c.op_type in NORMS for c in uses.get(n.output[0], [])):
            continue
        lw, lb = imp.links.get(w, []), imp.links.get(b, [])
        if len(lw) != 1 or len(lb) != 1 or lw[0].transform != "same" or lb[0].transform != "same":
            continue
        mw, lw_leaf = lw[0].path.rsplit(".", 1)
        mb, lb_leaf = lb[0].path.rsplit(".", 1)
        if mw != mb or (lw_leaf, lb_leaf) != ("weight", "bias"):
            continue
        out.append((mw, w, b))
    return out


def _module(root, path):
    m = root
    for p in path.split("."):
        m = getattr(m, p)
    return m


def insert(imp, batches, device=None, eps: float = 1e-5) -> Reinserted:
    """Attach a BN after every candidate conv of ``imp.module``, initialised
    from the conv outputs on ``batches`` (lists of input tensors) so that the
    eval-mode forward is unchanged."""
    import torch

    mod = imp.module
    found = []
    for path, w, b in candidates(imp):
        conv = _module(mod, path)
        if not isinstance(conv, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            continue
        found.append((conv, w, b))
    # conv output statistics (per channel) with the current weights, eval mode
    sums = {id(c): [0.0, 0.0, 0] for c, _, _ in found}
    hooks = []

    def stat_hook(m, _inp, out):
        o = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)
        s = sums[id(m)]
        s[0] = s[0] + o.sum(1)
        s[1] = s[1] + (o * o).sum(1)
        s[2] += o.shape[1]

    for c, _, _ in found:
        hooks.append(c.register_forward_hook(stat_hook))
    was = mod.training
    mod.eval()
    with torch.no_grad():
        for xs in batches:
            mod(*[x.to(device) if device is not None else x for x in xs])
    for h in hooks:
        h.remove()
    mod.train(was)
    rep = Reinserted()
    bn_cls = {torch.nn.Conv1d: torch.nn.BatchNorm1d, torch.nn.Conv2d: torch.nn.BatchNorm2d, torch.nn.Conv3d: torch.nn.BatchNorm3d}
    for conv, w, b in found:
        s0, s1, n = sums[id(conv)]
        if not n:
            continue
        mean = (s0 / n).float()
        var = (s1 / n - (s0 / n) ** 2).clamp_min(0).float()
        bn = bn_cls[type(conv)](conv.out_channels, eps=eps).to(conv.weight.device)
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + eps))
            bn.bias.copy_(mean)
        conv.add_module("reinserted_bn", bn)
        handle = conv.register_forward_hook(lambda m, _i, out: m.reinserted_bn(out))
        rep.items.append((conv, bn, handle, w, b))
    log.info("re-inserted BatchNorm after %d of %d convolutions", len(rep), len(found))
    return rep


def recalibrate(imp, rep: Reinserted, batches, device=None) -> None:
    """Re-estimate the re-inserted BNs' running statistics with the current
    weights (cumulative average over ``batches``, train-mode forward, no grad)."""
    import torch

    if not len(rep):
        return
    mod = imp.module
    was = mod.training
    saved = {}
    for m in mod.modules():  # keep the graph's own BN statistics as training left them
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(m is bn for bn in rep.bns()):
            saved[m] = m.training
            m.eval()
    for bn in rep.bns():
        bn.reset_running_stats()
        bn.momentum = None
    mod.train()
    for m in saved:
        m.eval()
    with torch.no_grad():
        for xs in batches:
            mod(*[x.to(device) if device is not None else x for x in xs])
    for m, t in saved.items():
        m.train(t)
    mod.train(was)


def fold(rep: Reinserted) -> None:
    """Fold each BN (eval-mode form) into its conv's weight and bias and remove it."""
    import torch

    with torch.no_grad():
        for conv, bn, handle, _, _ in rep.items:
            handle.remove()
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(s.reshape(-1, *([1] * (conv.weight.ndim - 1))))
            conv.bias.copy_((conv.bias - bn.running_mean) * s + bn.bias)
            del conv._modules["reinserted_bn"]
    rep.items = []


def should_insert(proto: onnx.ModelProto) -> bool:
    """Default: on for CNNs (three or more convolutions) without any
    normalisation layer, which is what a BN-folded export looks like."""
    ops = [n.op_type for n in proto.graph.node]
    return ops.count("Conv") >= 3 and not set(ops) & NORMS

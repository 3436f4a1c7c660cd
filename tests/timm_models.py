"""Test fixtures: timm models with distinct random weights and planted dead channels.

Planting is written per family from the model's own module structure (not from
onnxprune's analysis), so the tests check the analysis against independent
knowledge of which channels are coupled.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Distinct random values everywhere (exporters deduplicate equal tensors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight") or "gamma" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def _half(n: int, rng) -> torch.Tensor:
    return torch.as_tensor(np.sort(rng.choice(n, n // 2, replace=False)))


def _rows(idx, *mods):
    for m in mods:
        m.weight[idx] = 0
        if getattr(m, "bias", None) is not None:
            m.bias[idx] = 0


def _cols(idx, *mods):
    for m in mods:
        m.weight[:, idx] = 0


def plant_resnet(m, rng) -> int:
    n = 0
    with torch.no_grad():
        idx = _half(m.conv1.out_channels, rng)
        _rows(idx, m.conv1, m.bn1)
        _cols(idx, m.layer1[0].conv1, m.layer1[0].downsample[0])
        n += len(idx)
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            for b in layer:
                for prod_, bn, cons in ((b.conv1, b.bn1, b.conv2), (b.conv2, b.bn2, b.conv3)):
                    idx = _half(prod_.out_channels, rng)
                    _rows(idx, prod_, bn)
                    _cols(idx, cons)
                    n += len(idx)
    return n


def plant_mobilenetv2(m, rng) -> int:
    n = 0
    with torch.no_grad():
        b0 = m.blocks[0][0]
        idx = _half(m.conv_stem.out_channels, rng)
        _rows(idx, m.conv_stem, m.bn1, b0.conv_dw, b0.bn1)
        _cols(idx, b0.conv_pw)
        n += len(idx)
        for stage in m.blocks[1:]:
            for b in stage:
                idx = _half(b.conv_pw.out_channels, rng)
                _rows(idx, b.conv_pw, b.bn1, b.conv_dw, b.bn2)
                _cols(idx, b.conv_pwl)
                n += len(idx)
        # stages of one block have no residual: their outputs are plain channels
        idx = _half(b0.conv_pw.out_channels, rng)
        _rows(idx, b0.conv_pw, b0.bn2)
        _cols(idx, m.blocks[1][0].conv_pw)
        n += len(idx)
        last = m.blocks[-1][-1]
        assert len(m.blocks[-1]) == 1
        idx = _half(last.conv_pwl.out_channels, rng)
        _rows(idx, last.conv_pwl, last.bn3)
        _cols(idx, m.conv_head)
        n += len(idx)
        idx = _half(m.conv_head.out_channels, rng)
        _rows(idx, m.conv_head, m.bn2)
        _cols(idx, m.classifier)
        n += len(idx)
    return n


def plant_convnext(m, rng) -> int:
    n = 0
    with torch.no_grad():
        for stage in m.stages:
            for b in stage.blocks:
                idx = _half(b.mlp.fc1.out_features, rng)
                _rows(idx, b.mlp.fc1)
                _cols(idx, b.mlp.fc2)
                n += len(idx)
    return n


PLANT = {"resnet50": plant_resnet, "mobilenetv2_100": plant_mobilenetv2, "convnext_tiny": plant_convnext}


def independent_macs(path: str, batch: int = 1) -> int:
    """Conv/Gemm/MatMul MACs from the shapes ONNX Runtime actually produces
    (every operand exposed as a graph output), not from any shape inference."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(path)
    ops = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Attention")]
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    have = {o.name for o in proto.graph.output}
    names = []
    for n in ops:
        for v in list(n.input[:3] if n.op_type == "Attention" else n.input[:2]) + [n.output[0]]:
            if v not in inits and v not in names:
                names.append(v)
                if v not in have:
                    proto.graph.output.append(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None))
    feeds = {}
    for i in proto.graph.input:
        if i.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = np.zeros(dims, np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    shapes = dict(inits)
    shapes.update({k: list(v.shape) for k, v in zip(outs, sess.run(outs, feeds))})
    total = 0
    for n in ops:
        x, w, y = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
        if n.op_type == "Conv":
            total += int(np.prod(y)) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            total += int(np.prod(x)) * int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            trans_a = next((a.i for a in n.attribute if a.name == "transA"), 0)
            total += int(np.prod(y)) * (x[0] if trans_a else x[1])
        elif n.op_type == "Attention":
            v = shapes[n.input[2]]
            total += int(np.prod(x[:-1])) * w[-2] * (x[-1] + v[-1])
        else:
            total += int(np.prod(y)) * x[-1]
    return total

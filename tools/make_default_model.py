"""Build the built-in demo model shipped in onnxprune/data (run once; needs torch + timm).

A small bottleneck ResNet (timm ResNet, layers 2-2-2-2, widths 16-32-64-128,
100 classes, random init, seed 0), legacy exporter, opset 17, dynamic batch.
"""
import os
import sys

import torch
from timm.models.resnet import Bottleneck, ResNet

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from onnxprune.torchbridge.export import export_timm  # noqa: E402

torch.manual_seed(0)
model = ResNet(block=Bottleneck, layers=[2, 2, 2, 2], channels=(16, 32, 64, 128), stem_width=16, num_classes=100)
out = os.path.join(os.path.dirname(__file__), "..", "onnxprune", "data", "default_resnet.onnx")
export_timm("mini_resnet", out, exporter="legacy", dynamic_batch=True, img_size=128, model=model)
print("wrote", os.path.abspath(out), os.path.getsize(out) // 1024, "KiB")

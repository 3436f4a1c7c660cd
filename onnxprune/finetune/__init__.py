"""Fine-tuning pruned ONNX models in PyTorch (onnx2torch import, weight
write-back, recipes, distillation, data). Needs the ``finetune`` extra."""

"""The PyTorch bridge (needs the ``finetune`` extra): an ONNX model imported as a
``torch.nn.Module`` (``importer``, ``converters``: onnx2torch plus our own
converters), trained by one loop (``loop``; the ``finetune`` driver in ``train``,
with ``recipes``, ``data``, label-free ``distill`` and BatchNorm re-insertion in
``bnfold``), and its weights written back into the same graph. ``export`` turns
timm models into ONNX files for tests and tools."""

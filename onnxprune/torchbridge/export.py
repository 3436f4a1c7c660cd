"""``onnxprune export timm:<name>``: export a timm model (random init unless a
checkpoint is given) with the dynamo or legacy exporter. Needs torch + timm."""
from __future__ import annotations

import logging
import warnings

from onnxprune.errors import UserError

log = logging.getLogger(__name__)


def export_timm(
    name: str,
    out: str,
    exporter: str = "dynamo",
    opset: int | None = None,
    dynamic_batch: bool = False,
    checkpoint: str | None = None,
    img_size: int | None = None,
    model=None,
    batch: int | None = None,
    num_classes: int | None = None,
    **create_kw,
) -> str:
    try:
        import torch
        import timm
    except ImportError:
        raise UserError("export needs torch and timm: pip install 'onnxprune[export]'") from None
    if model is None:
        if name.startswith("timm:"):
            name = name[5:]
        if num_classes:
            create_kw.setdefault("num_classes", num_classes)
        try:
            try:
                # transformers bake the input size into their position embeddings / windows
                kw = dict(create_kw, img_size=img_size) if img_size and "img_size" not in create_kw else create_kw
                model = timm.create_model(name, pretrained=False, **kw)
            except TypeError:
                model = timm.create_model(name, pretrained=False, **create_kw)
        except RuntimeError as e:
            raise UserError(f"timm cannot create '{name}': {e}") from None
        if checkpoint:
            sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
            model.load_state_dict(sd)
    model.eval()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = img_size or (cfg.get("input_size") or (3, 224, 224))[-1]
    batch = batch or (2 if dynamic_batch else 1)  # the export batch (static unless dynamic_batch)
    x = torch.randn(batch, 3, size, size)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9  # protobuf's 2 GB limit
    with warnings.catch_warnings():  # the exporters' deprecation chatter, for this call only
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            kw = {"dynamic_shapes": ({0: torch.export.Dim.DYNAMIC},)} if dynamic_batch else {}
            torch.onnx.export(model, (x,), out, dynamo=True, opset_version=opset or 20, verbose=False, external_data=big, **kw)
        elif exporter == "legacy":
            kw = {"dynamic_axes": {"input": {0: "batch"}, "output": {0: "batch"}}} if dynamic_batch else {}
            torch.onnx.export(model, (x,), out, dynamo=False, opset_version=opset or 17, input_names=["input"], output_names=["output"], **kw)
        else:
            raise UserError(f"unknown exporter '{exporter}' (dynamo or legacy)")
    return out

"""Load, check, normalise and save ONNX models (onnx-ir is the core IR).

``read`` (model files and data arrays, checked), ``passes`` (shape inference and the
normalising passes), ``write`` (skeletons, full protos, streamed saving) and ``inputs``
(input shapes and dims); ``protowire`` reads and writes the protobuf wire format
directly; ``ort_shapes`` wraps onnxruntime's symbolic shape inference. This file
only re-exports."""
from __future__ import annotations

from onnxprune.io.read import (
    read_proto,
    read_array,
    array_shapes,
    read_model,
    check_graph,
    load,
)
from onnxprune.io.passes import (
    STATS,
    infer_into,
    infer,
    to_ir,
    normalised,
    fill_unknown_dims,
    BUILT_SHAPES,
    fold_static_shapes,
    normalize,
    weights_as_initializers,
    pin_attention_scale,
    WEIGHT_FOLDABLE,
    WEIGHT_READERS,
    FOLDABLE,
    FOLD_MAX,
    PROBES,
    probe_batch_dims,
)
from onnxprune.io.write import (
    skeleton,
    full_proto,
    session_parts,
    tensor_proto,
    to_proto,
    save,
    release,
    save_model,
    refuse_overwrite,
)
from onnxprune.io.inputs import (
    Hint,
    hints_by_input,
    parse_input_shapes,
    set_input_shapes,
    data_inputs,
    input_names,
    input_dims,
    static_batch,
)

__all__ = [
    "read_proto",
    "read_array",
    "array_shapes",
    "read_model",
    "check_graph",
    "load",
    "STATS",
    "infer_into",
    "infer",
    "to_ir",
    "normalised",
    "fill_unknown_dims",
    "BUILT_SHAPES",
    "fold_static_shapes",
    "normalize",
    "weights_as_initializers",
    "pin_attention_scale",
    "WEIGHT_FOLDABLE",
    "WEIGHT_READERS",
    "FOLDABLE",
    "FOLD_MAX",
    "PROBES",
    "probe_batch_dims",
    "skeleton",
    "full_proto",
    "session_parts",
    "tensor_proto",
    "to_proto",
    "save",
    "release",
    "save_model",
    "refuse_overwrite",
    "Hint",
    "hints_by_input",
    "parse_input_shapes",
    "set_input_shapes",
    "data_inputs",
    "input_names",
    "input_dims",
    "static_batch",
]

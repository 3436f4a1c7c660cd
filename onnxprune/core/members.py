"""What a group owns: tensor axes, shape-constant entries and attributes.

Members point at a *use* of a constant (node, input slot), not at the tensor's
name: exporters deduplicate equal tensors, so one initializer may feed layers
that end up with different plans. The rewriter un-shares them per use.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from onnxprune.core.space import Space

OUT, IN, PARAM = "out", "in", "param"  # producer rows, consumer columns, per-channel tensors


@dataclass(eq=False)
class TensorMember:
    node: ir.Node
    slot: int
    axis: int
    space: Space
    role: str

    @property
    def value(self) -> ir.Value:
        return self.node.inputs[self.slot]


@dataclass(eq=False)
class ShapeMember:
    """Entry ``index`` of an integer constant (a Reshape shape, Split sizes, Slice
    bounds) whose value becomes ``sign * sum(size_after(s) for s in spaces)``."""

    node: ir.Node
    slot: int
    index: int
    spaces: list[Space]
    sign: int = 1


@dataclass(eq=False)
class AttrMember:
    """An integer attribute (Conv ``group``, GroupNorm ``num_groups``, a Split's
    ``split`` list entry) that becomes the pruned size of ``spaces``."""

    node: ir.Node
    attr: str
    spaces: list[Space]
    index: int | None = None

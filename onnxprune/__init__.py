"""onnxprune: structural pruning of ONNX vision models with coupled-axis analysis,
isomorphic sets and exact physical rewriting.

``analyze``, ``prune``, ``verify``, ``validate``, ``Ratios`` and ``UserError`` are loaded
on first use, so ``import onnxprune`` (and the command line's start) stays cheap.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {"analyze": "api", "prune": "api", "verify": "api", "validate": "api", "Job": "pipeline", "Ratios": "plan", "UserError": "errors"}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"onnxprune.{mod}"), name)


__all__ = list(_LAZY)

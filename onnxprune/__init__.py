"""onnxprune: structural pruning of ONNX vision models with coupled-axis analysis,
isomorphic sets and exact physical rewriting."""
from .api import analyze, prune, validate  # noqa: F401
from .errors import UserError  # noqa: F401
from .plan import Ratios  # noqa: F401

__version__ = "0.1.0"

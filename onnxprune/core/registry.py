"""Which rule analyses which node: rules keyed by domain, op type and opset range.

A :class:`Registry` is a plain value handed to :func:`~onnxprune.core.analysis.run_analysis`;
nothing global is filled on import. Each rule module owns one (``RULES``) and
:func:`onnxprune.rules.default_registry` merges them. Two rules for the same op
whose opset ranges overlap are an error, raised when the second is added.

    RULES = Registry()

    @RULES.rule("Softmax", until=12)      # opsets 1..12: softmax over the flattened tail
    def softmax_v1(ctx, node): ...

    @RULES.rule("Softmax", since=13)      # 13+: one axis
    def softmax(ctx, node): ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

DEFAULT_DOMAINS = ("", "ai.onnx")
OPEN = 10**6  # "no upper bound" for an opset range


def _domain(d: str) -> str:
    return "" if d in DEFAULT_DOMAINS else d


@dataclass(frozen=True)
class Entry:
    domain: str
    op_type: str
    since: int
    until: int
    fn: Callable

    @property
    def key(self) -> str:
        return self.op_type if not self.domain else f"{self.domain}::{self.op_type}"

    def covers(self, opset: int) -> bool:
        return self.since <= opset <= self.until

    def describe(self) -> str:
        hi = "" if self.until >= OPEN else str(self.until)
        return f"{self.key} [{self.since}..{hi}] -> {self.fn.__module__}.{self.fn.__name__}"


class Registry:
    def __init__(self) -> None:
        self._by_op: dict[tuple[str, str], list[Entry]] = {}

    def add(self, fn: Callable, *op_types: str, domain: str = "", since: int = 1, until: int | None = None) -> None:
        if not op_types:
            raise ValueError(f"rule {fn.__name__} names no op type")
        hi = OPEN if until is None else until
        if hi < since:
            raise ValueError(f"rule {fn.__name__}: empty opset range {since}..{hi}")
        for op in op_types:
            e = Entry(_domain(domain), op, since, hi, fn)
            have = self._by_op.setdefault((e.domain, op), [])
            for o in have:
                if o.since <= e.until and e.since <= o.until:
                    raise ValueError(f"two rules for {e.key} at overlapping opsets: {o.describe()} and {e.describe()}")
            have.append(e)

    def rule(self, *op_types: str, domain: str = "", since: int = 1, until: int | None = None):
        """Decorator form of :meth:`add`."""
        def deco(fn: Callable) -> Callable:
            self.add(fn, *op_types, domain=domain, since=since, until=until)
            return fn

        return deco

    def merge(self, *others: "Registry") -> "Registry":
        for other in others:
            for e in other.entries():
                self.add(e.fn, e.op_type, domain=e.domain, since=e.since, until=e.until)
        return self

    def lookup(self, domain: str, op_type: str, opset: int) -> Callable | None:
        for e in self._by_op.get((_domain(domain), op_type), ()):
            if e.covers(opset):
                return e.fn
        return None

    def entries(self) -> list[Entry]:
        return [e for es in self._by_op.values() for e in es]

    def op_types(self, domain: str = "") -> set[str]:
        return {op for (d, op) in self._by_op if d == _domain(domain)}

    def __contains__(self, key) -> bool:
        domain, op = key if isinstance(key, tuple) else ("", key)
        return (_domain(domain), op) in self._by_op
